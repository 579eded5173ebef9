"""Distributed attention benchmark: measured bytes and time of the sparse vs dense ring.

Spawns ``P`` local processes (gloo on CPU, NCCL when every rank has a GPU), runs forward and
backward of :func:`attncompiler.distributed.ring_attention` with the sparsity-aware plan and
with the dense-ring baseline, and prints the bytes actually handed to torch.distributed next
to the plan's prediction.

    python benchmarks/distributed_bench.py --pattern "sliding_window(window=256)" -L 65536 -P 2 4
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank, world, port, args, path):
    from attncompiler.cli_analysis import resolve_pattern
    from attncompiler.distributed import plan_attention, ring_attention, shard_bounds

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= world
    dev = torch.device("cuda", rank) if cuda else torch.device("cpu")
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=300))
    pattern = resolve_pattern(args.pattern)
    L, H, D = args.seq_len, args.heads, args.head_dim
    a, b = shard_bounds(L, world)[rank:rank + 2]
    g = torch.Generator().manual_seed(rank)
    q, k, v, do = (torch.randn(1, H, b - a, D, generator=g).to(dev) for _ in range(4))  # [B, H, Lr, D]
    plan = plan_attention(pattern, L, world, batch=1, heads=H, head_dim=D, elem_bytes=4)
    res = {}
    for name, dense in (("sparse", False), ("dense", True)):
        times = []
        for _ in range(args.repeat):
            qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
            stats: dict = {}
            dist.barrier()
            t0 = time.perf_counter()
            out, _ = ring_attention(pattern, qq, kk, vv, seq_len=L, plan=plan, stats=stats, dense_ring=dense)
            (out * do).sum().backward()
            dist.barrier()
            times.append(time.perf_counter() - t0)
        res[name] = {"fwd_bytes": stats.get("forward_bytes_sent", 0), "bwd_bytes": stats.get("backward_bytes_sent", 0),
                     "seconds": min(times)}
    res["plan_sparse_bytes"] = plan.ranks[rank].bytes_sent
    res["plan_dense_bytes"] = plan.ranks[rank].dense_bytes_sent
    with open(f"{path}.{rank}", "w") as f:
        json.dump(res, f)
    dist.destroy_process_group()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pattern", default="sliding_window(window=256)")
    ap.add_argument("--seq-len", "-L", type=int, default=65536)
    ap.add_argument("--world-sizes", "-P", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--heads", type=int, default=1)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    for world in args.world_sizes:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "res")
            mp.spawn(_worker, args=(world, _port(), args, path), nprocs=world, join=True)
            ranks = [json.load(open(f"{path}.{r}")) for r in range(world)]
        tot = {k: sum(r[k]["fwd_bytes"] + r[k]["bwd_bytes"] for r in ranks) for k in ("sparse", "dense")}
        pred = sum(r["plan_sparse_bytes"] for r in ranks) * 2
        row = {"pattern": args.pattern, "L": args.seq_len, "P": world,
               "sparse_bytes_measured": tot["sparse"], "sparse_bytes_planned": pred,
               "dense_bytes_measured": tot["dense"], "reduction": round(tot["dense"] / max(tot["sparse"], 1), 2),
               "sparse_s": round(max(r["sparse"]["seconds"] for r in ranks), 3),
               "dense_s": round(max(r["dense"]["seconds"] for r in ranks), 3)}
        print(json.dumps(row))


if __name__ == "__main__":
    main()
