"""The dense rewrite pass: masks exactly ``full()`` / causal lower to ``DenseAttention``, which the
torch backend runs with SDPA's fused CPU flash kernel (forward and backward) and every other
case (float64, call-time offsets, documents, empty lengths, Triton) with the block-sparse path.

Checked against the float64 oracle with logits of magnitude ~100-1000, odd lengths, Lq != Lk
(top-left causal), GQA, random schedules, forward and backward, and lse.
"""

import random

import pytest
import torch

import attncompiler as ac
from attncompiler.codegen.pytorch import dense as torch_dense, fused_cpu
from attncompiler.errors import InputError, UnsupportedError
from attncompiler.program.dense import DenseAttention, dense_kind, fuse_dense
from attncompiler.program.schedule import Schedule
from attncompiler.program.stages import BlockSparseAttention, lower

from oracle import assert_matches_oracle, dense_mask, masked_softmax_attention


@pytest.fixture(autouse=True)
def _sdpa_path():
    """Where the block-sparse CPU kernels are built they take full and causal calls too (they are
    faster); these tests are about SDPA's path, which runs wherever the kernels do not."""
    with fused_cpu.disabled():
        yield

RECOGNISED = [
    (ac.full(), "full"),
    (ac.causal(), "causal"),
    (ac.full().causal(), "causal"),
    (ac.full() & ac.full(), "full"),
    (ac.per_head([ac.causal(), ac.causal().causal()]), "causal"),
    (ac.mask(lambda b, h, q, k: q >= k), "causal"),
    (ac.mask(lambda b, h, q, k: k <= q), "causal"),
]
NOT_RECOGNISED = [
    ac.sliding_window(4), ac.causal() & ac.sliding_window(1000), ~ac.full(), ~ac.causal(),
    ac.per_head([ac.causal(), ac.full()]), ac.mask(lambda b, h, q, k: q > k),
    ac.mask(lambda b, h, q, k: q >= k + 1), ac.mask(lambda b, h, q, k: (q >= k) & (h >= 0)),
    ac.prefix_lm(3), ac.document([5, 5]),
]


@pytest.mark.parametrize("pattern,kind", RECOGNISED, ids=repr)
def test_recognised(pattern, kind):
    assert dense_kind(pattern) == kind
    stage = fuse_dense(lower(pattern)).stages[0]
    assert type(stage) is DenseAttention and stage.causal == (kind == "causal") and stage.pattern == pattern
    assert type(ac.compile(pattern).program.stages[0]) is DenseAttention  # on by default
    # the recogniser's claim, checked element by element
    want = torch.ones(9, 13, dtype=torch.bool)
    if kind == "causal":
        want = torch.arange(13)[None, :] <= torch.arange(9)[:, None]
    assert torch.equal(pattern.to_dense(9, 13), want)


@pytest.mark.parametrize("pattern", NOT_RECOGNISED, ids=repr)
def test_not_recognised(pattern):
    assert dense_kind(pattern) is None
    assert type(ac.compile(pattern).program.stages[0]) is BlockSparseAttention


def _inputs(B, H, Hkv, Lq, Lk, D, dtype=torch.float32, mag=6.0):
    """q, k with logits of magnitude ~ mag**2 * D * scale (hundreds), v of order 1."""
    q = (torch.randn(B, H, Lq, D, dtype=torch.float64) * mag).to(dtype).requires_grad_()
    k = (torch.randn(B, Hkv, Lk, D, dtype=torch.float64) * mag).to(dtype).requires_grad_()
    v = torch.randn(B, Hkv, Lk, D, dtype=torch.float64).to(dtype).requires_grad_()
    return q, k, v


def _forbid_block_path(monkeypatch):
    def boom(*a, **kw):
        raise AssertionError("the block-sparse path ran where the fused kernel applies")
    monkeypatch.setattr(torch_dense, "block_sparse_attention", boom)


def _forbid_fused(monkeypatch):
    def boom(*a, **kw):
        raise AssertionError("the fused kernel ran where it does not apply")
    monkeypatch.setattr(torch_dense, "dense_attention", boom)


SHAPES = [(2, 2, 2, 37, 37), (1, 4, 2, 37, 53), (2, 3, 1, 53, 29), (1, 2, 2, 1, 71), (1, 4, 4, 129, 65)]


@pytest.mark.parametrize("pattern", [ac.full(), ac.causal(), ac.mask(lambda b, h, q, k: q >= k)], ids=repr)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_fused_matches_oracle(pattern, shape, monkeypatch):
    B, H, Hkv, Lq, Lk = shape
    q, k, v = _inputs(B, H, Hkv, Lq, Lk, 16)
    _forbid_block_path(monkeypatch)
    out, lse = ac.compile(pattern, backend="torch")(q, k, v, return_lse=True)
    scale = 16 ** -0.5
    logits = (q.double() @ k.double()[:, torch.arange(H) // (H // Hkv)].transpose(-1, -2)) * scale
    assert logits.abs().max() > 100  # the large-logit regime
    ref, ref_lse = masked_softmax_attention(q, k, v, dense_mask(pattern, B, H, Lq, Lk), scale)
    assert lse.dtype == torch.float32
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-3)
    assert_matches_oracle(out, ref, (q, k, v), rtol=1e-5, atol=3e-5, grad_rtol=1e-4, grad_atol=5e-4)
    assert torch.equal(out.detach(), ac.compile(pattern)(q.detach(), k.detach(), v.detach()))  # no-grad path


@pytest.mark.parametrize("pattern", [ac.full(), ac.causal()], ids=repr)
def test_float64_falls_back_exactly(pattern, monkeypatch):
    rng = random.Random(7)
    for _ in range(3):
        bm, bn = rng.choice([16, 32, 64]), rng.choice([16, 32, 64])
        Lq, Lk = rng.randrange(1, 90), rng.randrange(1, 90)
        q, k, v = _inputs(1, 4, 2, Lq, Lk, 8, torch.float64, mag=20.0)
        _forbid_fused(monkeypatch)
        out, lse = ac.compile(pattern, backend="torch", schedule=Schedule(block_m=bm, block_n=bn))(
            q, k, v, return_lse=True)
        ref, ref_lse = ac.reference(pattern, q, k, v, return_lse=True)
        torch.testing.assert_close(lse, ref_lse, rtol=1e-12, atol=1e-9)
        assert_matches_oracle(out, ref, (q, k, v), rtol=1e-10, atol=1e-10, grad_rtol=1e-8, grad_atol=1e-8)


def test_causal_at_offset_falls_back_and_full_stays_fused(monkeypatch):
    q, k, v = _inputs(2, 2, 1, 23, 61, 8)
    offsets = torch.tensor([5, 30])
    with monkeypatch.context() as m:
        _forbid_fused(m)
        out = ac.compile(ac.causal(), backend="torch")(q, k, v, q_offset=offsets)
    assert_matches_oracle(out, ac.reference(ac.causal(), q, k, v, q_offset=offsets), (q, k, v),
                          atol=3e-5, grad_atol=5e-4)
    with monkeypatch.context() as m:
        _forbid_block_path(m)
        out = ac.compile(ac.full(), backend="torch")(q, k, v, q_offset=offsets)
        assert_matches_oracle(out, ac.reference(ac.full(), q, k, v, q_offset=offsets), (q, k, v),
                              atol=3e-5, grad_atol=5e-4)
        kv_lens = torch.tensor([61, 17])  # padding: keys arrive sliced, top-left causal stays exact
        out = ac.compile(ac.causal(), backend="torch")(q, k, v, kv_lens=kv_lens)
        assert_matches_oracle(out, ac.reference(ac.causal(), q, k, v, kv_lens=kv_lens), (q, k, v),
                              atol=3e-5, grad_atol=5e-4)


def test_rows_without_keys_give_zeros():
    """Top-left causal gives every row a key (row 0 sees key 0), also for Lq > Lk; rows without
    a key come only from call-time data (bottom-right alignment with more queries than keys is
    refused; a batch entry with ``kv_lens`` 0): zeros and lse -inf, never NaN."""
    q, k, v = _inputs(1, 2, 2, 40, 25, 8)
    with pytest.raises(InputError):
        ac.compile(ac.causal(), backend="torch")(q, k, v, align="bottom_right")
    q, k, v = _inputs(2, 2, 2, 9, 13, 8)
    out, lse = ac.compile(ac.causal(), backend="torch")(q, k, v, kv_lens=torch.tensor([13, 0]), return_lse=True)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and (lse[1] == float("-inf")).all()
    assert torch.isfinite(out).all() and torch.isfinite(lse[0]).all()


@pytest.mark.parametrize("which", [0, 1, 2])
@pytest.mark.parametrize("pattern", [ac.full(), ac.causal()], ids=repr)
def test_unchecked_nan_propagates(pattern, which, monkeypatch):
    """ATen's kernel turns a query row holding NaN into zeros; the stage must give NaN there."""
    _forbid_block_path(monkeypatch)
    qkv = [t.detach().clone() for t in _inputs(1, 2, 2, 9, 9, 8)]
    qkv[which][0, 1, 3, 2] = float("nan")
    out, lse = ac.compile(pattern, backend="torch")(*qkv, return_lse=True)
    assert torch.isnan(out[0, 1, 3]).any()  # NaN in v reaches its own column only
    assert torch.isnan(lse[0, 1, 3]) == (which < 2)  # lse does not read v
    assert torch.isfinite(out[0, 0]).all()  # the other head is untouched


def test_half_precision_uses_fused_kernel(monkeypatch):
    _forbid_block_path(monkeypatch)
    for dtype in (torch.bfloat16, torch.float16):
        q, k, v = _inputs(1, 4, 2, 45, 45, 16, dtype, mag=2.0)
        out = ac.compile(ac.causal(), backend="torch")(q, k, v)
        ref = ac.reference(ac.causal(), q, k, v)
        assert out.dtype == dtype
        torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2)
        out.sum().backward()
        assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))


def test_double_backward_refused():
    q, k, v = _inputs(1, 2, 2, 9, 9, 8)
    out = ac.compile(ac.causal(), backend="torch")(q, k, v)
    (g,) = torch.autograd.grad(out.sum(), q, create_graph=True)
    with pytest.raises(UnsupportedError):
        g.sum().backward()


def test_triton_runs_dense_stage_as_block_sparse():
    pytest.importorskip("triton")
    q, k, v = _inputs(1, 2, 1, 37, 45, 16)
    attn = ac.compile(ac.causal(), backend="triton", schedule=Schedule(block_m=16, block_n=16))
    assert type(attn.program.stages[0]) is DenseAttention
    assert_matches_oracle(attn(q, k, v), ac.reference(ac.causal(), q, k, v), (q, k, v), atol=3e-5, grad_atol=5e-4)
