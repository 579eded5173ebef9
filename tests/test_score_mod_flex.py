"""Parity with FlexAttention: the same score_mod functions (the built-ins and FlexAttention's own
examples) give the same outputs as ``flex_attention`` (fp32, 1e-5), with and without a mask."""

import pytest
import torch

import attncompiler as ac

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

flex = pytest.importorskip("torch.nn.attention.flex_attention")

B, H, HKV, L, D = 2, 4, 2, 64, 16


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, L, D, generator=g) * 3
    k = torch.randn(B, HKV, L, D, generator=g) * 3
    v = torch.randn(B, HKV, L, D, generator=g)
    return q, k, v


def flex_examples():
    slopes = ac.alibi_slopes(H)
    table = torch.randn(H, 32)
    bias = torch.randn(B, H, L, L)

    def alibi_example(score, b, h, q_idx, kv_idx):  # FlexAttention's ALiBi example
        return score + slopes[h] * (kv_idx - q_idx)

    def tanh_softcap(score, b, h, q_idx, kv_idx):  # FlexAttention's soft-capping example
        return 20.0 * torch.tanh(score / 20.0)

    def relative_positional(score, b, h, q_idx, kv_idx):
        return score + (q_idx - kv_idx)

    def captured_bias(score, b, h, q_idx, kv_idx):
        return score + bias[b, h, q_idx, kv_idx]

    return {"ac.softcap": ac.softcap(20.0), "ac.alibi": ac.alibi(slopes), "ac.relative_bias": ac.relative_bias(table),
            "ac.bias": ac.bias(bias), "composed": ac.softcap(30.0) @ ac.alibi(slopes),
            "alibi_example": alibi_example, "tanh_softcap": tanh_softcap, "relative_positional": relative_positional,
            "captured_bias": captured_bias}


@pytest.mark.parametrize("name", list(flex_examples()))
@pytest.mark.parametrize("causal", [False, True])
def test_matches_flex_attention(name, causal):
    mod = flex_examples()[name]
    q, k, v = inputs(hash(name) % 100)
    p = ac.causal() if causal else ac.full()
    block_mask = flex.create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, L, L, device="cpu") \
        if causal else None
    want = flex.flex_attention(q, k, v, score_mod=mod, block_mask=block_mask, enable_gqa=True)
    got = ac.compile(p, backend="torch", score_mod=mod, schedule=ac.Schedule(block_m=16, block_n=16))(q, k, v)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
