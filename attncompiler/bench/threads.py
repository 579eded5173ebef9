"""Thread scaling of the torch backend's block-sparse stage (float32; forward, and forward plus
backward with ``--mode fwdbwd``): the fused CPU kernels (:mod:`attncompiler.codegen.pytorch.fused_cpu`,
work handed out dynamically) at 1 and at N threads, next to the plan path with its (batch,
kv-head) split policy (:mod:`attncompiler.codegen.pytorch.threads`) at N threads.

Per pattern, in one process on the same inputs, alternating; quiet and, with ``--load``, with
one competing busy process. Each variant's output (and gradients) is compared with the kernels'
1-thread result before timing.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time

import torch

from ..codegen.pytorch import fused_cpu, threads as thread_policy
from .grid import busy_process, grid_patterns, num_threads

MODES = ("fwd", "fwdbwd")


@contextlib.contextmanager
def policy(on: bool):
    """The split policy of the torch stages switched on or off for the block."""
    old = thread_policy.ENABLED
    thread_policy.ENABLED = on
    try:
        yield
    finally:
        thread_policy.ENABLED = old


def measure(pattern, seq_len: int, threads: int, *, loaded: bool = False, repeats: int = 5, heads: int = 4,
            head_dim: int = 64, batch: int = 1, mode: str = "fwd", plan: bool = True) -> dict[str, float]:
    """Median ms of ``kernel@1``, ``kernel@N`` and (with ``plan``) ``plan split@N`` (N = ``threads``)
    of the forward (``mode="fwd"``, no gradient) or forward plus backward (``"fwdbwd"``)."""
    from ..runtime.module import CompiledAttention

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, heads, seq_len, head_dim, generator=gen) for _ in range(3))
    dout = torch.randn(batch, heads, seq_len, head_dim, generator=gen)
    attn = CompiledAttention(pattern, "torch")
    leaves = tuple(t.clone().requires_grad_() for t in (q, k, v))  # reused: autograd.grad accumulates nothing
    variants = {"kernel@1": (1, True), f"kernel@{threads}": (threads, True)}
    if plan:
        variants[f"plan split@{threads}"] = (threads, False)

    def call(n, kernel):
        path = contextlib.nullcontext() if kernel else fused_cpu.disabled()
        with num_threads(n), policy(True), path:
            if mode == "fwd":
                with torch.no_grad():
                    return (attn(q, k, v),)
            out = attn(*leaves)  # (fresh clones per call would time ATen copies, not attention)
            return (out.detach(), *torch.autograd.grad(out, leaves, dout))

    want = call(1, True)
    for name, (n, kernel) in variants.items():
        diff = max(float((a - b).abs().max()) for a, b in zip(call(n, kernel), want))
        if diff > 1e-4:
            raise AssertionError(f"{name} differs from the 1-thread result by {diff:.2e}")
    times: dict[str, list[float]] = {n: [] for n in variants}
    names = list(variants)
    with busy_process(loaded):
        for r in range(repeats):
            for name in names[r % len(names):] + names[:r % len(names)]:
                n, hooked = variants[name]
                t0 = time.perf_counter()
                call(n, hooked)
                times[name].append(time.perf_counter() - t0)
    return {n: 1e3 * statistics.median(ts) for n, ts in times.items()}


def main(argv=None) -> int:
    """Print one Markdown row per pattern and load: medians and the 2-thread speedups."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2, help="thread count compared with 1 (default 2)")
    ap.add_argument("--pattern", action="append", default=None,
                    help="a grid pattern name, parameters optional; repeat for several (default: the sparse ones)")
    ap.add_argument("--load", action="store_true", help="also measure with one competing busy process")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-plan", action="store_true", help="leave out the ATen path's split (faster runs)")
    ap.add_argument("--mode", default="fwd", help="comma-separated: fwd (no gradient), fwdbwd (forward + "
                    "backward); default fwd")
    args = ap.parse_args(argv)
    modes = [m.strip() for m in args.mode.split(",") if m.strip()]
    for m in modes:
        if m not in MODES:
            ap.error(f"--mode {m!r} is not one of {', '.join(MODES)}; hint: --mode fwd,fwdbwd")
    n = args.threads
    wanted = args.pattern or ["sliding_window", "causal window", "document, causal", "bigbird", "dilated"]
    print(f"L={args.seq_len} B=1 H=4 D=64 float32, medians of {args.repeats}, alternating; "
          f"x = kernel@1 / variant (> 1: faster than the kernels on one thread)")
    print(f"| pattern | mode | load | kernel@1 ms | kernel@{n} ms | plan split@{n} ms | x kernel@{n} | x plan split@{n} |")
    print("|---|---|---|---|---|---|---|---|")
    for name, pattern in grid_patterns(args.seq_len).items():
        if not any(w in (name, name.split("(")[0]) for w in wanted):
            continue
        for mode in modes:
            for loaded in ((False, True) if args.load else (False,)):
                m = measure(pattern, args.seq_len, n, loaded=loaded, repeats=args.repeats, mode=mode,
                            plan=not args.no_plan)
                base, kn, sp = m["kernel@1"], m[f"kernel@{n}"], m.get(f"plan split@{n}")
                split = ("-", "-") if sp is None else (f"{sp:.1f}", f"{base / sp:.2f}")
                print(f"| {name} | {mode} | {'busy' if loaded else 'quiet'} | {base:.1f} | {kn:.1f} | {split[0]} | "
                      f"{base / kn:.2f} | {split[1]} |",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
