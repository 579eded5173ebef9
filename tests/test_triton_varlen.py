"""Runtime documents (``cu_seqlens``) on the Triton backend, under the interpreter on CPU.

The kernels read document ids from their runtime table, so one generated kernel serves every
``cu_seqlens`` of a module. Each case is compared with the float64 oracle of ``tests/oracle.py``
(the mask written from ``to_dense`` of the pattern with the lengths bound by hand), forward and
backward, with logits of a few hundred, odd lengths, empty and length-1 documents and several
schedules.
"""

import numpy as np
import pytest
import torch

import attncompiler as ac
from attncompiler.errors import InputError
from attncompiler.program.schedule import Schedule
from oracle import masked_softmax_attention

pytest.importorskip("triton")
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")

H, HKV, D = 4, 2, 16


def _qkv(B, Lq, Lk, seed, mag=5.0):
    """q, k with entries of size ``mag`` (logits of a few hundred at D=16), v of size 1."""
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, H, Lq, D, generator=g, dtype=torch.float64) * mag).float().requires_grad_()
    k = (torch.randn(B, HKV, Lk, D, generator=g, dtype=torch.float64) * mag).float().requires_grad_()
    v = torch.randn(B, HKV, Lk, D, generator=g, dtype=torch.float64).float().requires_grad_()
    return q, k, v


def _lengths(cu) -> list[int]:
    """The non-empty document lengths of ``cu_seqlens`` (what ``ac.document(lengths)`` takes)."""
    return [int(n) for n in np.diff(np.asarray(cu)) if n > 0]


def _oracle(extra, q, k, v, cu, q_offset=0):
    """float64 attention with the mask of ``ac.document(lengths) & extra``, rows ``q_offset..``."""
    Lq, Lk = q.shape[2], k.shape[2]
    bound = ac.document(_lengths(cu)) if extra is None else ac.document(_lengths(cu)) & extra
    mask = bound.to_dense(q_offset + Lq, Lk)[q_offset:].expand(q.shape[0], H, Lq, Lk)
    return masked_softmax_attention(*(t.double() for t in (q, k, v)), mask, D ** -0.5)[0]


def _check(out, ref, inputs):
    torch.testing.assert_close(out.double(), ref, rtol=2e-5, atol=2e-5)
    up = torch.randn_like(ref)
    got = torch.autograd.grad(out, inputs, up.float(), retain_graph=True)
    want = torch.autograd.grad(ref, inputs, up)
    for i, (a, b) in enumerate(zip(got, want)):
        err = float((a.double() - b).abs().max() / b.abs().max())
        assert err < 2e-4, f"input {i}: relative gradient error {err:.3g}"


def _kernel_keys(monkeypatch) -> list[str]:
    """Records the key of every generated kernel module the Triton runtime asks for."""
    from attncompiler.codegen.triton import kernels

    keys, real = [], kernels.kernels_for

    def spy(*args, **kwargs):
        kern = real(*args, **kwargs)
        keys.append(kern.key)
        return kern

    monkeypatch.setattr(kernels, "kernels_for", spy)
    return keys


CUS = [[0, 0, 1, 13, 13, 14, 33, 41],  # empty and length-1 documents
       [0, 41],  # one document
       [0, 1, 2, 3, 40, 41],  # length-1 documents at both ends
       [0, 17, 30, 41, 41]]  # an empty document last


@pytest.mark.parametrize("extra", [None, ac.causal(), ac.sliding_window(5), ac.sliding_window(6).causal()],
                         ids=["document", "causal", "window", "window_causal"])
def test_one_kernel_for_every_cu_seqlens_matches_oracle(monkeypatch, extra):
    p = ac.document() if extra is None else ac.document() & extra
    attn = ac.compile(p, backend="triton", schedule=Schedule(block_m=16, block_n=16))
    keys = _kernel_keys(monkeypatch)
    for i, cu in enumerate(CUS):
        q, k, v = _qkv(2, 41, 41, seed=i)
        cu_t = torch.tensor(cu, dtype=torch.int32 if i % 2 else torch.int64)
        out = attn(q, k, v, cu_seqlens=cu_t)
        _check(out, _oracle(extra, q, k, v, cu), (q, k, v))
    assert keys and len(set(keys)) == 1, f"{len(set(keys))} kernels for {len(CUS)} cu_seqlens"


@pytest.mark.parametrize("block_m, block_n, seed", [(16, 32, 0), (32, 16, 1), (64, 16, 2)])
def test_random_documents_and_schedules(block_m, block_n, seed):
    rng = np.random.default_rng(seed)
    L = int(rng.integers(30, 70)) | 1  # odd
    ends = np.sort(rng.integers(0, L + 1, size=int(rng.integers(1, 7))))
    cu = [0, *ends.tolist(), L]
    extra = ac.sliding_window(int(rng.integers(2, 12))).causal()
    q, k, v = _qkv(1, L, L, seed=10 + seed)
    out = ac.compile(ac.document() & extra, backend="triton",
                     schedule=Schedule(block_m=block_m, block_n=block_n))(q, k, v, cu_seqlens=torch.tensor(cu))
    _check(out, _oracle(extra, q, k, v, cu), (q, k, v))


def test_documents_with_decode_offsets():
    p = ac.document() & ac.causal()
    attn = ac.compile(p, backend="triton", schedule=Schedule(block_m=16, block_n=16))
    cu = [0, 9, 10, 26, 37]
    for Lq in (1, 3, 11):  # decode steps and a chunk against the whole cache
        q, k, v = _qkv(2, Lq, 37, seed=20 + Lq)
        out = attn(q, k, v, cu_seqlens=torch.tensor(cu), align="bottom_right")
        _check(out, _oracle(ac.causal(), q, k, v, cu, q_offset=37 - Lq), (q, k, v))


def test_bad_cu_seqlens_is_an_input_error_on_triton():
    attn = ac.compile(ac.document() & ac.causal(), backend="triton", schedule=Schedule(block_m=16, block_n=16))
    q, k, v = _qkv(1, 16, 16, seed=30)
    for cu, message in (([0, 9, 5, 16], "non-decreasing"), ([0, 5, 15], "end at"), ([1, 16], "start at 0")):
        with pytest.raises(InputError, match=message):
            attn(q, k, v, cu_seqlens=torch.tensor(cu))
    with pytest.raises(InputError, match="dtype"):
        attn(q, k, v, cu_seqlens=torch.tensor([0.0, 16.0]))


def test_generated_source_names_documents_without_lengths():
    from attncompiler.codegen.triton.kernels import kernels_for

    sched = Schedule(block_m=16, block_n=16)
    a = kernels_for(ac.document([5, 27]) & ac.causal(), 32, 32, sched, torch.float32)
    b = kernels_for(ac.document([1, 1, 30]) & ac.causal(), 32, 32, sched, torch.float32)
    assert a.key == b.key and a.path == b.path
    text = a.path.read_text()
    assert "ac.document() & ac.causal()" in text and "[5, 27]" not in text


def test_per_batch_cu_seqlens_one_kernel(monkeypatch):
    p = ac.document() & ac.sliding_window(4).causal()
    attn = ac.compile(p, backend="triton", schedule=Schedule(block_m=16, block_n=16))
    keys = _kernel_keys(monkeypatch)
    rows = [[0, 0, 1, 13, 27], [0, 9, 18, 27, 27], [0, 27, 27, 27, 27]]
    q, k, v = _qkv(3, 27, 27, seed=40)
    out = attn(q, k, v, cu_seqlens=torch.tensor(rows, dtype=torch.int32))
    ref = torch.cat([_oracle(ac.sliding_window(4).causal(), *(t[b:b + 1] for t in (q, k, v)), rows[b])
                     for b in range(3)])
    _check(out, ref, (q, k, v))
    assert keys and len(set(keys)) == 1
