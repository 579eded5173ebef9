"""The float64 dense diffusion reference: the equations as written (the oracle; small L)."""

from __future__ import annotations

import torch

from ...dsl.pattern import Pattern
from ...program.reference import dense_masks
from .pattern import DIFFUSION, Diffusion, Kernel

# ---------------------------------------------------------------------------------------------
# Reference (float64, dense): the equations as written
# ---------------------------------------------------------------------------------------------

def expand_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, Hkv, L, X]`` -> ``[B, heads, L, X]`` (GQA: query heads sharing a key/value head)."""
    G = heads // t.shape[1]
    return t if G == 1 else t.repeat_interleave(G, dim=1)


def dense_probs(base: Pattern, q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """``P [B, H, L, L]``: row-softmax of ``scale q k^T`` over the base pattern (empty rows zero)."""
    B, H, L, _ = q.shape
    mask = dense_masks(base, B, H, L, k.shape[2], q.device)
    s = torch.matmul(q, expand_heads(k, H).transpose(-1, -2)) * scale  # [B, H, L, L]
    s = s.masked_fill(~mask, float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    e = torch.exp(s - m)  # exp(-inf) = 0 off the pattern
    den = e.sum(dim=-1, keepdim=True)
    return e / torch.where(den == 0, torch.ones_like(den), den)


def _diffusion_reference(pattern: Diffusion, q, k, v, scale):
    L = q.shape[2]
    pattern.validate(L, k.shape[2])
    P = dense_probs(pattern.base, q, k, scale)  # [B, H, L, L]
    V = expand_heads(v, q.shape[1])  # [B, H, L, Dv]
    if pattern.kernel is Kernel.PPR:
        z = V
        for _ in range(pattern.hops):
            z = (1 - pattern.alpha) * (P @ z) + pattern.alpha * V
        return z, None
    out, pk = torch.zeros_like(V), V
    for k_, w in enumerate(pattern.weights()):  # sum_k w_k P^k V
        if k_:
            pk = P @ pk
        out = out + w * pk
    return out, None


REFERENCES = {DIFFUSION: _diffusion_reference}  # read by program.reference.reference
