"""Call-time positions: ``q_offset`` / ``align``, runtime documents (``cu_seqlens``), key padding
(``kv_lens``), ``check_finite`` off by default and no host sync in the forward of mask patterns.

Every case is checked against the independent dense masked-softmax oracle of ``tests/oracle.py``
with the mask written from ``to_dense`` here (rows ``q_offset..`` of the mask at length
``q_offset + Lq``), forward and backward.
"""

import time

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import attncompiler as ac
from attncompiler import patterns
from attncompiler.errors import InputError, UnexpectedArgumentError
from attncompiler.layout.block_layout import build_layout
from attncompiler.program.schedule import Schedule
from attncompiler.runtime.module import compile_program
from oracle import assert_matches_oracle, dense_block_kinds, masked_softmax_attention

SMALL = Schedule(block_m=16, block_n=16)


def _qkv(B, H, Hkv, Lq, Lk, D=8, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Lq, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, Lk, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, Lk, D, generator=g, dtype=torch.float64)
    q, k, v = (t.float().requires_grad_(grad) for t in (q, k, v))
    return q, k, v


def _mask(pattern, B, H, Lq, Lk, offsets, kv_lens=None):
    """``[B, H, Lq, Lk]`` bool: rows ``off..off+Lq-1`` of the dense mask at ``(off + Lq, kv_len)``."""
    m = torch.zeros(B, H, Lq, Lk, dtype=torch.bool)
    for b in range(B):
        n = Lk if kv_lens is None else int(kv_lens[b])
        if n:
            m[b, :, :, :n] = pattern.to_dense(int(offsets[b]) + Lq, n)[int(offsets[b]):]
    return m


def _oracle(q, k, v, mask):
    return masked_softmax_attention(q, k, v, mask, q.shape[-1] ** -0.5)[0]


def test_decode_loop_one_module_matches_oracle_every_step():
    p = ac.sliding_window(9).causal()
    attn = ac.compile(p, backend="torch", schedule=SMALL)
    program = attn.program
    programs_before = compile_program.cache_info().currsize
    B, H, Hkv = 2, 4, 2
    _, k_all, v_all = _qkv(B, H, Hkv, 1, 80, seed=1)
    for step in range(50):
        Lk = 30 + step
        q = torch.randn(B, H, 1, 8)
        k, v = k_all[:, :, :Lk], v_all[:, :, :Lk]
        out = attn(q, k, v, align="bottom_right")
        want = _oracle(q, k, v, _mask(p, B, H, 1, Lk, [Lk - 1] * B))
        torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=2e-5)
        ref = ac.reference(p, q, k, v, align="bottom_right")
        torch.testing.assert_close(ref, want, rtol=1e-10, atol=1e-10)
    assert attn.program is program
    assert compile_program.cache_info().currsize == programs_before  # no program per step
    assert build_layout.cache_info().currsize <= build_layout.cache_info().maxsize  # bounded LRU


def test_per_batch_offsets_forward_backward():
    p = ac.sliding_window(6) & ac.causal() | ac.global_tokens([0, 3])
    B, H, Hkv, Lq, Lk = 4, 4, 2, 5, 41
    q, k, v = _qkv(B, H, Hkv, Lq, Lk, seed=2, grad=True)
    offsets = torch.tensor([0, 36, 17, 36])
    out = ac.compile(p, backend="torch", schedule=SMALL)(q, k, v, q_offset=offsets)
    ref = _oracle(q, k, v, _mask(p, B, H, Lq, Lk, offsets.tolist()))
    assert_matches_oracle(out, ref, (q, k, v))
    torch.testing.assert_close(ac.reference(p, q, k, v, q_offset=offsets), ref, rtol=1e-12, atol=1e-12)


def test_chunked_prefill_equals_one_call():
    p = ac.sliding_window(11).causal()
    attn = ac.compile(p, backend="torch", schedule=SMALL)
    B, H, L = 1, 2, 35
    q, k, v = _qkv(B, H, H, L, L, seed=3)
    whole = attn(q, k, v)
    for start in range(0, L, 7):
        Lk = start + 7
        part = attn(q[:, :, start:start + 7], k[:, :, :Lk], v[:, :, :Lk], q_offset=start)
        torch.testing.assert_close(part, whole[:, :, start:start + 7], rtol=1e-5, atol=1e-6)
        part_br = attn(q[:, :, start:start + 7], k[:, :, :Lk], v[:, :, :Lk], align="bottom_right")
        torch.testing.assert_close(part_br, part, rtol=0, atol=0)


@pytest.mark.parametrize("pattern", [
    ac.strided(4), ac.global_tokens([1, 20, 33]), ac.dilated_window(3, 2), ac.prefix_lm(9) & ac.sliding_window(5),
    ac.random_blocks(2, 8, seed=3), ac.document([5, 1, 20, 30]) & ac.causal(), ~ac.block_local(8),
    ac.mask(lambda b, h, q, k: (q - k) % 5 == 0), ac.strided(16),
])
@pytest.mark.parametrize("q_start", [0, 3, 16, 29])
def test_offset_layout_equals_rows_of_dense_layout(pattern, q_start):
    Lq, Lk, bm, bn = 21, 52, 8, 8
    lay = build_layout(pattern, Lq, Lk, bm, bn, q_start=q_start)
    dense = pattern.to_dense(q_start + Lq, Lk)[q_start:]
    want = dense_block_kinds(ac.mask(lambda b, h, q, k: dense[q, k]), Lq, Lk, bm, bn)
    np.testing.assert_array_equal(lay.block_kinds()[0, 0], want)


def test_one_row_layout_is_proportional_to_its_blocks():
    p = ac.sliding_window(4096).causal()
    Lk = 131072
    t0 = time.perf_counter()
    lay = build_layout(p, 1, Lk, 64, 64, q_start=Lk - 1)
    elapsed = time.perf_counter() - t0
    assert lay.num_q_blocks == 1 and lay.num_blocks == 65
    assert elapsed < 0.5, f"one-row layout took {elapsed:.3f} s"


@pytest.mark.parametrize("extra", [ac.causal(), ac.sliding_window(4), ac.full()])
def test_cu_seqlens_with_empty_and_single_documents(extra):
    p = ac.document() & extra
    attn = ac.compile(p, backend="torch", schedule=SMALL)
    B, H, Hkv, L = 2, 2, 1, 40
    q, k, v = _qkv(B, H, Hkv, L, L, seed=4, grad=True)
    cu = torch.tensor([0, 0, 1, 13, 13, 14, 33, 40], dtype=torch.int32)  # empty and length-1 documents
    out = attn(q, k, v, cu_seqlens=cu)
    bound = ac.document([1, 12, 1, 19, 7]) & extra
    ref = _oracle(q, k, v, _mask(bound, B, H, L, L, [0] * B))
    assert_matches_oracle(out, ref, (q, k, v))
    torch.testing.assert_close(ac.reference(p, q, k, v, cu_seqlens=cu.long()), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("extra", [ac.causal(), ac.sliding_window(3).causal()])
def test_per_batch_cu_seqlens_forward_backward(extra):
    p = ac.document() & extra
    B, H, Hkv, L = 3, 2, 1, 29
    q, k, v = _qkv(B, H, Hkv, L, L, seed=9, grad=True)
    q_big = (q * 40).detach().requires_grad_()  # logits of a few hundred
    rows = [[0, 0, 1, 13, 29], [0, 10, 20, 29, 29], [0, 0, 1, 13, 29]]  # entries 0 and 2 share documents
    cu = torch.tensor(rows, dtype=torch.int32)
    out = ac.compile(p, backend="torch", schedule=SMALL)(q_big, k, v, cu_seqlens=cu)
    mask = torch.stack([(ac.document([int(n) for n in np.diff(r) if n]) & extra).to_dense(L).expand(H, L, L)
                        for r in rows])
    ref = _oracle(q_big, k, v, mask)
    # logits of a few hundred: float32 rounding of the scores (~1e-4 relative) reaches dk; the
    # fused kernels and the plan path both land at about 4e-4 on the largest entries here
    assert_matches_oracle(out, ref, (q_big, k, v), grad_rtol=3e-4)
    torch.testing.assert_close(ac.reference(p, q_big, k, v, cu_seqlens=cu), ref, rtol=1e-12, atol=1e-12)
    same = ac.compile(p, backend="torch", schedule=SMALL)(q_big, k, v, cu_seqlens=cu[0])  # one row for all
    torch.testing.assert_close(same[0], out[0], rtol=1e-6, atol=1e-6)


def test_kv_lens_padding_with_documents_and_decode():
    p = ac.document() & ac.sliding_window(10).causal()
    attn = ac.compile(p, backend="torch", schedule=SMALL)
    B, H, Hkv, Lq, Lk = 3, 2, 2, 2, 37
    q, k, v = _qkv(B, H, Hkv, Lq, Lk, seed=5, grad=True)
    cu = torch.tensor([0, 12, 30, 37])
    kv_lens = torch.tensor([37, 20, 2])
    out = attn(q, k, v, cu_seqlens=cu, kv_lens=kv_lens, align="bottom_right")
    bound = ac.document([12, 18, 7]) & ac.sliding_window(10).causal()
    ref = _oracle(q, k, v, _mask(bound, B, H, Lq, Lk, (kv_lens - Lq).tolist(), kv_lens))
    assert_matches_oracle(out, ref, (q, k, v))
    torch.testing.assert_close(ac.reference(p, q, k, v, cu_seqlens=cu, kv_lens=kv_lens, align="bottom_right"),
                               ref, rtol=1e-12, atol=1e-12)


def test_kv_lens_zero_gives_zero_rows():
    attn = ac.compile(ac.causal(), backend="torch", schedule=SMALL)
    q, k, v = _qkv(2, 2, 2, 4, 9, seed=6)
    out, lse = attn(q, k, v, kv_lens=torch.tensor([0, 9]), return_lse=True)
    assert (out[0] == 0).all() and torch.isinf(lse[0]).all()
    torch.testing.assert_close(out[1:], attn(q[1:], k[1:], v[1:]))


@pytest.mark.parametrize("cu, message", [
    (torch.tensor([0, 5, 3, 12]), "non-decreasing"),
    (torch.tensor([0, 5, 11]), "end at"),
    (torch.tensor([0.0, 5.0, 12.0]), "dtype"),
    (torch.tensor([[[0, 5, 12]]]), r"\[batch, num_docs \+ 1\]"),
    (torch.tensor([[0, 5, 12], [0, 6, 12]]), r"shape \[batch, num_docs \+ 1\] = \[1, n \+ 1\]"),
    (torch.tensor([[0, 5, 11]]), r"cu_seqlens\[0\]: .*end at"),
    (torch.tensor([1, 5, 12]), "start at 0"),
    (torch.tensor([0, -1, 12]), "non-decreasing|negative"),
    ([0, 5, 12], "torch.Tensor"),
])
def test_bad_cu_seqlens_is_an_input_error(cu, message):
    attn = ac.compile(ac.document(), backend="torch")
    q, k, v = _qkv(1, 1, 1, 12, 12)
    with pytest.raises(InputError, match=message):
        attn(q, k, v, cu_seqlens=cu)
    with pytest.raises(InputError, match=message):
        ac.reference(ac.document(), q, k, v, cu_seqlens=cu)


@pytest.mark.parametrize("kwargs, message", [
    ({}, "cu_seqlens"),
    ({"q_offset": -1}, ">= 0"),
    ({"q_offset": torch.tensor([1, 2])}, "shape"),
    ({"q_offset": 1.5}, "integer"),
    ({"align": "center"}, "align"),
    ({"align": "bottom_right", "q_offset": 2}, "not both"),
    ({"kv_lens": torch.tensor([13])}, "<= 12"),
])
def test_bad_positions_are_input_errors(kwargs, message):
    q, k, v = _qkv(1, 1, 1, 12, 12)
    pattern = ac.document() if not kwargs else ac.causal()
    with pytest.raises(InputError, match=message):
        ac.compile(pattern, backend="torch")(q, k, v, **kwargs)


def test_cu_seqlens_needs_a_runtime_document():
    q, k, v = _qkv(1, 1, 1, 12, 12)
    with pytest.raises(InputError, match="no ac.document"):
        ac.compile(ac.causal(), backend="torch")(q, k, v, cu_seqlens=torch.tensor([0, 12]))
    with pytest.raises(InputError, match="cu_seqlens"):
        ac.document().to_dense(12)


def test_other_families_reject_positions():
    q, k, v = _qkv(1, 2, 2, 16, 16)
    with pytest.raises(UnexpectedArgumentError, match="q_offset"):
        ac.compile(patterns.combiner_fixed(span=4), backend="torch")(q, k, v, q_offset=3)
    with pytest.raises(UnexpectedArgumentError, match="kv_lens"):
        ac.reference(patterns.combiner_fixed(span=4), q, k, v, kv_lens=torch.tensor([3]))


def test_check_finite_is_off_by_default_and_kept_as_an_option():
    q, k, v = _qkv(1, 1, 1, 8, 8)
    q = q.clone()
    q[0, 0, 0, 0] = float("nan")
    ac.compile(ac.causal(), backend="torch")(q, k, v)  # no pass over the inputs, no error
    with pytest.raises(InputError, match="NaN"):
        ac.compile(ac.causal(), backend="torch", check_finite=True)(q, k, v)


class _ScalarReads(TorchDispatchMode):
    """Counts reads of tensor values on the host (``.item()``, ``bool(t)``, ``.tolist()``)."""

    READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default}

    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            self.reads += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("pattern", [
    ac.sliding_window(5).causal(), ac.mask(lambda b, h, q, k: (q - k) % 3 != 1), ac.document([10, 23])])
@pytest.mark.parametrize("kwargs", [{}, {"align": "bottom_right"}])
def test_forward_and_backward_read_no_tensor_values(pattern, kwargs):
    attn = ac.compile(pattern, backend="torch", schedule=SMALL)
    q, k, v = _qkv(2, 2, 1, 33, 33, seed=7, grad=True)
    attn(q, k, v, **kwargs).sum().backward()  # warm the layout and mask caches
    with _ScalarReads() as mode:
        attn(q, k, v, **kwargs).sum().backward()
    assert mode.reads == 0
    with _ScalarReads() as mode:  # the detector sees a finiteness check
        ac.compile(pattern, backend="torch", check_finite=True)(q, k, v)
    assert mode.reads > 0


# --- Triton backend (TRITON_INTERPRET=1 on CPU): the predicate sees absolute rows q_start + i ---

def _triton_keys(monkeypatch) -> list[str]:
    """Records the key of every generated kernel module the Triton runtime asks for."""
    from attncompiler.codegen.triton import kernels

    keys, real = [], kernels.kernels_for

    def spy(*args, **kwargs):
        kern = real(*args, **kwargs)
        keys.append(kern.key)
        return kern

    monkeypatch.setattr(kernels, "kernels_for", spy)
    return keys


def test_triton_decode_loop_one_module_one_kernel(monkeypatch):
    p = ac.sliding_window(9).causal()
    attn = ac.compile(p, backend="triton", schedule=SMALL)
    keys = _triton_keys(monkeypatch)
    B, H, Hkv = 2, 2, 1
    _, k_all, v_all = _qkv(B, H, Hkv, 1, 40, seed=11)
    for step in range(10):
        Lk = 19 + step  # crosses a key-block boundary
        q = torch.randn(B, H, 1, 8)
        k, v = k_all[:, :, :Lk], v_all[:, :, :Lk]
        out = attn(q, k, v, align="bottom_right")
        torch.testing.assert_close(out.double(), ac.reference(p, q, k, v, align="bottom_right"),
                                   rtol=1e-5, atol=2e-5)
    assert len(keys) == 10 and len(set(keys)) == 1  # one kernel for every offset and key length


@pytest.mark.parametrize("pattern", [ac.sliding_window(6) & ac.causal() | ac.global_tokens([0, 3]),
                                     ac.mask(lambda b, h, q, k: (q - k) % 3 != 1)],  # byte-mask path
                         ids=["predicate", "opaque"])
def test_triton_per_batch_offsets_forward_backward(pattern):
    q, k, v = _qkv(3, 2, 1, 5, 41, seed=12, grad=True)
    offsets = torch.tensor([0, 36, 17])
    out = ac.compile(pattern, backend="triton", schedule=SMALL)(q, k, v, q_offset=offsets)
    assert_matches_oracle(out, ac.reference(pattern, q, k, v, q_offset=offsets), (q, k, v))


def test_triton_chunked_prefill_forward_backward():
    p = ac.sliding_window(10).causal()
    attn = ac.compile(p, backend="triton", schedule=SMALL)
    _, k, v = _qkv(1, 2, 2, 1, 35, seed=13)
    for off in (0, 7, 21, 28):  # chunks of 7 rows: block-unaligned offsets
        q, kc, vc = (t.detach().clone().requires_grad_(True) for t in (torch.randn(1, 2, 7, 8), k, v))
        out = attn(q, kc, vc, q_offset=off)
        assert_matches_oracle(out, ac.reference(p, q, kc, vc, q_offset=off), (q, kc, vc))


def test_triton_kv_lens_bottom_right_forward_backward():
    p = ac.sliding_window(7).causal()
    q, k, v = _qkv(3, 2, 1, 3, 33, seed=14, grad=True)
    kv_lens = torch.tensor([20, 33, 9])
    out = ac.compile(p, backend="triton", schedule=SMALL)(q, k, v, kv_lens=kv_lens, align="bottom_right")
    assert_matches_oracle(out, ac.reference(p, q, k, v, kv_lens=kv_lens, align="bottom_right"), (q, k, v))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("Lq, Lk, offset", [(1, 75, 74), (3, 75, 72), (5, 60, 20)])
def test_fused_key_range_decode_matches_oracle(monkeypatch, dtype, Lq, Lk, offset):
    """Decode steps whose keys are one contiguous range run as one fused call on the K/V slice
    (partial edge blocks masked, GQA folded); forward, lse and gradients match the oracle."""
    from attncompiler.codegen.pytorch import attention as torch_attention

    used = []
    real = torch_attention.key_range_forward

    def spy(*args):
        res = real(*args)
        used.append(res is not None)
        return res

    monkeypatch.setattr(torch_attention, "key_range_forward", spy)
    p = ac.sliding_window(21).causal()  # window edges fall inside blocks of 16
    B, H, Hkv = 2, 6, 2
    q, k, v = (t.detach().to(dtype).requires_grad_(True) for t in _qkv(B, H, Hkv, Lq, Lk, seed=7))
    out, lse = ac.compile(p, backend="torch", schedule=SMALL)(q, k, v, q_offset=offset, return_lse=True)
    assert used and all(used)
    ref, ref_lse = masked_softmax_attention(q, k, v, _mask(p, B, H, Lq, Lk, [offset] * B), q.shape[-1] ** -0.5)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else {}
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(lse.double(), ref_lse, **(tol or dict(rtol=1e-5, atol=2e-5)))
    assert_matches_oracle(out, ref, (q, k, v), **(dict(tol, grad_rtol=1e-9, grad_atol=1e-9) if tol else {}))


def test_offsets_beyond_the_index_domain_raise_instead_of_wrapping():
    """A q_offset past int64 arithmetic is refused; on Triton, past the int32 domain its predicates
    are proven for (the rendered int32/int64 choice would otherwise wrap silently)."""
    x = torch.randn(1, 1, 4, 16)
    with pytest.raises(ac.InputError, match="q_offset"):
        ac.compile(ac.causal(), backend="torch")(x, x, x, q_offset=2**62)
    pytest.importorskip("triton")
    with pytest.raises(ac.UnsupportedError, match="q_offset"):
        ac.compile(ac.sliding_window(4), backend="triton")(x, x, x, q_offset=2**31)


@pytest.mark.parametrize("pattern, Lk, Lq", [
    ((ac.sliding_window(9) | ac.global_tokens([0, 1, 2])).causal(), 75, 1),
    ((ac.sliding_window(5) | ac.global_tokens([3, 20])).causal(), 61, 3),  # three runs, partial edges
    (patterns.bigbird(block=16, window_blocks=1, global_blocks=1, random_blocks=1, seed=3), 97, 1)])
def test_split_k_decode_matches_oracle(monkeypatch, pattern, Lk, Lq):
    from attncompiler.codegen.pytorch import attention, decode

    calls = []

    def spy(*args):
        result = decode.split_k_forward(*args)
        calls.append(result is not None)
        return result

    monkeypatch.setattr(attention, "split_k_forward", spy)
    q, k, v = _qkv(2, 4, 2, Lq, Lk, seed=21, grad=True)
    q_big = (q * 40).detach().requires_grad_()  # logits of a few hundred
    out = ac.compile(pattern, backend="torch", schedule=SMALL)(q_big, k, v, align="bottom_right")
    assert any(calls), "the split-K path did not run"
    ref = _oracle(q_big, k, v, _mask(pattern, 2, 4, Lq, Lk, [Lk - Lq] * 2))
    assert_matches_oracle(out, ref, (q_big, k, v))
