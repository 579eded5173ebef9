"""Distributed attention benchmark: bytes, overlap and causal load balance of the ring.

Spawns ``P`` local processes (gloo on CPU, NCCL when every rank has a GPU) and runs forward +
backward of :func:`attncompiler.distributed.ring_attention` for several cases, alternating
them round-robin ``--repeat`` times:

* ``window sparse`` / ``window dense``: sliding_window(W) at ``-L``, sparsity-aware ring vs the
  dense ring (every shard whole around the ring); bytes handed to torch.distributed are
  measured and compared with the plan's prediction.
* ``window dense no-overlap``: the dense ring waiting for each step before computing.
* ``causal <sharding>``: causal attention at ``--causal-len`` with contiguous, zigzag and
  striped sharding: blocks per rank (plan) and measured compute seconds per rank.
* ``causal zigzag no-overlap``: the same without communication/compute overlap.

With ``--pattern NAME ...`` (catalogue names such as ``bigbird``, or ``swg`` for
``sliding_window(256) | global_tokens([0, 1, 2, 3])``) only those patterns run at ``-L``:
``<name> sparse`` (the plan's choice, dense query rows included), ``<name> pieces-only`` (no
dense-row exchange: global query rows receive the keys over the ring) and ``<name> dense``
(the dense ring), without the isolated timings.

Prints one JSON line per (case, P): medians with [min, max] over the repeats. One thread per
process. On a 2-core machine 4 processes oversubscribe the CPU, so per-rank times measured
in the processes are squeezed together (a rank that finishes early frees a core for the
others). ``isolated`` lines therefore also time each rank's compute (exactly its sub-problems,
forward + backward, on random data) alone in the parent process, one rank after another.

    python benchmarks/distributed_bench.py -L 65536 --causal-len 16384 -P 2 4 --repeat 3
    python benchmarks/distributed_bench.py -L 65536 -P 2 4 --repeat 3 --pattern swg bigbird

(or ``python -m attncompiler.bench.distributed ...``). The spawned ranks run :func:`_worker` of
this module, imported by name in each process.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..codegen.pytorch.attention import block_sparse_attention, block_sparse_attention_backward
from ..distributed.local import merge_partials
from ..distributed.plan import dense_plan, plan_attention
from ..distributed.ring import ring_attention
from ..distributed.ring_fn import Ring
from ..dsl.pattern import causal
from ..dsl.primitives import global_tokens, sliding_window
from ..patterns import CATALOGUE
from ..patterns.text import parse_pattern


def _pattern(name: str):
    """``swg``: sliding_window(256) | global_tokens([0, 1, 2, 3]); a catalogue name (``bigbird``);
    anything else is pattern text (``bigbird(block=32)``, read by :func:`~attncompiler.patterns.text.parse_pattern`)."""
    if name == "swg":
        return sliding_window(256) | global_tokens([0, 1, 2, 3])
    if name in CATALOGUE:
        return CATALOGUE[name]()
    return parse_pattern(name)


def _cases(args):
    """``(name, pattern, L, sharding, dense_ring, overlap, dense_rows)`` of every case."""
    if args.pattern:
        cases = []
        for name in args.pattern:
            p = _pattern(name)
            cases += [(f"{name} sparse", p, args.seq_len, "contiguous", False, True, None),
                      (f"{name} pieces-only", p, args.seq_len, "contiguous", False, True, False),
                      (f"{name} dense", p, args.seq_len, "contiguous", True, True, None)]
        return cases
    win = sliding_window(args.window)
    cases = [("window sparse", win, args.seq_len, "contiguous", False, True, None),
             ("window dense", win, args.seq_len, "contiguous", True, True, None),
             ("window dense no-overlap", win, args.seq_len, "contiguous", True, False, None)]
    for sh in ("contiguous", "zigzag", "striped"):
        cases.append((f"causal {sh}", causal(), args.causal_len, sh, False, True, None))
    cases.append(("causal zigzag no-overlap", causal(), args.causal_len, "zigzag", False, False, None))
    return cases


def _worker(rank, world, port, args, path):
    torch.set_num_threads(1)
    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= world
    dev = torch.device("cuda", rank) if cuda else torch.device("cpu")
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=600))
    H, D = args.heads, args.head_dim
    prepared = []
    for name, pattern, L, sharding, dense, overlap, dense_rows in _cases(args):
        plan = plan_attention(pattern, L, world, batch=1, heads=H, head_dim=D, elem_bytes=4, sharding=sharding,
                              dense_rows=dense_rows)
        n = plan.sharding.local_len(rank)
        g = torch.Generator().manual_seed(rank)
        tensors = [torch.randn(1, H, n, D, generator=g).to(dev) for _ in range(4)]  # [B, H, Lr, D]
        prepared.append((name, pattern, L, plan, dense, overlap, tensors))
    res = {name: {"rank_s": [], "wall_s": [], "compute_s": [], "wait_s": []} for name, *_ in prepared}
    for it in range(args.repeat + 1):  # round-robin over the cases; iteration 0 warms up
        for name, pattern, L, plan, dense, overlap, (q, k, v, do) in prepared:
            qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
            stats: dict = {}
            dist.barrier()
            t0 = time.perf_counter()
            out, _ = ring_attention(pattern, qq, kk, vv, seq_len=L, plan=plan, stats=stats, dense_ring=dense,
                                    overlap=overlap)
            (out * do).sum().backward()
            if cuda:
                torch.cuda.synchronize()
            t1 = time.perf_counter()
            dist.barrier()
            t2 = time.perf_counter()
            r = res[name]
            r["bytes"] = stats.get("forward_bytes_sent", 0) + stats.get("backward_bytes_sent", 0)
            pr = (dense_plan(plan) if dense else plan).ranks[rank]  # what this case should hand to torch.distributed
            r["planned"] = pr.bytes_sent + pr.backward_bytes_sent
            r["dense_planned"] = plan.ranks[rank].dense_bytes_sent + plan.ranks[rank].dense_bytes_recv
            r["blocks"] = plan.ranks[rank].blocks_computed
            if it:
                r["rank_s"].append(t1 - t0)
                r["wall_s"].append(t2 - t0)
                r["compute_s"].append(stats.get("compute_s", 0.0))
                r["wait_s"].append(stats.get("wait_s", 0.0))
    with open(f"{path}.{rank}", "w") as f:
        json.dump(res, f)
    dist.destroy_process_group()


def _isolated(pattern, L, world, shardings, args):
    """Seconds of each rank's ring compute (forward + backward) timed alone with 1 thread.

    Shardings and ranks alternate within every repeat, so load from other jobs hits them alike.
    """
    torch.set_num_threads(1)
    H, D = args.heads, args.head_dim
    g = torch.Generator().manual_seed(0)
    plans, work = {}, {}
    for sh in shardings:
        plan = plans[sh] = plan_attention(pattern, L, world, heads=H, head_dim=D, sharding=sh)
        for r in range(world):
            ring = Ring(pattern, plan, plan, r, None, D ** -0.5, None, True, None)
            n = plan.sharding.local_len(r)
            q, do = (torch.randn(1, H, n, D, generator=g) for _ in range(2))  # [B, H, Lr, D]
            jobs = []
            for o in map(int, plan.need[r].nonzero()[0]):
                w = int(plan.key_range[r, o, 1] - plan.key_range[r, o, 0])
                k, v = (torch.randn(1, H, w, D, generator=g) for _ in range(2))  # [B, H, w, D]
                jobs += [(k, v) + sub for sub in ring.subproblems(o, 1, H)]
            work[sh, r] = (q, do, jobs)
    times = {key: [] for key in work}
    for _ in range(args.repeat + 1):
        for key, (q, do, jobs) in work.items():
            t0 = time.perf_counter()
            acc = {}
            for k, v, qa, qb, ka, kb, layout, sched in jobs:
                o, lse = block_sparse_attention(q[:, :, qa:qb], k[:, :, ka:kb], v[:, :, ka:kb], layout, sched, D ** -0.5)
                acc[qa, qb] = (o, lse) if (qa, qb) not in acc else merge_partials([acc[qa, qb][0], o],
                                                                                  [acc[qa, qb][1], lse])
            for k, v, qa, qb, ka, kb, layout, sched in jobs:
                out, lse = acc[qa, qb]
                block_sparse_attention_backward(q[:, :, qa:qb], k[:, :, ka:kb], v[:, :, ka:kb], out, lse,
                                                do[:, :, qa:qb].contiguous(), layout, sched, D ** -0.5)
            times[key].append(time.perf_counter() - t0)
    rows = []
    for sh, plan in plans.items():
        per = [times[sh, r][1:] for r in range(world)]  # iteration 0 warms up
        med = [statistics.median(t) for t in per]
        crit = [max(x) for x in zip(*per)]  # busiest rank, per repeat
        rows.append({"case": f"isolated {pattern!r} {sh}", "L": L, "P": world,
                     "blocks_per_rank": [x.blocks_computed for x in plan.ranks],
                     "imbalance_blocks": round(plan.imbalance, 3), "rank_s": [_spread(t) for t in per],
                     "imbalance_time": round(max(med) / statistics.mean(med), 3), "critical_path_s": _spread(crit)})
    return rows


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spread(xs) -> list:
    return [round(statistics.median(xs), 3), round(min(xs), 3), round(max(xs), 3)]


def main(argv: list[str] | None = None) -> None:
    """Run every world size and print one JSON line per case."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--seq-len", "-L", type=int, default=65536, help="sliding-window cases")
    ap.add_argument("--causal-len", type=int, default=16384, help="causal (load-balance) cases")
    ap.add_argument("--world-sizes", "-P", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--heads", type=int, default=1)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-isolated", action="store_true", help="skip the per-rank compute timed alone")
    ap.add_argument("--isolated-only", action="store_true", help="only the per-rank compute timed alone")
    ap.add_argument("--pattern", nargs="+", default=None,
                    help="run only these patterns at -L (swg: sliding_window(256) | global_tokens([0,1,2,3]))")
    args = ap.parse_args(argv)
    if args.pattern:
        args.no_isolated = True
    for world in args.world_sizes:
        if args.isolated_only:
            _print_isolated(world, args)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "res")
            mp.spawn(_worker, args=(world, _port(), args, path), nprocs=world, join=True)
            ranks = [json.load(open(f"{path}.{r}")) for r in range(world)]
        for name in ranks[0]:
            per = [r[name] for r in ranks]
            row = {"case": name, "P": world, "bytes_measured": sum(p["bytes"] for p in per),
                   "bytes_planned": sum(p["planned"] for p in per),
                   "dense_bytes_planned": sum(p["dense_planned"] for p in per),
                   "reduction_vs_dense": round(sum(p["dense_planned"] for p in per)
                                               / max(1, sum(p["bytes"] for p in per)), 2),
                   "blocks_per_rank": [p["blocks"] for p in per],
                   "imbalance_blocks": round(max(p["blocks"] for p in per) / statistics.mean(p["blocks"] for p in per),
                                             3),
                   # wall: slowest rank's fwd+bwd per repeat (median [min, max]); per-rank medians after it
                   "wall_s": _spread([max(x) for x in zip(*(p["wall_s"] for p in per))]),
                   "rank_compute_s": [round(statistics.median(p["compute_s"]), 3) for p in per],
                   "rank_wait_s": [round(statistics.median(p["wait_s"]), 3) for p in per]}
            c = row["rank_compute_s"]
            row["imbalance_time"] = round(max(c) / statistics.mean(c), 3) if statistics.mean(c) else None
            print(json.dumps(row), flush=True)
        if not args.no_isolated:
            _print_isolated(world, args)


def _print_isolated(world, args) -> None:
    for row in _isolated(causal(), args.causal_len, world, ("contiguous", "zigzag", "striped"), args):
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
