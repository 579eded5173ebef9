"""Cost of a score_mod: the same pattern with softcap, ALiBi or nothing, forward and forward+backward.

In one process, alternating the variants call by call; prints medians and each variant's ratio
to the plain pattern (issue 18's target: at most 1.15x). Every variant is first checked against
the float64 reference on a short length. Run: ``python -m attncompiler.bench.edge_weights``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ..dsl.pattern import causal
from ..dsl.primitives import sliding_window
from ..dsl.score_mod import alibi, alibi_slopes, softcap
from ..program.reference import reference
from ..runtime.compile import compile as compile_pattern

PATTERNS = {"sliding_window": lambda: sliding_window(256), "causal": causal}


def variants(heads: int) -> dict:
    """The score_mods compared: none, softcap(30) and ALiBi with the paper's slopes."""
    return {"plain": None, "softcap": softcap(30.0), "alibi": alibi(alibi_slopes(heads))}


def check(pattern, mods: dict, heads: int, dim: int) -> None:
    """Each variant against the float64 reference at L=100 (raises on a mismatch)."""
    q, k, v = (torch.randn(1, heads, 100, dim) for _ in range(3))
    for name, mod in mods.items():
        got = compile_pattern(pattern, "torch", score_mod=mod)(q, k, v).double()
        want = reference(pattern, q, k, v, score_mod=mod)
        if not torch.allclose(got, want, rtol=1e-4, atol=1e-5):
            raise AssertionError(f"{name}: differs from the float64 reference")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--patterns", default="sliding_window,causal")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    L, H, D = args.seq_len, args.heads, args.head_dim
    for pname in args.patterns.split(","):
        pattern = PATTERNS[pname]()
        mods = variants(H)
        check(pattern, mods, H, D)
        mods_c = {n: compile_pattern(pattern, "torch", score_mod=m) for n, m in mods.items()}
        q, k, v = (torch.randn(1, H, L, D, requires_grad=True) for _ in range(3))
        for mode in ("fwd", "fwd+bwd"):
            times: dict[str, list[float]] = {n: [] for n in mods_c}
            for _ in range(args.repeats + 1):  # the first round warms up
                for n, m in mods_c.items():
                    t0 = time.perf_counter()
                    if mode == "fwd":
                        with torch.no_grad():
                            m(q, k, v)
                    else:
                        m(q, k, v).sum().backward()
                    times[n].append(time.perf_counter() - t0)
            med = {n: statistics.median(t[1:]) for n, t in times.items()}
            ratios = "  ".join(f"{n} {med[n] * 1e3:.1f} ms ({med[n] / med['plain']:.2f}x)" for n in med)
            print(f"{pattern!r} L={L} H={H} D={D} {mode}, {args.threads} thread(s): {ratios}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
