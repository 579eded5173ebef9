"""attncompiler.nn: MultiheadAttention against torch and the float64 reference; stacks; checkpoints."""

import copy

import pytest
import torch

import attncompiler as ac
from attncompiler.nn import (MultiheadAttention, TransformerBlock, TransformerStack, load_checkpoint, parse_pattern,
                             save_checkpoint)

E, H = 32, 4


def _copied(pattern=None, bias=True):
    ref = torch.nn.MultiheadAttention(E, H, bias=bias, batch_first=True)
    with torch.no_grad():  # torch zero-initializes biases; make them count
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    m = MultiheadAttention(E, H, pattern, bias=bias, backend="torch")
    m.load_state_dict(ref.state_dict())
    return ref, m


@pytest.mark.parametrize("bias", [True, False])
def test_matches_torch_multihead_attention_forward_and_backward(bias):
    ref, m = _copied(bias=bias)
    x = torch.randn(2, 37, E, requires_grad=True)
    out, w = m(x, x, x)
    exp, _ = ref(x, x, x, need_weights=False)
    assert w is None
    torch.testing.assert_close(out, exp, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, *m.parameters()], g)
    want = torch.autograd.grad(exp, [x, *ref.parameters()], g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_cross_attention_and_sequence_first_match_torch():
    ref, m = _copied()
    q, kv = torch.randn(3, 11, E), torch.randn(3, 19, E)
    torch.testing.assert_close(m(q, kv, kv)[0], ref(q, kv, kv, need_weights=False)[0], rtol=1e-5, atol=1e-5)
    ref_s = torch.nn.MultiheadAttention(E, H)
    m_s = MultiheadAttention(E, H, batch_first=False, backend="torch")
    m_s.load_state_dict(ref_s.state_dict())
    x = torch.randn(13, 2, E)  # [L, B, E]
    torch.testing.assert_close(m_s(x)[0], ref_s(x, x, x, need_weights=False)[0], rtol=1e-5, atol=1e-5)


def test_sparse_pattern_equals_float64_reference():
    pattern = ac.sliding_window(4) | ac.global_tokens([0])
    _, m = _copied(pattern)
    x = torch.randn(2, 45, E, dtype=torch.float64)
    md = copy.deepcopy(m).double()
    w = md.in_proj_weight
    q, k, v = (torch.nn.functional.linear(x, wi, bi).view(2, 45, H, E // H).transpose(1, 2)
               for wi, bi in zip(w.chunk(3), md.in_proj_bias.chunk(3)))
    o = ac.reference(pattern, q, k, v).transpose(1, 2).reshape(2, 45, E)
    exp = md.out_proj(o)
    torch.testing.assert_close(m(x.float())[0].double(), exp, rtol=1e-5, atol=2e-6)


def test_is_causal_uses_the_causal_pattern():
    ref, m = _copied()
    x = torch.randn(2, 21, E)
    mask = torch.ones(21, 21, dtype=torch.bool).triu(1)  # torch: True = not allowed
    exp = ref(x, x, x, need_weights=False, attn_mask=mask)[0]
    torch.testing.assert_close(m(x, is_causal=True)[0], exp, rtol=1e-5, atol=1e-5)


def test_unsupported_arguments_raise_clear_errors():
    _, m = _copied()
    x = torch.randn(1, 8, E)
    with pytest.raises(ac.UnsupportedError, match="need_weights"):
        m(x, x, x, need_weights=True)
    with pytest.raises(ac.UnsupportedError, match="pattern"):
        m(x, x, x, attn_mask=torch.zeros(8, 8, dtype=torch.bool))
    with pytest.raises(ac.InputError, match="last dimension 32"):
        m(torch.randn(1, 8, E + 1))
    with pytest.raises(ac.InputError, match="divisible"):
        MultiheadAttention(30, 4)
    with pytest.raises(ac.UnsupportedError, match="dropout"):
        MultiheadAttention(E, H, dropout=0.1)


def test_stack_without_reuse_is_the_composition_of_its_blocks():
    patterns = [ac.sliding_window(3), ac.causal(), ac.sliding_window(3)]
    st = TransformerStack(E, H, patterns, backend="torch")
    x = torch.randn(2, 30, E)
    y = x
    for block in st.layers:
        assert isinstance(block, TransformerBlock)
        y = block(y)
    torch.testing.assert_close(st(x), st.norm(y))
    for zero in ({}, {1: 0, 2: []}):
        st.set_reuse(zero)
        torch.testing.assert_close(st(x), st.norm(y))


def test_stack_argument_errors():
    with pytest.raises(ac.PatternError, match="num_layers"):
        TransformerStack(E, H, ac.causal())
    with pytest.raises(ac.PatternError, match="num_layers=3 but 2"):
        TransformerStack(E, H, [ac.causal()] * 2, num_layers=3)
    st = TransformerStack(E, H, ac.causal(), num_layers=2, backend="torch")
    with pytest.raises(ac.InputError, match="batch, seq, 32"):
        st(torch.randn(4, E))


def test_attention_only_blocks_have_no_mlp():
    st = TransformerStack(E, H, ac.causal(), num_layers=2, mlp_ratio=0, backend="torch")
    assert not hasattr(st.layers[0], "mlp")
    assert st(torch.randn(1, 9, E)).shape == (1, 9, E)


def test_checkpoint_round_trip(tmp_path):
    from attncompiler import patterns

    pats = [patterns.bigbird(block=8, random_blocks=1), patterns.bigbird(block=8, random_blocks=1), ac.causal()]
    st = TransformerStack(E, H, pats, reuse={1: [0, 3]}, backend="torch", reuse_schedule="recompute")
    path = tmp_path / "stack.pt"
    save_checkpoint(st, path, steps=3)
    back = load_checkpoint(path, backend="torch")
    assert back.patterns == st.patterns and back.plan == st.plan and back.reuse_schedule == "recompute"
    x = torch.randn(1, 40, E)
    torch.testing.assert_close(back(x), st(x))


def _opaque(b, h, q_idx, kv_idx):
    return (q_idx.float().sin() > 0) if isinstance(q_idx, torch.Tensor) else q_idx.sin()  # not traceable


def test_checkpoint_errors(tmp_path):
    opaque = ac.mask(_opaque)
    assert opaque.predicate(4, 4) is None
    st = TransformerStack(E, H, [opaque, opaque], backend="torch")
    with pytest.raises(ac.InputError, match="cannot"):
        save_checkpoint(st, tmp_path / "x.pt")
    bad = tmp_path / "bad.pt"
    torch.save({"weights": torch.zeros(1)}, bad)
    with pytest.raises(ac.InputError, match="not an attncompiler.nn checkpoint"):
        load_checkpoint(bad)
    with pytest.raises(ac.InputError, match="cannot rebuild"):
        parse_pattern("__import__('os')")
