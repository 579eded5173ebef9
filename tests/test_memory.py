"""ABC bounded-memory attention: reference vs an independent loop, backends vs reference,
window == sliding window, decoding == parallel, numerical stability, chunk invariance, errors."""

from __future__ import annotations

import types

import pytest
import torch

import attncompiler as ac
from attncompiler.families import memory as M
from attncompiler.errors import InputError, PatternError
from attncompiler.program.schedule import Schedule
from oracle import assert_matches_oracle

CONTROLS = {
    "mlp": M.MLPControl(),
    "linformer": M.LinformerControl(max_len=40),
    "cluster": M.ClusterControl(),
}
# A window memory only exists causally (its bidirectional form is an error, see test_errors).
CASES = [(kind, causal) for kind in ("mlp", "linformer", "cluster", "window") for causal in (True, False)
         if kind != "window" or causal]


def qkv(B=2, H=4, Hkv=2, Lq=19, Lk=19, D=8, Dv=6, dtype=torch.float64, grad=False):
    q = torch.randn(B, H, Lq, D, dtype=dtype, requires_grad=grad)
    k = torch.randn(B, Hkv, Lk, D, dtype=dtype, requires_grad=grad)
    v = torch.randn(B, Hkv, Lk, Dv, dtype=dtype, requires_grad=grad)
    return q, k, v


def loop_attention(kind, n, causal, q, k, v, scale, param=None, logits=None):
    """Straight from the issue's equations, one query, one slot at a time (float64)."""
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    out = torch.zeros(B, H, Lq, v.shape[-1], dtype=torch.float64)
    q, k, v = q.double(), k.double(), v.double()
    for b in range(B):
        for h in range(H):
            g = h // (H // Hkv)
            kk, vv = k[b, g], v[b, g]
            for i in range(Lq):
                seen = list(range(min(i, Lk - 1) + 1)) if causal else list(range(Lk))
                slots_k, slots_v = [], []
                for m in range(n):
                    if kind == "window":
                        j = i - n + 1 + m
                        if 0 <= j < Lk:
                            slots_k.append(kk[j]), slots_v.append(vv[j])
                        continue
                    if kind == "linformer":
                        phi = [param[m, j] for j in seen]
                    elif kind == "mlp":
                        s = logits[b, g, :, m] if logits is not None else kk @ param[:, m]
                        z = sum(torch.exp(s[j]) for j in seen)
                        phi = [torch.exp(s[j]) / z for j in seen]
                    else:  # cluster: running mean of the keys whose nearest centroid is m
                        near = [int(torch.argmin(((kk[j] - param) ** 2).sum(-1))) for j in seen]
                        mine = [j for j, a in zip(seen, near) if a == m]
                        if not mine:
                            continue  # an empty slot holds nothing to read
                        phi = [1.0 / len(mine) if j in mine else 0.0 for j in seen]
                    slots_k.append(sum(p * kk[j] for p, j in zip(phi, seen)))
                    slots_v.append(sum(p * vv[j] for p, j in zip(phi, seen)))
                if slots_k:
                    att = torch.softmax(scale * torch.stack(slots_k) @ q[b, h, i], 0)
                    out[b, h, i] = att @ torch.stack(slots_v)
    return out


def make(kind, n, causal, schedule=None):
    ctl = M.WindowControl() if kind == "window" else CONTROLS[kind]
    attn = ac.compile(M.memory(n, ctl, causal=causal), backend="torch", schedule=schedule)
    return attn


@pytest.mark.parametrize("kind,causal", CASES)
def test_reference_matches_loop(kind, causal):
    q, k, v = qkv(B=1, Lq=11, Lk=11)
    attn = make(kind, 3, causal)
    attn.materialize(8)
    if kind == "cluster":  # centroids at some keys so that several slots get hits
        attn.control_param.data.copy_(k[0, 0, :3].float())
    param = None if attn.control_param is None else attn.control_param.detach().double()
    want = loop_attention(kind, 3, causal, q, k, v, 8 ** -0.5, param)
    got = attn.reference(q, k, v)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind,causal", CASES)
def test_backend_matches_reference_forward_backward(kind, causal):
    attn = make(kind, 5, causal, Schedule(block_m=8, block_n=8))  # 19 tokens: 3 chunks, the last ragged
    q, k, v = qkv(dtype=torch.float32, grad=True)
    attn.materialize(8)
    if kind == "cluster":
        attn.control_param.data.copy_(k[0, 0, :5].detach())
    out = attn(q, k, v)
    ref = attn.reference(q, k, v)
    assert_matches_oracle(out, ref, (q, k, v), rtol=2e-5)


def test_mlp_control_logits_gradient():
    attn = make("mlp", 4, True, Schedule(block_m=4, block_n=4))
    q, k, v = qkv(B=1, Lq=10, Lk=10)
    s = torch.randn(1, 2, 10, 4, dtype=torch.float64, requires_grad=True)
    out = attn(q, k, v, control=s)
    ref = attn.reference(q, k, v, control=s)
    loop = loop_attention("mlp", 4, True, q, k, v, 8 ** -0.5, logits=s.detach())
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(ref.detach(), loop)
    g = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, s, g)[0], torch.autograd.grad(ref, s, g)[0])


def test_window_equals_causal_sliding_window():
    n = 6
    q, k, v = qkv(Lq=23, Lk=23)
    sw = ac.sliding_window(n - 1) & ac.causal()
    want = ac.reference(sw, q, k, v)
    got_ref = ac.reference(M.memory(n, M.WindowControl(), causal=True), q, k, v)
    torch.testing.assert_close(got_ref, want, rtol=1e-12, atol=1e-12)
    attn = make("window", n, True, Schedule(block_m=8, block_n=8))
    torch.testing.assert_close(attn(q, k, v), want, rtol=1e-10, atol=1e-10)
    assert attn.program.stages[0].pattern == sw


@pytest.mark.parametrize("kind", ["mlp", "linformer", "cluster", "window"])
def test_decoding_equals_parallel(kind):
    attn = make(kind, 5, True, Schedule(block_m=4, block_n=4))
    q, k, v = qkv(Lq=13, Lk=13, dtype=torch.float32)
    attn.materialize(8)
    if kind == "cluster":
        attn.control_param.data.copy_(k[1, 1, 4:9])
    want = attn(q, k, v)
    state = attn.init_state(2)
    outs, sizes = [], set()
    for t in range(13):
        o, state = attn.step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], state)
        outs.append(o)
        sizes.add(state.nbytes())
    torch.testing.assert_close(torch.cat(outs, 2), want, rtol=1e-5, atol=1e-5)
    assert len(sizes) == 1  # constant state, O(n D) per head


@pytest.mark.parametrize("causal", [True, False])
def test_large_control_logits_are_stable(causal):
    attn = make("mlp", 4, causal, Schedule(block_m=8, block_n=8))
    q, k, v = qkv(B=1, Lq=21, Lk=21, dtype=torch.float32, grad=True)
    s = (60 * torch.randn(1, 2, 21, 4)).requires_grad_()  # magnitudes well past 30
    out = attn(q, k, v, control=s)
    ref = attn.reference(q, k, v, control=s)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ref)
    got = torch.autograd.grad(out, (q, k, v, s), g.float())
    want = torch.autograd.grad(ref, (q, k, v, s), g)
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-4)


def test_float32_path_for_moderate_logits():
    from attncompiler.codegen.pytorch.memory import SPREAD_LIMIT, logit_spread, write_memory

    k, v = torch.randn(1, 1, 40, 8), torch.randn(1, 1, 40, 8)
    s = 3 * torch.randn(1, 1, 40, 4)
    assert logit_spread(s, 8) < SPREAD_LIMIT
    assert write_memory(k, v, s, True, True, 8).dtype == torch.float32
    assert write_memory(k, v, 30 * s, True, True, 8).dtype == torch.float64


@pytest.mark.parametrize("kind", ["mlp", "cluster", "linformer"])
def test_chunk_size_does_not_change_results(kind):
    q, k, v = qkv(Lq=37, Lk=37, dtype=torch.float32)
    outs = []
    for c, tile in ((1, None), (4, None), (4, 64), (16, None), (64, None)):  # tile 64: one chunk per read group
        attn = make(kind, 7, True, Schedule(block_m=c, block_n=c, tile_elems=tile or 1 << 18))
        torch.manual_seed(1)
        attn.materialize(8)
        if kind == "cluster":
            attn.control_param.data.copy_(k[0, 1, :7])
        outs.append(attn(q, k, v))
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lq,lk", [(9, 20), (20, 9)])
def test_causal_unequal_lengths(lq, lk):
    attn = make("mlp", 3, True, Schedule(block_m=4, block_n=4))
    q, k, v = qkv(Lq=lq, Lk=lk)
    ref = attn.reference(q, k, v)
    param = attn.control_param.detach().double()
    want = loop_attention("mlp", 3, True, q, k, v, 8 ** -0.5, param)
    torch.testing.assert_close(ref, want)
    torch.testing.assert_close(attn(q, k, v), ref)


def test_lse_and_half_precision():
    attn = make("mlp", 4, True, Schedule(block_m=8, block_n=8))
    q, k, v = qkv(dtype=torch.bfloat16)
    out, lse = attn(q, k, v, return_lse=True)
    assert out.dtype == torch.bfloat16 and lse.shape == (2, 4, 19)
    _, ref_lse = attn.reference(q, k, v, return_lse=True)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-3, atol=1e-3)


def test_repr_reads_as_code():
    ns = {"ac": types.SimpleNamespace(memory=M.memory, MLPControl=M.MLPControl, ClusterControl=M.ClusterControl,
                                      LinformerControl=M.LinformerControl, WindowControl=M.WindowControl)}
    for p in (M.memory(64), M.memory(8, M.LinformerControl(max_len=128), causal=True),
              M.memory(4, M.WindowControl(), causal=True), M.memory(2, M.ClusterControl())):
        assert eval(repr(p), ns) == p
        assert hash(eval(repr(p), ns)) == hash(p)


def test_errors():
    with pytest.raises(PatternError, match="slots"):
        M.memory(0)
    with pytest.raises(PatternError, match="causal=True"):
        M.memory(4, M.WindowControl())
    with pytest.raises(PatternError, match="control"):
        M.memory(4, "mlp")
    with pytest.raises(PatternError, match="max_len"):
        M.LinformerControl(max_len=0)
    with pytest.raises(PatternError, match="mask pattern"):
        M.memory(4) | ac.causal()
    q, k, v = qkv(Lq=8, Lk=8)
    with pytest.raises(InputError, match="control logits must be"):
        make("mlp", 4, True)(q, k, v, control=torch.randn(2, 2, 8, 3, dtype=torch.float64))
    with pytest.raises(InputError, match="only accepted"):
        make("cluster", 4, True)(q, k, v, control=torch.randn(2, 2, 8, 4, dtype=torch.float64))
    with pytest.raises(InputError, match="max_len"):
        ac.compile(M.memory(4, M.LinformerControl(max_len=6)), backend="torch")(q, k, v)
    with pytest.raises(PatternError, match="causal"):
        make("mlp", 4, False).init_state(1)


def test_decoding_with_control_logits_and_errors():
    attn = make("mlp", 3, True, Schedule(block_m=4, block_n=4))
    q, k, v = qkv(B=1, Lq=6, Lk=6)
    s = 5 * torch.randn(1, 2, 6, 3, dtype=torch.float64)
    want = attn(q, k, v, control=s)
    state, outs = attn.init_state(1), []
    for t in range(6):
        o, state = attn.step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], state, control=s[:, :, t:t + 1])
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, 2), want)
    with pytest.raises(InputError, match="one token"):
        attn.step(q[:, :, :2], k[:, :, :2], v[:, :, :2], attn.init_state(1))
    with pytest.raises(InputError, match="batch"):
        attn.step(q[:, :, :1], k[:, :, :1], v[:, :, :1], attn.init_state(2))
    lin = make("linformer", 2, True)
    st = lin.init_state(1)
    for t in range(40):  # max_len=40 covers exactly 40 steps
        _, st = lin.step(q[:, :, :1], k[:, :, :1], v[:, :, :1], st)
    with pytest.raises(InputError, match="max_len"):
        lin.step(q[:, :, :1], k[:, :, :1], v[:, :, :1], st)


def test_learned_parameter_is_lazy_and_trainable():
    attn = make("mlp", 4, True)
    assert isinstance(attn.control_param, torch.nn.parameter.UninitializedParameter)
    q, k, v = qkv(B=1, Lq=9, Lk=9, dtype=torch.float32)
    attn(q, k, v).sum().backward()
    assert attn.control_param.shape == (8, 4) and attn.control_param.grad is not None
    W = attn.control_param.detach().double().requires_grad_()
    ac.reference(attn.pattern, q, k, v, param=W).sum().backward()  # the oracle's gradient for W
    torch.testing.assert_close(attn.control_param.grad.double(), W.grad, rtol=1e-4, atol=1e-5)
    assert make("window", 4, True).control_param is None
