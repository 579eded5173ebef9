"""Differential property tests (issue 15): random pattern trees against two float64 oracles.

Every drawn case runs forward (output and log-sum-exp) and backward (dq, dk, dv) on a backend
and is compared with ``ac.reference`` in float64 and with the independent masked-softmax oracle
of ``tests/oracle.py``; the analytic block layout of the drawn pattern is compared with the one
from dense evaluation at every (batch entry, head).

``ATTNC_FUZZ_CASES`` sets the number of cases over the whole module (default 300: about a
minute on one thread). The Triton backend runs under the interpreter on CPU, so it gets a small
share of the cases at short lengths. ``CI`` makes the draws derandomized (also the conftest
profile); without it every run draws new cases, which is the long mode:

    ATTNC_FUZZ_CASES=3000 python3 -m pytest -q -p no:cacheprovider tests/test_fuzz.py
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings

import attncompiler as ac
from oracle import dense_block_kinds, dense_mask, masked_softmax_attention
from strategies import FuzzCase, fuzz_cases, pattern_trees, schedules

CASES = max(4, int(os.environ.get("ATTNC_FUZZ_CASES", "300")))
# Shares of the cases: torch forward+backward, layouts, triton (interpreter: ~1-3 s a case).
TORCH_CASES, LAYOUT_CASES, TRITON_CASES = max(1, CASES * 6 // 10), max(1, CASES * 4 // 10), max(1, CASES // 60)


def _settings(n: int):
    return settings(max_examples=n, deadline=None, derandomize=bool(os.environ.get("CI")), database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


def tolerance(case: FuzzCase) -> float:
    """Absolute = relative tolerance against float64: fp64 1e-9 (1e-7 at logits ~100), fp32
    1e-4, widened in proportion to the logit magnitude (a logit s is rounded by about s * 6e-8)."""
    base = 1e-9 if case.dtype == torch.float64 else 1e-4
    return base * max(1.0, case.magnitude / 4)


def check_case(case: FuzzCase) -> None:
    """Forward, lse and dq/dk/dv of ``case`` against ``ac.reference`` and the independent oracle."""
    q, k, v = case.inputs(seed=case.q_len * 131 + case.kv_len)
    attn = ac.compile(case.pattern, backend=case.backend, schedule=case.schedule)
    out, lse = attn(q, k, v, return_lse=True)
    ref, ref_lse = ac.reference(case.pattern, q, k, v, return_lse=True)
    mask = dense_mask(case.pattern, case.batch, case.heads, case.q_len, case.kv_len)
    ind, ind_lse = masked_softmax_attention(q, k, v, mask, case.head_dim ** -0.5)
    tol = tolerance(case)

    assert out.dtype == q.dtype and out.shape == ref.shape, (out.dtype, out.shape, ref.shape)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any(), "NaN in out or lse"
    torch.testing.assert_close(ref, ind, atol=1e-10, rtol=1e-10, msg=lambda m: f"reference vs oracle: {m}")
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol, msg=lambda m: f"out: {m}")
    empty = ~mask.any(-1)
    assert torch.equal(torch.isneginf(lse), empty), "lse is -inf exactly on rows without keys"
    assert torch.equal(out[empty], torch.zeros_like(out[empty])), "rows without keys are zero"
    torch.testing.assert_close(lse.double()[~empty], ind_lse[~empty], atol=tol, rtol=tol, msg=lambda m: f"lse: {m}")

    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    got = torch.autograd.grad(out, (q, k, v), g.to(out.dtype))
    want = torch.autograd.grad(ind, (q, k, v), g)
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        assert a.dtype == q.dtype and not torch.isnan(a).any(), f"{name}: dtype {a.dtype} or NaN"
        if case.row_shift and name != "dv":
            # The shift component of dk sums dS_ij * t_i over rows with t_i ~ row_shift: its fp32
            # rounding grows like eps * row_shift^2 (conditioning, not a bug), so it is left out.
            a, b = a[..., :-1], b[..., :-1]
        # Gradients sum over a row's keys (dk, dv over queries): scale the bound by the row length.
        gt = tol * 4 * max(1.0, max(case.q_len, case.kv_len) / 32)
        torch.testing.assert_close(a.double(), b.double(), atol=gt, rtol=gt, msg=lambda m: f"{name}: {m}")


@given(fuzz_cases("torch"))
@_settings(TORCH_CASES)
def test_torch_backend_matches_the_float64_oracles(case):
    check_case(case)


@given(fuzz_cases("triton", max_len=40, max_leaves=3))
@_settings(TRITON_CASES)
def test_triton_backend_matches_the_float64_oracles(case):
    pytest.importorskip("triton")
    check_case(case)


@given(pattern_trees(97, max_leaves=5), schedules(), fuzz_cases("torch", max_len=97))
@_settings(LAYOUT_CASES)
def test_analytic_layout_equals_dense_evaluation(pattern, schedule, shape):
    q_len, kv_len, bm, bn = shape.q_len, shape.kv_len, schedule.block_m, schedule.block_n
    try:
        pattern.validate(q_len, kv_len)
    except ac.PatternError:
        pattern = shape.pattern  # a global index drawn beyond these lengths: use the shape's own pattern
    layout = pattern.layout(q_len, kv_len, bm, bn, batch=shape.batch, heads=shape.heads)
    kinds = layout.block_kinds()
    for b in range(shape.batch):
        for h in range(shape.heads):
            want = dense_block_kinds(pattern, q_len, kv_len, bm, bn, b, h)
            got = kinds[min(b, kinds.shape[0] - 1), min(h, kinds.shape[1] - 1)]
            np.testing.assert_array_equal(got, want, err_msg=f"{pattern!r} Lq={q_len} Lk={kv_len} "
                                                             f"blocks=({bm}, {bn}) b={b} h={h}")
