"""Oracles shared by the family tests: the comparison against the float64 reference, an
independent dense masked-softmax oracle and the dense definition of a block layout."""

import numpy as np
import torch


def assert_matches_oracle(out, ref, inputs, *, rtol=1e-5, atol=2e-5, grad_rtol=1e-4, grad_atol=1e-4):
    """``out`` equals ``ref`` and so do their gradients with respect to ``inputs`` (random upstream)."""
    torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=atol)
    g = torch.randn_like(ref)
    got = torch.autograd.grad(out, inputs, g.to(out.dtype))
    want = torch.autograd.grad(ref, inputs, g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b.double(), rtol=grad_rtol, atol=grad_atol)


def dense_mask(pattern, batch: int, heads: int, q_len: int, kv_len: int) -> torch.Tensor:
    """``[B, H, Lq, Lk]`` bool: ``pattern.to_dense`` at every (batch entry, head)."""
    return torch.stack([torch.stack([pattern.to_dense(q_len, kv_len, b=b, h=h) for h in range(heads)])
                        for b in range(batch)])


def masked_softmax_attention(q, k, v, mask, scale):
    """Dense float64 attention written independently of ``ac.reference``: GQA by indexing the
    key/value head ``h // group`` per query head, an explicit row max, no ``logsumexp``.

    Returns ``(out [B, H, Lq, Dv], lse [B, H, Lq])``; rows without a visible key give zeros
    and ``-inf``. Differentiable with respect to q, k and v.
    """
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    kv_head = torch.arange(q.shape[1]) // group
    k, v = k[:, kv_head], v[:, kv_head]  # [B, H, Lk, D]
    s = torch.einsum("bhqd,bhkd->bhqk", q, k) * scale
    s = torch.where(mask, s, torch.full_like(s, -torch.inf))
    any_key = mask.any(-1, keepdim=True)
    m = torch.where(any_key, s.amax(-1, keepdim=True), torch.zeros_like(s[..., :1])).detach()
    e = torch.exp(s - m)  # masked entries: exp(-inf) = 0
    z = e.sum(-1, keepdim=True)
    out = torch.einsum("bhqk,bhkd->bhqd", e / torch.where(any_key, z, torch.ones_like(z)), v)
    lse = torch.where(any_key, m + torch.log(torch.where(any_key, z, torch.ones_like(z))),
                      torch.full_like(z, -torch.inf))
    return out, lse.squeeze(-1)


def dense_block_kinds(pattern, q_len: int, kv_len: int, bm: int, bn: int, b: int = 0, h: int = 0) -> np.ndarray:
    """``[nqb, nkb]`` block kinds (EMPTY/PARTIAL/FULL) from evaluating every element: the
    definition an analytic layout must meet."""
    from attncompiler.layout.block_sets import EMPTY, FULL, PARTIAL

    d = pattern.to_dense(q_len, kv_len, b=b, h=h)
    nqb, nkb = -(-q_len // bm), -(-kv_len // bn)
    pad = torch.zeros(nqb * bm, nkb * bn, dtype=torch.int64)
    valid = torch.zeros_like(pad)
    pad[:q_len, :kv_len] = d.long()
    valid[:q_len, :kv_len] = 1
    hits = pad.view(nqb, bm, nkb, bn).sum((1, 3))
    size = valid.view(nqb, bm, nkb, bn).sum((1, 3))
    return np.where(hits == 0, EMPTY, np.where(hits == size, FULL, PARTIAL)).astype(np.uint8)
