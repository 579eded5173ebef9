"""The Triton backend's benchmark sweep on CUDA (the figures of README's performance section).

For sliding_window, bigbird, longformer and causal at L = 4k, 16k, 64k, bf16, D = 64 and 128,
forward and forward+backward: the generated kernels against FlexAttention (compiled, with the
same block mask: our layout exported by ``layout.to_block_mask()``) and SDPA (FlashAttention
with ``is_causal`` for causal, dense otherwise, i.e. what a user without sparsity would run).
Every timing comes from :func:`attncompiler.bench.attention.run_bench` (alternating contenders, medians),
plus two rates: useful TFLOP/s (allowed (q, k) pairs only) and TFLOP/s on the computed blocks
(what the tensor cores actually did, to compare with the GPU's dense bf16 peak).

Run: ``python -m attncompiler.bench.triton [--quick]`` on a machine with CUDA.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass

import torch

from ..errors import UnsupportedError

BACKWARD_FACTOR = 2.5  # backward FLOPs relative to forward (FlashAttention's convention)


def sweep_patterns() -> dict:
    """The four patterns of the issue, with the block size the layout uses."""
    from .. import patterns as P
    from ..dsl.pattern import causal

    return {"sliding_window": P.sliding_window(window=256),
            "bigbird": P.bigbird(block=64),
            "longformer": P.longformer(window=256, global_indices=tuple(range(16))),
            "causal": causal()}


@dataclass(frozen=True)
class SweepRow:
    """One (pattern, L, D, mode) measurement; times in ms, rates in TFLOP/s."""

    pattern: str
    seq_len: int
    head_dim: int
    backward: bool
    attnc_ms: float | None
    flex_ms: float | None
    sdpa_ms: float | None
    useful_tflops: float | None
    computed_tflops: float | None
    speedup_vs_flex: float | None
    speedup_vs_sdpa: float | None


def _sdpa_ms(name: str, q, k, v, backward: bool, repeats: int) -> float:
    """FlashAttention through SDPA: causal for the causal pattern, dense for the others."""
    import triton.testing

    causal = name == "causal"

    def run():
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
        if backward:
            out.backward(torch.ones_like(out))

    return float(triton.testing.do_bench(run, warmup=3, rep=max(25, repeats * 5)))


def sweep(lengths=(4096, 16384, 65536), head_dims=(64, 128), modes=(False, True), *, batch: int = 1,
          heads: int = 16, repeats: int = 10, names: tuple[str, ...] | None = None, progress=print) -> list[SweepRow]:
    """Measure every configuration; returns one row each (skipped contenders give None)."""
    if not torch.cuda.is_available():
        raise UnsupportedError("the triton benchmark sweep needs a CUDA device")
    from .attention import run_bench

    rows = []
    pats = sweep_patterns()
    for name, pattern in pats.items():
        if names and name not in names:
            continue
        block = 64  # the default schedule's layout block (the one the kernels run unless autotuned)
        for L in lengths:
            layout = pattern.layout(L, L, block, block, batch=batch, heads=heads)
            Bm, Hm = layout.group_index.shape
            computed_pairs = layout.num_blocks * block * block * (batch // Bm) * (heads // Hm)
            for D in head_dims:
                for backward in modes:
                    progress(f"{name} L={L} D={D} {'fwd+bwd' if backward else 'fwd'}")
                    res = run_bench(pattern, L, heads=heads, head_dim=D, batch=batch, dtype="bfloat16",
                                    backward=backward, repeats=repeats, contenders=("attnc", "flex"),
                                    device="cuda", backend="triton", flex_mask="layout", flex_block=128,
                                    measure_memory=False)
                    q, k, v = (torch.randn(batch, heads, L, D, device="cuda", dtype=torch.bfloat16,
                                           requires_grad=backward) for _ in range(3))
                    sdpa = _sdpa_ms(name, q, k, v, backward, repeats)
                    ours, flex = res.contender("attnc").median_s, res.contender("flex").median_s
                    factor = 4 * D * (1 + BACKWARD_FACTOR if backward else 1)
                    useful = None if ours is None or res.allowed_pairs is None else \
                        factor * res.allowed_pairs / ours / 1e12
                    computed = None if ours is None else factor * computed_pairs / ours / 1e12
                    rows.append(SweepRow(name, L, D, backward, None if ours is None else ours * 1e3,
                                         None if flex is None else flex * 1e3, sdpa, useful, computed,
                                         None if ours is None or flex is None else flex / ours,
                                         None if ours is None else sdpa / 1e3 / ours))
    return rows


def table(rows: list[SweepRow]) -> str:
    """A markdown table of the sweep (for README)."""
    def f(x, spec=".2f"):
        return "-" if x is None else format(x, spec)

    out = ["| pattern | L | D | pass | attnc ms | flex ms | sdpa ms | useful TFLOP/s | computed TFLOP/s "
           "| x flex | x sdpa |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r.pattern} | {r.seq_len} | {r.head_dim} | {'fwd+bwd' if r.backward else 'fwd'} | "
                   f"{f(r.attnc_ms, '.3f')} | {f(r.flex_ms, '.3f')} | {f(r.sdpa_ms, '.3f')} | {f(r.useful_tflops, '.1f')} | "
                   f"{f(r.computed_tflops, '.1f')} | {f(r.speedup_vs_flex)} | {f(r.speedup_vs_sdpa)} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """Command line: run the sweep and print a markdown table (``--json`` for raw rows)."""
    ap = argparse.ArgumentParser(prog="python -m attncompiler.bench.triton")
    ap.add_argument("--quick", action="store_true", help="L=4096 and 16384, D=64 only")
    ap.add_argument("--pattern", action="append", help="only these patterns (repeatable)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--autotune", action="store_true", help="let the backend pick its schedule per shape")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print(f"{ap.prog}: this sweep times generated Triton kernels against FlexAttention and needs a CUDA "
              "device; none is available here. On CPU, time the torch backend with `attnc bench PATTERN`.",
              file=sys.stderr)
        return 2
    if args.autotune:
        from ..codegen.triton.backend import set_autotune

        set_autotune(True)
    kw = dict(lengths=(4096, 16384), head_dims=(64,)) if args.quick else {}
    rows = sweep(names=tuple(args.pattern) if args.pattern else None, **kw)
    print(json.dumps([asdict(r) for r in rows], indent=1) if args.json else table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
