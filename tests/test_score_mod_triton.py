"""score_mod and sinks rendered into the Triton kernels (under the interpreter on CPU): forward and
backward against the float64 reference, GQA, odd lengths, q_offset, large logits; captured
tensors' gradients (through the torch backward); what the kernels refuse."""

import pytest
import torch

import attncompiler as ac
from attncompiler.errors import InputError, UnsupportedError

pytest.importorskip("triton")
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # sigmoid of -300

H, HKV, D = 4, 2, 16
SCHED = ac.Schedule(block_m=16, block_n=16)


def qkv(B=1, Lq=37, Lk=37, mag=6.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, H, Lq, D, generator=g) * mag).requires_grad_()
    k = (torch.randn(B, HKV, Lk, D, generator=g) * mag).requires_grad_()
    v = torch.randn(B, HKV, Lk, D, generator=g).requires_grad_()
    return q, k, v


def compare(out, ref, inputs, atol=2e-5, grad_tol=2e-4):
    torch.testing.assert_close(out.double(), ref, rtol=2e-5, atol=atol)
    up = torch.randn_like(ref)
    got = torch.autograd.grad(out, inputs, up.float(), allow_unused=True, retain_graph=True)
    want = torch.autograd.grad(ref, inputs, up, allow_unused=True)
    for i, (a, b) in enumerate(zip(got, want)):
        err = (a.double() - b).abs().max() / b.abs().max()
        assert err < grad_tol, f"input {i}: relative gradient error {float(err):.3g}"


def user_mod(s, b, h, q_idx, kv_idx):
    d = (q_idx - kv_idx).abs().float()
    return torch.where(q_idx >= kv_idx, s * 0.5 + torch.sigmoid(s) * 3.0, s - torch.log1p(d))


MODS = {
    "softcap": lambda: ac.softcap(20.0),
    "alibi": lambda: ac.alibi(ac.alibi_slopes(H)),
    "softcap_relative_bias": lambda: ac.softcap(30.0) @ ac.relative_bias(torch.randn(H, 32, generator=torch.Generator().manual_seed(2)) * 2, max_distance=16),
    "user": lambda: user_mod,
}


@pytest.mark.parametrize("name", list(MODS))
def test_kernels_match_reference(name):
    mod = MODS[name]()
    p = ac.sliding_window(9) | ac.global_tokens([0])
    q, k, v = qkv(seed=len(name))  # logits up to a few hundred
    out = ac.compile(p, backend="triton", score_mod=mod, schedule=SCHED)(q, k, v)
    compare(out, ac.reference(p, q, k, v, score_mod=mod), [q, k, v])


def test_decode_offset_and_sinks():
    sinks = torch.randn(H, generator=torch.Generator().manual_seed(4)).requires_grad_()
    mod = ac.softcap(15.0) @ ac.alibi(ac.alibi_slopes(H))
    p = ac.causal()
    q, k, v = qkv(B=2, Lq=5, Lk=41, seed=3)
    m = ac.compile(p, backend="triton", score_mod=mod, sinks=sinks, schedule=SCHED)
    out = m(q, k, v, q_offset=30)
    compare(out, ac.reference(p, q, k, v, score_mod=mod, sinks=sinks, q_offset=30), [q, k, v, sinks])


def test_captured_gradients_and_bias():
    g = torch.Generator().manual_seed(3)
    table = (torch.randn(H, 32, generator=g) * 2).requires_grad_()
    bias = (torch.randn(H, 37, 37, generator=g) * 3).requires_grad_()
    mod = ac.relative_bias(table) @ ac.bias(bias)
    p = ac.causal()
    q, k, v = qkv(seed=4)
    out = ac.compile(p, backend="triton", score_mod=mod, schedule=SCHED)(q, k, v)
    compare(out, ac.reference(p, q, k, v, score_mod=mod), [q, k, v, table, bias])


def test_refusals():
    q, k, v = qkv(Lq=17, Lk=17)
    with pytest.raises(UnsupportedError, match="opaque"):
        ac.compile(ac.causal(), backend="triton", score_mod=lambda s, b, h, qi, ki: torch.sort(s, -1)[0],
                   schedule=SCHED)(q, k, v)
    small = torch.zeros(H, 9, 17)  # too few query positions for Lq=17
    with pytest.raises(InputError, match="shape"):
        ac.compile(ac.causal(), backend="triton", score_mod=lambda s, b, h, qi, ki: s + small[h, qi, ki],
                   schedule=SCHED)(q, k, v)


def test_diagonal_bias_is_rendered_with_its_gradient():
    g = torch.Generator().manual_seed(6)
    t = (torch.randn(H, 2 * 41 - 1, generator=g) * 3).requires_grad_()
    p = ac.sliding_window(7)
    q, k, v = qkv(seed=7)
    mod = ac.softcap(30.0) @ ac.bias(t, diagonal=True)
    out = ac.compile(p, backend="triton", score_mod=mod, schedule=SCHED)(q, k, v)
    compare(out, ac.reference(p, q, k, v, score_mod=mod), [q, k, v, t])
