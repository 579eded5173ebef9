"""Forward time of a transformer stack with and without cross-layer attention reuse.

A 12-layer pre-norm stack (L = 4096, H = 12, D = 64) whose layers use sliding_window or
BigBird patterns; "reuse" makes every second layer reuse all heads of the layer before it (6 of
12 layers). Both variants are the same module (same weights; the plan is switched with
``set_reuse``), timed alternately in one process on the same input; medians are reported with
the cost model's predicted savings.

    python benchmarks/reuse_bench.py              # the full configuration (CPU, a few minutes)
    python benchmarks/reuse_bench.py --small      # seconds
    python benchmarks/reuse_bench.py --mlp-ratio 0    # attention-only blocks
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import attncompiler as ac
from attncompiler import patterns as catalogue
from attncompiler.nn import TransformerStack
from attncompiler.reuse import reuse_savings


def layer_patterns(kind: str, num_layers: int, window: int, block: int) -> list:
    """One pattern per layer; layers 2i and 2i+1 share a pattern so that 2i+1 may reuse 2i."""
    sw = ac.sliding_window(window)
    bb = catalogue.bigbird(block=block, window_blocks=3, global_blocks=2, random_blocks=3, seed=0)
    pick = {"sliding_window": lambda i: sw, "bigbird": lambda i: bb, "mixed": lambda i: sw if (i // 2) % 2 == 0 else bb}
    return [pick[kind](i) for i in range(num_layers)]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="L=1024, d_model=256, H=4, 4 layers")
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--patterns", choices=["sliding_window", "bigbird", "mixed"], default="mixed")
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--mlp-ratio", type=float, default=4.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's); on a busy shared machine use 1")
    args = ap.parse_args(argv)
    if args.small:
        args.seq_len, args.layers, args.heads, args.window = 1024, 4, 4, 64
    if args.threads:
        torch.set_num_threads(args.threads)
    d_model = args.heads * args.head_dim
    pats = layer_patterns(args.patterns, args.layers, args.window, args.block)
    reuse = {l: "all" for l in range(1, args.layers, 2)}
    torch.manual_seed(0)
    stack = TransformerStack(d_model, args.heads, pats, mlp_ratio=args.mlp_ratio, backend="torch").eval()
    x = torch.randn(args.batch, args.seq_len, d_model)
    times = {"no reuse": [], "reuse": []}
    plans = {"no reuse": None, "reuse": reuse}
    with torch.no_grad():
        for name, plan in plans.items():  # warm-up: layouts, plans, allocator
            stack.set_reuse(plan)
            stack(x)
        for _ in range(args.reps):
            for name, plan in plans.items():
                stack.set_reuse(plan)
                t0 = time.perf_counter()
                stack(x)
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"stack: {args.layers} layers, L={args.seq_len}, H={args.heads}, D={args.head_dim}, batch={args.batch}, "
          f"mlp_ratio={args.mlp_ratio}, patterns={args.patterns}, threads={torch.get_num_threads()}, reps={args.reps}")
    print(f"reuse plan: {stack.plan}")
    for k, v in times.items():
        print(f"  {k:>9}: median {med[k]:.3f} s  (runs: {', '.join(f'{t:.3f}' for t in v)})")
    drop = 1 - med["reuse"] / med["no reuse"]
    s = reuse_savings(stack, args.seq_len, args.batch, block=args.block)
    print(f"forward time drop: {drop:.1%}")
    print(f"predicted FLOPs saved: {s.flops_saved / s.flops:.1%} of {s.flops / 1e9:.1f} GFLOP; "
          f"attention-score FLOPs saved: 0% realized ({s.score_flops_saved / s.score_flops:.1%} with stored maps); "
          f"activation memory saved: {s.activation_bytes_saved / s.activation_bytes:.1%}")


if __name__ == "__main__":
    main()
