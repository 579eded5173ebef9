"""Generated Triton kernels vs the float64 reference, forward and backward.

On CPU the kernels run under TRITON_INTERPRET=1 (set by conftest before triton is imported),
so sizes stay small. GPU cases (fp16/bf16 accuracy, long sequences, autotuning) carry the
``gpu`` marker.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attncompiler as ac
from attncompiler import patterns as P
from attncompiler.program import schedule as S
from attncompiler.errors import ScheduleError, UnsupportedError

pytest.importorskip("triton")

from attncompiler.codegen.triton import backend as triton_backend  # noqa: E402
from attncompiler.codegen.triton.kernels import kernel_tiles  # noqa: E402

from strategies import cases  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True, scope="module")
def _cache_dir(tmp_path_factory):
    old = os.environ.get("ATTNC_CACHE_DIR")
    os.environ["ATTNC_CACHE_DIR"] = str(tmp_path_factory.mktemp("kernels"))
    yield
    if old is None:
        os.environ.pop("ATTNC_CACHE_DIR", None)
    else:
        os.environ["ATTNC_CACHE_DIR"] = old


def _qkv(B, H, Hkv, Lq, Lk, D, Dv=None, dtype=torch.float32):
    Dv = Dv or D
    q = torch.randn(B, H, Lq, D, dtype=dtype, device=DEVICE, requires_grad=True)
    k = torch.randn(B, Hkv, Lk, D, dtype=dtype, device=DEVICE, requires_grad=True)
    v = torch.randn(B, Hkv, Lk, Dv, dtype=dtype, device=DEVICE, requires_grad=True)
    return q, k, v


def check(pattern, B=1, H=2, Hkv=1, Lq=128, Lk=None, D=16, Dv=None, schedule=None, atol=2e-5):
    """Forward, log-sum-exp and dq/dk/dv of the triton backend against the float64 reference."""
    Lk = Lk or Lq
    q, k, v = _qkv(B, H, Hkv, Lq, Lk, D, Dv)
    attn = ac.compile(pattern, backend="triton", schedule=schedule)
    out, lse = attn(q, k, v, return_lse=True)
    ref, ref_lse = ac.reference(pattern, q, k, v, return_lse=True)
    assert out.dtype == q.dtype and out.shape == ref.shape
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=1e-5)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse.double()[finite], ref_lse[finite], atol=atol, rtol=1e-5)
    go = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), go)
    ref_grads = torch.autograd.grad(ref, (q, k, v), go.double())
    for name, g, r in zip("qkv", grads, ref_grads):
        assert not torch.isnan(g).any(), f"NaN in d{name}"
        torch.testing.assert_close(g.double(), r.double(), atol=5 * atol, rtol=1e-5, msg=lambda m: f"d{name}: {m}")
    return out, lse


CASES = {
    "sliding_window": dict(pattern=ac.sliding_window(20)),
    "causal_ragged_d48_gqa": dict(pattern=ac.causal(), H=4, Hkv=2, Lq=100, D=48),
    "cross_lengths": dict(pattern=ac.sliding_window(9) | ac.global_tokens([3]), Lq=70, Lk=113),
    "document_empty_rows": dict(pattern=ac.document([30, 50]), Lq=100),
    "dv_differs": dict(pattern=ac.prefix_lm(40), D=48, Dv=16, Lq=96),
    "floor_semantics": dict(pattern=ac.mask(lambda b, h, q, k: ((q - k) // 5) % 3 == 1) | ac.mask(
        lambda b, h, q, k: (k - q) % 7 < 2)),
    "opaque_mask_mod": dict(pattern=ac.mask(lambda b, h, q, k: torch.sin(q.float()) > torch.cos(k.float()))),
    "opaque_per_head": dict(pattern=ac.mask(lambda b, h, q, k: (q - k).remainder(h + 2) == 0, per_head=True),
                            H=2, Hkv=2, Lq=72),
    "head_dependent": dict(pattern=ac.mask(lambda b, h, q, k: (h == 0) | (k <= q)), H=3, Hkv=3, Lq=80),
    "batch_dependent": dict(pattern=ac.mask(lambda b, h, q, k: (b == 1) | (k <= q)), B=2, Lq=64),
    "kernel_tiles": dict(pattern=ac.sliding_window(20), schedule=S.tile(S.Schedule(), 32, 16), Lq=72),
    "block_48": dict(pattern=ac.causal() & ac.sliding_window(30), schedule=S.blocks(S.Schedule(), 48), Lq=60),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(name):
    check(**CASES[name])


def test_strided_views_and_broadcast_gradients():
    # q/k/v as transposed views of [B, L, H, D] and a zero-stride upstream gradient (from .sum()).
    p = ac.sliding_window(12) | ac.global_tokens([1])
    q, k, v = (torch.randn(2, 50, h, 16, device=DEVICE).transpose(1, 2).requires_grad_() for h in (4, 2, 2))
    out = ac.compile(p, backend="triton")(q, k, v)
    ref = ac.reference(p, q, k, v)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-5)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.sum(), (q, k, v))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r.double(), atol=1e-4, rtol=1e-5)


def test_empty_pattern_gives_zeros():
    out, lse = check(~ac.full(), Lq=40)
    assert (out == 0).all() and torch.isinf(lse).all() and (lse < 0).all()


@pytest.mark.parametrize("name,pattern", [
    ("bigbird", P.bigbird(block=32, window_blocks=3, global_blocks=1, random_blocks=2)),
    ("longformer", P.longformer(window=24, global_indices=(0, 5))),
    ("strided", P.sparse_transformer_strided(stride=16)),
    ("logsparse", P.logsparse(local=4)),
])
def test_catalogue(name, pattern):
    check(pattern, Lq=256, H=2, Hkv=1)


@settings(max_examples=5, deadline=None)
@given(case=cases(min_len=17, max_len=96, max_leaves=3),
       block=st.sampled_from([(16, 16), (32, 16), (16, 32)]), d=st.sampled_from([16, 24]))
def test_random_expressions(case, block, d):
    check(case.pattern, Lq=case.q_len, Lk=case.kv_len, D=d, schedule=S.blocks(S.Schedule(), *block))


def test_backward_is_deterministic():
    q, k, v = _qkv(1, 4, 2, 64, 64, 16)
    attn = ac.compile(P.bigbird(block=16, random_blocks=1), backend="triton", schedule=S.blocks(S.Schedule(), 32))
    out = attn(q, k, v)
    go = torch.randn_like(out)
    g1 = torch.autograd.grad(out, (q, k, v), go, retain_graph=True)
    g2 = torch.autograd.grad(out, (q, k, v), go)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


def test_fp16_matches_same_precision_eager():
    # The interpreter has fp16 (not bf16): compare with fp32 math on the fp16 inputs.
    p = ac.sliding_window(16) | ac.global_tokens([0])
    q, k, v = (t.detach().half() for t in _qkv(1, 2, 1, 64, 64, 16))
    out = ac.compile(p, backend="triton")(q, k, v)
    assert out.dtype == torch.float16
    ref = ac.reference(p, q, k, v)
    assert (out.double() - ref).abs().max() < 5e-3


def test_float64_falls_back_to_torch():
    q, k, v = (t.detach().double() for t in _qkv(1, 1, 1, 40, 40, 16))
    out = ac.compile(ac.causal(), backend="triton")(q, k, v)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ac.reference(ac.causal(), q, k, v))


def test_bad_tiles_raise_schedule_error():
    with pytest.raises(ScheduleError, match="kernel_block_m=8"):
        kernel_tiles(S.tile(S.Schedule(), 8, 64))
    with pytest.raises(ScheduleError, match="block size 8"):
        kernel_tiles(S.blocks(S.Schedule(), 8))
    assert kernel_tiles(S.blocks(S.Schedule(), 48, 256)) == (16, 128)


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = (t.detach().cpu() for t in _qkv(1, 1, 1, 16, 16, 16))
    with pytest.raises(UnsupportedError, match="backend='torch'"):
        triton_backend.check_device(q)


def test_autotune_picks_and_remembers_the_fastest(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(tmp_path))
    q, k, v = (t.detach() for t in _qkv(1, 1, 1, 32, 32, 16))
    base = S.blocks(S.Schedule(), 16)
    cands = [base, S.blocks(base, 32), S.warps(S.blocks(base, 32, 16), 8)]
    calls = []

    def timer(fn):
        fn()  # the candidate really runs
        calls.append(1)
        return {16: 3.0, 32: 1.0}[kernel_tiles(cands[len(calls) - 1])[0]] + len(calls) * 0.1

    pattern = ac.sliding_window(5)
    best = triton_backend.autotune(pattern, q, k, v, 0.25, base, batch=1, heads=1, candidates=cands, timer=timer)
    assert best == cands[1] and len(calls) == 3
    again = triton_backend.autotune(pattern, q, k, v, 0.25, base, batch=1, heads=1, candidates=cands, timer=timer)
    assert again == best and len(calls) == 3  # remembered, not re-timed
    triton_backend._WINNERS.clear()
    from_disk = triton_backend.autotune(pattern, q, k, v, 0.25, base, batch=1, heads=1, candidates=cands, timer=timer)
    assert from_disk == best and len(calls) == 3  # read back from autotune.json


# ---------------------------------------------------------------------------------------------
# GPU (skipped without CUDA)
# ---------------------------------------------------------------------------------------------

def _eager(pattern, q, k, v):
    """Same-precision eager attention with a dense mask (the yardstick for fp16/bf16 error)."""
    from attncompiler.program.reference import dense_masks, masked_attention

    B, H, Lq, D = q.shape
    mask = dense_masks(pattern, B, H, Lq, k.shape[2], q.device)
    return masked_attention(q, k, v, mask, D ** -0.5)[0]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pattern", [P.bigbird(block=64), P.longformer(window=128), ac.causal(),
                                     P.sparse_transformer_fixed(stride=64)])
def test_gpu_low_precision_accuracy(dtype, pattern):
    torch.manual_seed(0)
    B, H, Hkv, L, D = 2, 4, 2, 1000, 96
    q, k, v = (torch.randn(B, h, L, D, device="cuda", dtype=dtype, requires_grad=True) for h in (H, Hkv, Hkv))
    out = ac.compile(pattern, backend="triton")(q, k, v)
    ref = ac.reference(pattern, q, k, v)
    eager = _eager(pattern, q, k, v)
    err, eager_err = (out.double() - ref).abs().max(), (eager.double() - ref).abs().max()
    assert err <= 2 * eager_err + 1e-3
    go = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), go)
    ref_grads = torch.autograd.grad(ref, (q, k, v), go.double())
    eager_grads = torch.autograd.grad(eager, (q, k, v), go)
    for g, r, e in zip(grads, ref_grads, eager_grads):
        assert (g.double() - r).abs().max() <= 2 * (e.double() - r).abs().max() + 1e-2


@pytest.mark.gpu
def test_gpu_long_sequence_matches_torch_backend():
    torch.manual_seed(0)
    p = P.longformer(window=256, global_indices=(0, 1, 2, 3))
    B, H, L, D = 1, 4, 32768, 64
    q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out = ac.compile(p, backend="triton")(q, k, v)
    ref = ac.compile(p, backend="torch")(q.float(), k.float(), v.float())
    assert (out.float() - ref).abs().max() < 3e-2


@pytest.mark.gpu
def test_gpu_autotune_and_determinism():
    torch.manual_seed(0)
    triton_backend.set_autotune(True)
    try:
        p = P.bigbird(block=64)
        q, k, v = (torch.randn(1, 4, 4096, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        attn = ac.compile(p, backend="triton")
        out = attn(q, k, v)
        go = torch.randn_like(out)
        g1 = torch.autograd.grad(out, (q, k, v), go, retain_graph=True)
        g2 = torch.autograd.grad(out, (q, k, v), go)
        assert all(torch.equal(a, b) for a, b in zip(g1, g2))
        assert len(triton_backend._WINNERS) >= 1
    finally:
        triton_backend.set_autotune(None)
