"""Forward time of a transformer stack with and without cross-layer attention reuse.

A 12-layer pre-norm stack (L = 4096, H = 12, D = 64) whose layers use sliding_window or
BigBird patterns; "reuse" makes every second layer reuse all heads of the layer before it (6 of
12 layers). Three variants of the same module (same weights; plan and schedule switched with
``set_reuse``) are timed alternately in one process on the same input: no reuse, reuse with
stored probabilities (reused heads compute only P @ V) and reuse recomputing the scores from the
kept Q/K. Medians and the spread (min-max) are reported with the cost model's predictions, the
attention FLOPs counted by ``torch.utils.flop_counter`` and a per-layer time breakdown. Both
wall time and the process's CPU time are recorded: with one thread on a machine shared with
other jobs, CPU time is much less disturbed by them (wall time includes waiting for a core).

    python benchmarks/reuse_bench.py --threads 1                       # full configuration (minutes)
    python benchmarks/reuse_bench.py --threads 1 --mlp-ratio 0         # attention-only blocks
    python benchmarks/reuse_bench.py --threads 1 --patterns bigbird    # one family for every layer
    python benchmarks/reuse_bench.py --small                           # seconds

(or ``python -m attncompiler.bench.reuse ...``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from ..codegen.pytorch import fused_cpu
from ..codegen.pytorch.probs import ProbsWorkspace, apply_probs
from ..dsl.primitives import sliding_window
from ..families.reuse.plan import reuse_savings
from ..nn.stack import TransformerStack
from ..patterns.sparse import bigbird

VARIANTS = {"no reuse": (False, "recompute"), "reuse stored P": (True, "stored_probs"),
            "reuse recompute": (True, "recompute")}


def layer_patterns(kind: str, num_layers: int, window: int, block: int) -> list:
    """One pattern per layer; layers 2i and 2i+1 share a pattern so that 2i+1 may reuse 2i."""
    sw = sliding_window(window)
    bb = bigbird(block=block, window_blocks=3, global_blocks=2, random_blocks=3, seed=0)
    pick = {"sliding_window": lambda i: sw, "bigbird": lambda i: bb, "mixed": lambda i: sw if (i // 2) % 2 == 0 else bb}
    return [pick[kind](i) for i in range(num_layers)]


def _median_time(fn, reps: int) -> float:
    """Median CPU seconds of ``fn`` (one thread: robust to other jobs on a shared machine)."""
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.process_time()
        fn()
        ts.append(time.process_time() - t0)
    return statistics.median(ts)


@torch.no_grad()
def layer_breakdown(stack: TransformerStack, x: torch.Tensor, reps: int) -> dict[str, dict[str, float]]:
    """Seconds per part of one block (layer 0 and 1, which share a pattern): a plain layer, a
    source layer keeping P, and a reused layer applying it."""
    blk0 = stack.layers[0]
    a = blk0.attn
    E = a.embed_dim
    h = blk0.ln1(x)
    q, k, v = a.project(h, h, h)
    ws = ProbsWorkspace()
    _, probs = a.attend_with_probs(q, k, v, ws)
    out = a.attention(q, k, v)
    parts = {
        "layer norms": lambda: (blk0.ln1(x), blk0.ln2(x) if blk0.mlp_hidden else None),
        "Q/K projections": lambda: F.linear(h, a.in_proj_weight[:2 * E], a.in_proj_bias[:2 * E]),
        "V projection": lambda: F.linear(h, a.in_proj_weight[2 * E:], a.in_proj_bias[2 * E:]),
        "attention (flash)": lambda: a.attention(q, k, v),
        "attention + keep P": lambda: ws.release(a.attend_with_probs(q, k, v, ws)[1]),
        "apply stored P": lambda: apply_probs(probs, v),
        "out projection": lambda: a.merge(out),
        "MLP": (lambda: blk0.mlp(x)) if blk0.mlp_hidden else (lambda: None),
    }
    t = {name: _median_time(fn, reps) for name, fn in parts.items()}
    common = t["layer norms"] + t["V projection"] + t["out projection"] + t["MLP"]
    return {"parts": t,
            "plain layer": {"total": common + t["Q/K projections"] + t["attention (flash)"]},
            "source layer (stored P)": {"total": common + t["Q/K projections"] + t["attention + keep P"]},
            "reused layer (stored P)": {"total": common + t["apply stored P"]},
            "reused layer (recompute)": {"total": common + t["attention (flash)"]}}


@torch.no_grad()
def counted_attention_flops(stack: TransformerStack, x: torch.Tensor) -> int:
    """FLOPs of the batched matmuls (QK^T and PV: every bmm/baddbmm) of one forward pass, counted
    on the torch backend's plan path (the fused CPU kernels do the same products inside C, where
    no FLOP counter sees them)."""
    with fused_cpu.disabled(), FlopCounterMode(display=False) as fc:
        stack(x)
    return sum(v for op, v in fc.get_flop_counts()["Global"].items() if "bmm" in str(op))


def main(argv=None) -> None:
    """Command-line entry: time the stack without reuse and with both reuse variants, and print the
    medians with the cost model's predictions and a per-part layer breakdown."""
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
    ap.add_argument("--no-breakdown", action="store_true", help="skip the per-part layer timing")
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

    def use(name):
        on, sched = VARIANTS[name]
        stack.set_reuse(reuse if on else None, reuse_schedule=sched)

    clocks = {"wall": time.perf_counter, "cpu": time.process_time}
    times = {c: {name: [] for name in VARIANTS} for c in clocks}
    with torch.no_grad():
        for name in VARIANTS:  # warm-up: layouts, plans, allocator, workspace
            use(name)
            stack(x)
        for _ in range(args.reps):
            for name in VARIANTS:
                use(name)
                t0 = {c: f() for c, f in clocks.items()}
                stack(x)
                for c, f in clocks.items():
                    times[c][name].append(f() - t0[c])
    print(f"stack: {args.layers} layers, L={args.seq_len}, H={args.heads}, D={args.head_dim}, batch={args.batch}, "
          f"mlp_ratio={args.mlp_ratio}, patterns={args.patterns}, threads={torch.get_num_threads()}, reps={args.reps}")
    use("reuse stored P")
    print(f"reuse plan: {stack.plan}")
    for c in clocks:
        med = {k: statistics.median(v) for k, v in times[c].items()}
        for k, v in times[c].items():
            print(f"  {c:>4} {k:>15}: median {med[k]:.3f} s  (min {min(v):.3f}, max {max(v):.3f}; runs: "
                  f"{', '.join(f'{t:.3f}' for t in v)})")
        base = times[c]["no reuse"]
        for k in ("reuse stored P", "reuse recompute"):
            # spread: the drop of each alternated round (its runs shared the machine's load)
            drops = [1 - r / b for r, b in zip(times[c][k], base)]
            print(f"  {c:>4} forward time drop, {k}: {1 - med[k] / med['no reuse']:.1%} of the medians "
                  f"(per alternated round: {min(drops):.1%} .. {max(drops):.1%})")

    s = reuse_savings(stack, args.seq_len, args.batch, schedule="stored_probs", block=args.block)
    counted = {}
    for name in ("no reuse", "reuse stored P", "reuse recompute"):
        use(name)
        counted[name] = counted_attention_flops(stack, x)
    pred = s.score_flops_saved / s.score_flops
    got = 1 - counted["reuse stored P"] / counted["no reuse"]
    print(f"attention-score FLOPs (QK^T + PV): predicted {s.score_flops / 1e9:.2f} GFLOP, counted "
          f"{counted['no reuse'] / 1e9:.2f} GFLOP (bmm); drop with stored P: predicted {pred:.1%}, counted {got:.1%}; "
          f"recompute: counted {1 - counted['reuse recompute'] / counted['no reuse']:.1%}")
    print(f"predicted FLOPs saved (stored P): {s.flops_saved / s.flops:.1%} of {s.flops / 1e9:.1f} GFLOP; "
          f"Q/K activations saved {s.activation_bytes_saved / s.activation_bytes:.1%}; "
          f"stored probabilities kept: {s.probs_bytes / 2**20:.0f} MB over the stack")
    if args.no_breakdown:
        return
    bd = layer_breakdown(stack, x, args.reps)
    print(f"CPU time per part of layer 0 ({pats[0]!r}), medians of {args.reps}:")
    for name, t in bd["parts"].items():
        print(f"  {name:>20}: {t:.3f} s")
    plain = bd["plain layer"]["total"]
    for name in ("plain layer", "source layer (stored P)", "reused layer (stored P)", "reused layer (recompute)"):
        print(f"  {name:>26}: {bd[name]['total']:.3f} s  ({bd[name]['total'] / plain:.0%} of a plain layer)")
    pair = bd["source layer (stored P)"]["total"] + bd["reused layer (stored P)"]["total"]
    print(f"  => from the parts, a source + reused pair costs {pair / (2 * plain):.0%} of two plain layers "
          f"(estimated stack drop {1 - pair / (2 * plain):.1%}; parts timed in isolation, the fused QKV "
          f"projection of a plain layer as Q/K + V); MLP share of a plain layer: {bd['parts']['MLP'] / plain:.0%}")


if __name__ == "__main__":
    main()
