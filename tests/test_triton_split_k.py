"""Split-K ("flash-decoding") forward of the Triton backend, under the interpreter on CPU.

A decode step (Lq of 1 or 3 rows, bottom-right aligned) against a key sequence of a dozen and
more key blocks: the row's key blocks are cut into chunks, one program each, merged through
their log-sum-exp. Each case is compared with the float64 oracle (logits of a few hundred, odd
lengths, GQA), forward and backward; forced split and no split agree; chunks and rows with no
visible key give no NaN.
"""

import pytest
import torch

import attncompiler as ac
from attncompiler import patterns as P
from attncompiler.errors import ScheduleError
from attncompiler.program.schedule import Schedule
from oracle import dense_mask, masked_softmax_attention

pytest.importorskip("triton")
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")

B, H, HKV, D = 2, 4, 2, 16
LK = 16 * 13 + 5  # 14 key blocks of 16, the last one ragged
SCHED = Schedule(block_m=16, block_n=16)


def _qkv(Lq, Lk, seed, mag=10.0):
    """q, k of size ``mag`` (logits of a few hundred at D=16), v of size 1."""
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, H, Lq, D, generator=g, dtype=torch.float64) * mag).float().requires_grad_()
    k = (torch.randn(B, HKV, Lk, D, generator=g, dtype=torch.float64) * mag).float().requires_grad_()
    v = torch.randn(B, HKV, Lk, D, generator=g, dtype=torch.float64).float().requires_grad_()
    return q, k, v


@pytest.fixture
def calls(monkeypatch):
    """Records ``(lse partials, merged lse)`` of every split forward."""
    from attncompiler.codegen.triton import kernels

    seen = []
    real = kernels.merge_partials

    def spy(out_p, lse_p, dtype):
        out, lse = real(out_p, lse_p, dtype)
        seen.append((lse_p.clone(), lse.clone()))
        return out, lse

    monkeypatch.setattr(kernels, "merge_partials", spy)
    return seen


def _run(monkeypatch, pattern, q, k, v, split, **kw):
    monkeypatch.setenv("ATTNC_SPLIT_K", str(split))
    return ac.compile(pattern, backend="triton", schedule=SCHED)(q, k, v, align="bottom_right", **kw)


def _oracle(pattern, q, k, v, mask=None):
    Lq, Lk = q.shape[2], k.shape[2]
    if mask is None:
        mask = dense_mask(pattern, B, H, Lk, Lk)[:, :, Lk - Lq:]
    return masked_softmax_attention(*(t.double() for t in (q, k, v)), mask, D ** -0.5)[0]


def _check(out, ref, inputs):
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out.double(), ref, rtol=2e-5, atol=2e-5)
    up = torch.randn_like(ref)
    got = torch.autograd.grad(out, inputs, up.float(), retain_graph=True)
    want = torch.autograd.grad(ref, inputs, up)
    for i, (a, b) in enumerate(zip(got, want)):
        err = float((a.double() - b).abs().max() / b.abs().max())
        assert err < 2e-4, f"input {i}: relative gradient error {err:.3g}"


CASES = {
    "window_causal": ac.sliding_window(90).causal(),
    "window_or_global": ac.sliding_window(20).causal() | ac.global_tokens([0, 1, 77]),
    "bigbird": P.bigbird(block=16, random_blocks=2),
    "traced_mask": ac.mask(lambda b, h, q, k: ((q - k) % 5 != 2) & (k <= q)),
}


@pytest.mark.parametrize("Lq", [1, 3])
@pytest.mark.parametrize("name", list(CASES))
def test_decode_split_matches_oracle(monkeypatch, calls, name, Lq):
    pattern = CASES[name]
    q, k, v = _qkv(Lq, LK, seed=len(name) + Lq)
    out = _run(monkeypatch, pattern, q, k, v, 3)
    assert len(calls) == 1
    _check(out, _oracle(pattern, q, k, v), (q, k, v))


def test_auto_splits_a_long_decode_row(monkeypatch, calls):
    pattern = ac.sliding_window(170).causal()  # 11 or 12 key blocks of 16 per decode row
    q, k, v = _qkv(1, LK, seed=11)
    out = _run(monkeypatch, pattern, q, k, v, "auto")
    assert len(calls) == 1 and calls[0][0].shape[0] >= 2
    _check(out, _oracle(pattern, q, k, v), (q, k, v))


def test_documents_with_cu_seqlens_split(monkeypatch, calls):
    cu = [0, 40, 41, 150, LK]
    pattern = ac.document() & ac.causal()
    bound = ac.document([40, 1, 109, LK - 150]) & ac.causal()
    for Lq in (1, 3):
        q, k, v = _qkv(Lq, LK, seed=40 + Lq)
        out = _run(monkeypatch, pattern, q, k, v, 5, cu_seqlens=torch.tensor(cu))
        _check(out, _oracle(bound, q, k, v), (q, k, v))
    assert len(calls) == 2


@pytest.mark.parametrize("split", [2, 7])  # 7: one key block per chunk (the rows have 7)
def test_forced_split_equals_unsplit(monkeypatch, calls, split):
    pattern = ac.sliding_window(60).causal() | ac.global_tokens([3, 100])
    q, k, v = _qkv(3, LK, seed=split)
    with torch.no_grad():
        plain = _run(monkeypatch, pattern, q, k, v, 0)
        assert not calls
        cut = _run(monkeypatch, pattern, q, k, v, split)
    assert len(calls) == 1 and calls[0][0].shape[0] == split
    torch.testing.assert_close(cut, plain, rtol=1e-5, atol=1e-5)


def test_chunks_and_rows_without_visible_keys(monkeypatch, calls):
    # Decode rows 210..212: 210 sees no key at all; 211 sees only its recent keys, so the chunk
    # holding key block 0 (which row 212 sees) has nothing for it and its partial lse is -inf.
    pattern = ac.mask(lambda b, h, q, k: (q % 3 != 0) & (k <= q) & ((k > q - 8) | ((q % 2 == 0) & (k < 16))))
    q, k, v = _qkv(3, LK, seed=7)
    out = _run(monkeypatch, pattern, q, k, v, 14)
    lse_p, lse = calls[0]
    ref = _oracle(pattern, q, k, v)
    _check(out, ref, (q, k, v))
    empty = ref.abs().sum(-1) == 0  # rows with no visible key
    assert empty.any() and (~empty).any()
    assert torch.isneginf(lse[empty]).all() and torch.isfinite(lse[~empty]).all()
    assert torch.isneginf(lse_p[:, ~empty]).any(), "some chunk of a visible row saw no key"
    assert (out.detach()[empty] == 0).all()


def test_no_split_for_prefill_or_short_rows(monkeypatch, calls):
    pattern = ac.causal()
    q, k, v = _qkv(40, LK, seed=3)  # Lq > block_m: the plain kernel
    _run(monkeypatch, pattern, q, k, v, "auto")
    q, k, v = _qkv(1, 100, seed=4)  # 7 key blocks: too few to split
    _run(monkeypatch, pattern, q, k, v, "auto")
    assert not calls


def test_bad_split_setting_is_a_schedule_error(monkeypatch):
    q, k, v = _qkv(1, LK, seed=5)
    with pytest.raises(ScheduleError, match="ATTNC_SPLIT_K='1'"):
        _run(monkeypatch, ac.causal(), q, k, v, 1)


_AOT = """
import torch, attncompiler as ac
from attncompiler.codegen.triton.aot import compile_for_target
ks = compile_for_target(ac.sliding_window(64).causal(), torch.bfloat16, head_dim=64, arch=90,
                        only=("_attn_fwd_split",), resources=True)
print([(k.name, k.registers, k.spill_stores, k.spill_loads, k.shared_bytes) for k in ks])
"""


@pytest.mark.slow
def test_split_kernel_compiles_for_sm90_without_spills(tmp_path):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["ATTNC_CACHE_DIR"] = str(tmp_path)
    res = subprocess.run([sys.executable, "-c", _AOT], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    (name, regs, st, ld, shared), = eval(res.stdout.strip().splitlines()[-1])
    assert name == "_attn_fwd_split" and 0 < regs <= 255 and (st, ld) == (0, 0) and shared > 0
