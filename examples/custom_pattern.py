"""A new pattern two ways: a FlexAttention-style mask_mod, and the DSL. Same pattern?

The pattern: a causal local window of 64 keys, plus every 128th key (a strided "summary"
column, as in the Sparse Transformer), plus the first 16 positions as global tokens.

    python examples/custom_pattern.py [--seq-len 1000]

Checks that both declarations give the same dense mask, the same block layout and the same
outputs, and shows that the mask_mod was traced into an analyzable expression.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

import attncompiler as ac
from attncompiler.layout.picture import render_text

WINDOW, STRIDE, GLOBALS = 64, 128, 16


def from_mask_mod() -> ac.Pattern:
    """The pattern as a FlexAttention ``mask_mod(b, h, q_idx, kv_idx)``."""

    def mask_mod(b, h, q_idx, kv_idx):
        causal = kv_idx <= q_idx
        local = (q_idx - kv_idx) <= WINDOW
        summary = (kv_idx % STRIDE) == STRIDE - 1
        is_global = (q_idx < GLOBALS) | (kv_idx < GLOBALS)
        return (causal & (local | summary)) | is_global

    return ac.mask(mask_mod)


def from_dsl() -> ac.Pattern:
    """The same pattern from DSL primitives (each with an analytic layout)."""
    summary = ac.mask(lambda b, h, q_idx, kv_idx: kv_idx % STRIDE == STRIDE - 1)
    return ((ac.sliding_window(WINDOW) | summary).causal()) | ac.global_tokens(range(GLOBALS))


def same_layout(a, b) -> bool:
    """Whether two layouts have identical block lists (CSR and full flags) in every group."""
    if a.group_index.shape != b.group_index.shape:
        return False
    for ga, gb in zip((a.group_for(*ix) for ix in np.ndindex(a.group_index.shape)),
                      (b.group_for(*ix) for ix in np.ndindex(b.group_index.shape))):
        if not (np.array_equal(ga.row_ptr, gb.row_ptr) and np.array_equal(ga.cols, gb.cols)
                and np.array_equal(ga.full, gb.full)):
            return False
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=1000)
    args = ap.parse_args(argv)
    L = args.seq_len

    flex_style, dsl = from_mask_mod(), from_dsl()
    print(f"mask_mod : {flex_style!r}")
    print(f"           traced into an expression: {flex_style.predicate(L, L) is not None}")
    print(f"DSL      : {dsl!r}\n")
    print(render_text(dsl, L, width=40), "\n")

    checks = {}
    checks["same dense mask"] = torch.equal(flex_style.to_dense(L), dsl.to_dense(L))
    lay_a, lay_b = flex_style.layout(L, L, 64), dsl.layout(L, L, 64)
    checks["same block layout"] = same_layout(lay_a, lay_b)
    print(f"layout (mask_mod): {lay_a.num_full} full + {lay_a.num_partial} partial blocks")
    print(f"layout (DSL)     : {lay_b.num_full} full + {lay_b.num_partial} partial blocks")

    q, k, v = (torch.randn(2, 2, L, 32) for _ in range(3))  # [B, H, L, D]
    out_a = ac.compile(flex_style, "torch")(q, k, v)  # [B, H, L, D]
    out_b = ac.compile(dsl, "torch")(q, k, v)
    ref = ac.reference(dsl, q, k, v)  # float64
    diff = (out_a - out_b).abs().max().item()
    err = max((o.double() - ref).abs().max().item() for o in (out_a, out_b))
    checks["same outputs"] = diff < 1e-5
    checks["both match the float64 reference"] = err < 1e-4
    print(f"max |out(mask_mod) - out(DSL)| = {diff:.2e}; max error vs reference = {err:.2e}\n")

    for name, ok in checks.items():
        print(f"{'ok  ' if ok else 'FAIL'} {name}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
