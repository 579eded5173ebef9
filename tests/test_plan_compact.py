"""The torch plan is as large as its rows, steps and partial blocks (issue 22): causal rows keep
one start column, steps are derived on demand, key-block ids are built per chunk; step masks
stay under a fixed cache budget and are rebuilt per chunk past it, with the same numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import attncompiler as ac
from attncompiler.codegen.pytorch import attention_plan as AP
from attncompiler.program.schedule import Schedule

from strategies import cases, schedules
from attncompiler.codegen.pytorch import fused_cpu


@pytest.fixture(autouse=True)
def _plan_path():
    """These tests are about the plan path (the fallback where the fused CPU kernels do not run)."""
    with fused_cpu.disabled():
        yield


def _stored_elems(plan) -> int:
    """Array elements the plan keeps (steps of band chunks are not stored)."""
    n = 0
    for c in plan:
        for a in (c.rows, c.lo, c.first, c.count):
            n += 0 if a is None else a.size
        if c.explicit is not None:
            n += sum(a.size for a in c.explicit)
        if c.band is not None:
            n += c.band[0].size + c.band[1].size
        if c.step_list is not None:
            n += sum(s.partial_r.numel() + s.partial_c.numel() for s in c.step_list)
    return n


def test_causal_plan_is_linear_in_rows():
    L, B = 1 << 16, 64
    blocks = ac.causal().layout(L, L, B, B).groups[0]
    plan = AP.make_plan(blocks, Schedule(key_blocks_per_step=4), 1)
    nqb = L // B
    assert blocks.num_blocks == nqb * (nqb + 1) // 2
    assert all(c.step_list is None for c in plan)  # one contiguous band per row
    assert _stored_elems(plan) <= 6 * nqb  # rows, lo, first, count, one diagonal block each
    # the derived steps still cover every block once: count them per row
    covered = np.zeros(nqb, dtype=np.int64)
    for c in plan:
        for s in c.steps:
            cols = c.step_cols(s)
            real = (cols >= c.first[:, None]) & (cols < (c.first + c.count)[:, None])
            np.add.at(covered, c.rows, real.sum(axis=1))
    assert np.array_equal(covered, np.arange(1, nqb + 1))


def _inputs(L, D, scale_to, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, L, D, generator=g, dtype=torch.float64) for _ in range(3))
    return q * scale_to, k * scale_to, v  # logits of magnitude ~ scale_to^2 * sqrt(D)


def _check(pattern, L, schedule, seed):
    q, k, v = _inputs(L, 8, 5.0, seed)  # logits ~ 100-1000
    q.requires_grad_(); k.requires_grad_(); v.requires_grad_()
    out = ac.compile(pattern, backend="torch", schedule=schedule)(q, k, v)
    ref = ac.reference(pattern, q, k, v)
    assert torch.allclose(out, ref, atol=1e-9, rtol=1e-7)
    w = torch.randn_like(out)
    g1 = torch.autograd.grad((out * w).sum(), (q, k, v))
    g2 = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("budget", [0, 64 << 20])
@settings(max_examples=25, deadline=None)
@given(case=cases(min_len=1, max_len=97, same_len=True), schedule=schedules(), seed=st.integers(0, 2**16))
def test_per_chunk_masks_match_reference(budget, case, schedule, seed):
    """With no cache budget every step mask is rebuilt per chunk; numbers equal the oracle."""
    old = AP._TRACED_CACHE_BYTES, AP._MASK_CACHE_BYTES
    AP._TRACED_CACHE_BYTES = AP._MASK_CACHE_BYTES = budget
    try:
        _check(case.pattern, case.q_len, schedule, seed)
    finally:
        AP._TRACED_CACHE_BYTES, AP._MASK_CACHE_BYTES = old


def test_band_patterns_large_logits_odd_lengths():
    for p in (ac.causal(), ac.sliding_window(9).causal(), ac.sliding_window(13) | ac.global_tokens([0, 5]),
              ac.prefix_lm(20), ac.document([30, 17, 50]).causal()):
        for L, s in ((97, Schedule(block_m=8, block_n=8, tile_elems=256, key_blocks_per_step=2)),
                     (61, Schedule(block_m=5, block_n=3, tile_elems=16, key_blocks_per_step=3))):
            _check(p, L, s, L)


def test_traced_mask_cache_is_bounded(monkeypatch):
    """Masks past the budget are not stored (they are rebuilt per chunk), whatever L is."""
    monkeypatch.setattr(AP, "_TRACED_CACHE_BYTES", 1 << 20)
    AP._mask_cache.clear(); AP._mask_chunks.clear(); AP._mask_cache_used[0] = 0
    attn = ac.compile(ac.sliding_window(100), backend="torch", schedule=Schedule(block_m=16, block_n=16))
    q = torch.randn(1, 1, 6000, 16)
    with torch.no_grad():
        out = attn(q, q, q)
    assert 0 < AP._mask_cache_used[0] <= 1 << 20
    with torch.no_grad():
        again = attn(q, q, q)  # partly cached, partly rebuilt: the same numbers
    assert torch.equal(out, again)


def test_mask_cache_per_dtype_stays_consistent():
    """float64 then float32 calls on one plan cache one mask per dtype; the accounting matches."""
    attn = ac.compile(ac.sliding_window(7) | ac.global_tokens([2]), backend="torch",
                      schedule=Schedule(block_m=8, block_n=8, tile_elems=256))
    q = torch.randn(1, 1, 83, 8, dtype=torch.float64) * 5
    outs = []
    for dt in (torch.float64, torch.float32, torch.float64):
        with torch.no_grad():
            outs.append(attn(q.to(dt), q.to(dt), q.to(dt)).double())
    assert torch.equal(outs[0], outs[2]) and torch.allclose(outs[0], outs[1], atol=1e-3)
    assert AP._mask_cache_used[0] == sum(sm.nbytes() for sm in AP._mask_cache.values())
    keys = [k for ks in AP._mask_chunks.values() for k in ks]
    assert len(keys) == len(set(keys)) == len(AP._mask_cache)
