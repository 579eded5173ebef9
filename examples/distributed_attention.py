"""Distributed attention launcher example (``torchrun``-compatible).

One machine, two processes on CPU (gloo) or two GPUs (NCCL):

    torchrun --nproc_per_node 2 examples/distributed_attention.py --seq-len 4096

Two nodes with 8 GPUs each (run on every node; node 0's address as the rendezvous):

    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint NODE0:29500 \\
        examples/distributed_attention.py --seq-len 1048576 --mode ring

Causal patterns: ``--sharding auto`` (or ``zigzag``) balances the work between ranks; each rank
then holds two chunks of the sequence, cut with ``plan.sharding.shard`` (and reassembled with
``plan.sharding.unshard``).

Each rank builds its shard of a random sequence, runs the sparsity-aware ring (or
head-parallel) attention forward and backward, and rank 0 prints the plan, the bytes each
rank actually sent and, with ``--check``, the error against the single-process reference.
"""

from __future__ import annotations

import argparse
import datetime
import os
import time

import torch
import torch.distributed as dist

import attncompiler as ac
from attncompiler.cli.analysis import resolve_pattern
from attncompiler.distributed import format_plan, head_parallel_attention, plan_attention, ring_attention


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pattern", default="sliding_window(window=256)")
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--mode", choices=("ring", "heads"), default="ring")
    ap.add_argument("--sharding", choices=("contiguous", "zigzag", "striped", "auto"), default="auto",
                    help="ring mode: how the sequence is split over the ranks")
    ap.add_argument("--check", action="store_true", help="compare with the float64 reference (small L only)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds before a silent peer is an error")
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=args.timeout))
    rank, world = dist.get_rank(), dist.get_world_size()
    dist.barrier()  # NCCL: the first collective must involve every rank; the ring's P2P batches may not
    dev = torch.device("cuda", local) if cuda else torch.device("cpu")
    pattern = resolve_pattern(args.pattern)
    L, H, D = args.seq_len, args.heads, args.head_dim

    g = torch.Generator().manual_seed(0)  # same full tensors on every rank (for --check)
    q, k, v, do = (torch.randn(1, H, L, D, generator=g) for _ in range(4))  # [B, H, L, D]
    stats: dict = {}
    t0 = time.perf_counter()
    # every rank computes the same plan (no communication), so "auto" picks the same sharding everywhere
    plan = plan_attention(pattern, L, world, args.mode, heads=H, head_dim=D, sharding=args.sharding)
    if args.mode == "ring":
        idx = plan.sharding.indices(rank)  # global positions this rank holds
        mine = [plan.sharding.shard(t, rank).to(dev).requires_grad_() for t in (q, k, v)]  # [B, H, ~L/P, D]
        out, _ = ring_attention(pattern, *mine, seq_len=L, stats=stats, plan=plan)
        (out * plan.sharding.shard(do, rank).to(dev)).sum().backward()
        sl = (slice(None), slice(None), idx)
    else:
        mine = [t.to(dev).clone().requires_grad_() for t in (q, k, v)]
        out, (h0, h1) = head_parallel_attention(pattern, *mine, stats=stats)
        (out * do[:, h0:h1].to(dev)).sum().backward()
        sl = (slice(None), slice(h0, h1))
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    if rank == 0:
        print(format_plan(plan))
    err = None
    if args.check:
        dq_mine = mine[0].grad if args.mode == "ring" else mine[0].grad[sl]  # this rank's share of dq
        ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
        ref = ac.reference(pattern, *ref_in)
        (ref * do.double()).sum().backward()
        err = max(float((out.detach().cpu().double() - ref.detach()[sl]).abs().max()),
                  float((dq_mine.cpu().double() - ref_in[0].grad[sl]).abs().max()))
    line = (f"rank {rank}/{world}: {elapsed:.3f} s fwd+bwd, sent {stats.get('forward_bytes_sent', 0)} B forward "
            f"+ {stats.get('backward_bytes_sent', 0)} B backward" + (f", max error {err:.2e}" if err is not None else ""))
    for r in range(world):  # one whole line per rank, in rank order (ranks share one terminal)
        dist.barrier()
        if r == rank:
            print(line, flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
