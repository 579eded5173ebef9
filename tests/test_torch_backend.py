"""The torch backend against the float64 dense reference, forward and backward."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attncompiler as ac
from attncompiler.runtime import module as M
from attncompiler.layout.block_layout import build_layout
from attncompiler.program.schedule import Schedule, chunk

from strategies import block_sizes, cases, head_dims


def _inputs(B, H, Hkv, Lq, Lk, D, Dv=None, dtype=torch.float64):
    gen = torch.Generator().manual_seed(B * 1000 + Lq * 31 + Lk + D)
    mk = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()  # noqa: E731
    return mk(B, H, Lq, D), mk(B, Hkv, Lk, D), mk(B, Hkv, Lk, Dv or D)


def _compare(pattern, q, k, v, schedule, atol, rtol=0.0):
    attn = ac.compile(pattern, backend="torch", schedule=schedule)
    out, lse = attn(q, k, v, return_lse=True)
    ref, ref_lse = ac.reference(pattern, q, k, v, return_lse=True)
    assert out.dtype == q.dtype and out.shape == ref.shape
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), "rows without keys disagree"
    fin = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse.double()[fin], ref_lse[fin], atol=atol, rtol=rtol)
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = torch.autograd.grad(out, (q, k, v), g.to(out.dtype))
    want = torch.autograd.grad(ref, (q, k, v), g)
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        assert a.dtype == q.dtype and not torch.isnan(a).any(), name
        torch.testing.assert_close(a.double(), b.double(), atol=atol * 4, rtol=rtol, msg=lambda m: f"{name}: {m}")


@given(cases(max_len=70), block_sizes(), st.sampled_from([(1, 1), (2, 1), (4, 2), (3, 3)]), head_dims(),
       st.booleans())
@settings(max_examples=15)
def test_backend_matches_reference_float64(case, blocks, heads, D, small_steps):
    H, Hkv = heads
    q, k, v = _inputs(2, H, Hkv, case.q_len, case.kv_len, D)
    s = Schedule(block_m=blocks[0], block_n=blocks[1])
    if small_steps:  # many chunks and several online-softmax steps per row
        s = chunk(s, tile_elems=2048, key_blocks_per_step=2)
    _compare(case.pattern, q, k, v, s, atol=1e-9)


@given(cases(max_len=90), block_sizes(), st.sampled_from([(1, 1), (4, 2)]), head_dims(),
       st.sampled_from([torch.float32, torch.float64]))
@settings(max_examples=15)
def test_forward_only_path_matches_reference(case, blocks, heads, D, dtype):
    # No gradient and no lse requested: the backend may take its inference-only path.
    H, Hkv = heads
    q, k, v = (t.detach() for t in _inputs(2, H, Hkv, case.q_len, case.kv_len, D, dtype=dtype))
    attn = ac.compile(case.pattern, backend="torch", schedule=Schedule(block_m=blocks[0], block_n=blocks[1]))
    out = attn(q, k, v)
    assert out.dtype == dtype and not out.requires_grad
    tol = 1e-9 if dtype == torch.float64 else 3e-5
    torch.testing.assert_close(out.double(), ac.reference(case.pattern, q, k, v), atol=tol, rtol=tol)
    with torch.no_grad():
        torch.testing.assert_close(attn(q.requires_grad_(), k, v), out, atol=tol, rtol=tol)


@given(cases(max_len=70, max_leaves=2), st.sampled_from([(16, 16), (8, 32), (32, 8)]), head_dims())
@settings(max_examples=10)
def test_backend_matches_reference_float32_causal_compositions(case, blocks, D):
    p = case.pattern.causal()
    q, k, v = _inputs(1, 4, 2, case.q_len, case.kv_len, D, dtype=torch.float32)
    _compare(p, q, k, v, Schedule(block_m=blocks[0], block_n=blocks[1]), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("pattern", [
    ac.per_head([ac.causal(), ac.sliding_window(3), ac.strided(4)]),
    ac.mask(lambda b, h, q, k: (b == 1) | (q >= k + h)),
    ac.mask(lambda b, h, q, k: (q - k).remainder(3) == h % 3, per_head=True),
    ac.mask(lambda b, h, q, k: (q + k).remainder(2) == b, per_batch=True),
], ids=["per_head", "traced-b-h", "opaque-per-head", "opaque-per-batch"])
def test_head_and_batch_dependent_patterns(pattern):
    q, k, v = _inputs(2, 4, 2, 29, 37, 8) if pattern.head_period == 3 else _inputs(2, 2, 1, 29, 37, 8)
    _compare(pattern, q, k, v, Schedule(block_m=16, block_n=8), atol=1e-9)


def test_value_dim_may_differ_and_scale_is_used():
    p = ac.sliding_window(6) | ac.global_tokens([0])
    q, k, v = _inputs(1, 2, 1, 50, 50, 16, Dv=24)
    _compare(p, q, k, v, Schedule(block_m=16, block_n=16), atol=1e-9)
    out = ac.compile(p, backend="torch")(q, k, v, scale=0.3)
    torch.testing.assert_close(out, ac.reference(p, q, k, v, scale=0.3), atol=1e-9, rtol=0)


@pytest.mark.parametrize("pattern,empty_rows", [
    (ac.causal() & ac.mask(lambda b, h, q, k: q >= 20), range(0, 20)),
    (ac.document([5, 7]), range(12, 40)),
    (~ac.full(), range(0, 40)),
])
def test_rows_without_keys_give_zeros_and_no_nan(pattern, empty_rows):
    q, k, v = _inputs(2, 2, 1, 40, 40, 16)
    attn = ac.compile(pattern, backend="torch", schedule=Schedule(block_m=16, block_n=16))
    out, lse = attn(q, k, v, return_lse=True)
    rows = list(empty_rows)
    assert torch.equal(out[:, :, rows], torch.zeros_like(out[:, :, rows]))
    assert torch.isneginf(lse[:, :, rows]).all()
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    out.backward(torch.randn_like(out))
    for t in (q, k, v):
        assert not torch.isnan(t.grad).any()
    assert torch.equal(q.grad[:, :, rows], torch.zeros_like(q.grad[:, :, rows]))
    _compare(pattern, *_inputs(2, 2, 1, 40, 40, 16), Schedule(block_m=16, block_n=16), atol=1e-9)


@pytest.mark.parametrize("dtype,atol", [(torch.float16, 1e-2), (torch.bfloat16, 6e-2)])
@pytest.mark.parametrize("pattern", [ac.causal() | ac.global_tokens([3]), ac.sliding_window(7) & ac.strided(2)])
def test_half_precision_inputs(dtype, atol, pattern):
    q, k, v = _inputs(1, 2, 1, 45, 45, 48, dtype=dtype)
    out = ac.compile(pattern, backend="torch", schedule=Schedule(block_m=32, block_n=32))(q, k, v)
    assert out.dtype == dtype
    ref = ac.reference(pattern, q, k, v)
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=0)
    g = torch.randn(ref.shape, dtype=torch.float64)
    got = torch.autograd.grad(out, (q, k, v), g.to(dtype))
    want = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(got, want):
        assert a.dtype == dtype
        torch.testing.assert_close(a.double(), b.double(), atol=atol * 8, rtol=0.05)


def test_compile_reuses_the_program_and_a_new_length_builds_only_a_layout():
    p = ac.sliding_window(4) | ac.global_tokens([0])
    s = Schedule(block_m=8, block_n=8)
    a, b = ac.compile(p, backend="torch", schedule=s), ac.compile(p, backend="torch", schedule=s)
    assert a.program is b.program
    assert ac.compile(ac.sliding_window(4) | ac.global_tokens([0]), backend="torch", schedule=s).program is a.program
    programs = M.compile_program.cache_info()
    layouts = build_layout.cache_info()
    for L in (33, 47, 33):
        a(*_inputs(1, 1, 1, L, L, 8))
    assert M.compile_program.cache_info().misses == programs.misses, "no new program"
    assert build_layout.cache_info().misses - layouts.misses <= 2, "one layout per new length"
    lay = p.layout(47, 47, 8, 8)
    assert build_layout.cache_info().misses - layouts.misses <= 2 and lay is p.layout(47, 47, 8, 8)


def test_auto_backend_on_cpu_uses_torch():
    p = ac.causal()
    q, k, v = _inputs(1, 2, 2, 20, 20, 8)
    out = ac.compile(p)(q, k, v)
    torch.testing.assert_close(out, ac.reference(p, q, k, v), atol=1e-9, rtol=0)


def test_non_contiguous_and_expanded_inputs():
    # Typical call sites pass [B, L, H, D] tensors transposed to [B, H, L, D], or expanded k/v.
    p = ac.sliding_window(4) | ac.global_tokens([0])
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(2, 37, 4, 16, generator=gen, dtype=torch.float64).transpose(1, 2).requires_grad_()
    k = torch.randn(2, 37, 2, 16, generator=gen, dtype=torch.float64).transpose(1, 2).requires_grad_()
    v = torch.randn(2, 2, 16, 37, generator=gen, dtype=torch.float64).transpose(2, 3).requires_grad_()
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    _compare(p, q, k, v, Schedule(block_m=8, block_n=16), atol=1e-9)
    shared = torch.randn(1, 2, 37, 16, generator=gen, dtype=torch.float64).expand(2, -1, -1, -1)
    out = ac.compile(p, backend="torch", schedule=Schedule(block_m=8, block_n=8))(q.detach(), shared, shared)
    torch.testing.assert_close(out, ac.reference(p, q.detach(), shared, shared), atol=1e-9, rtol=0)
