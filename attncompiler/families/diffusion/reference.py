"""The float64 dense diffusion reference: the equations as written (the oracle; small L)."""

from __future__ import annotations

import torch

from ...dsl.pattern import Pattern
from ...dsl.score_mod import ScoreMod, captured_tensors, check_device, check_result, check_score_mod
from ...program.reference import dense_masks
from .pattern import DIFFUSION, Diffusion, Kernel

# ---------------------------------------------------------------------------------------------
# Reference (float64, dense): the equations as written
# ---------------------------------------------------------------------------------------------

def expand_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, Hkv, L, X]`` -> ``[B, heads, L, X]`` (GQA: query heads sharing a key/value head)."""
    G = heads // t.shape[1]
    return t if G == 1 else t.repeat_interleave(G, dim=1)


def dense_probs(base: Pattern, q: torch.Tensor, k: torch.Tensor, scale: float, score_mod=None) -> torch.Tensor:
    """``P [B, H, L, L]``: row-softmax of ``score_mod(scale q k^T, b, h, i, j)`` (the scaled scores
    when ``score_mod`` is None) over the base pattern (empty rows zero)."""
    B, H, L, _ = q.shape
    Lk = k.shape[2]
    mask = dense_masks(base, B, H, L, Lk, q.device)
    s = torch.matmul(q, expand_heads(k, H).transpose(-1, -2)) * scale  # [B, H, L, L]
    if score_mod is not None:
        dev = q.device
        idx = (torch.arange(B, device=dev).view(B, 1, 1, 1), torch.arange(H, device=dev).view(1, H, 1, 1),
               torch.arange(L, device=dev).view(1, 1, L, 1), torch.arange(Lk, device=dev).view(1, 1, 1, Lk))
        s = check_result(score_mod, score_mod(s, *idx), s)
    s = s.masked_fill(~mask, float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    e = torch.exp(s - m)  # exp(-inf) = 0 off the pattern
    den = e.sum(dim=-1, keepdim=True)
    return e / torch.where(den == 0, torch.ones_like(den), den)


def _diffusion_reference(pattern: Diffusion, q, k, v, scale, *, score_mod=None):
    """Dense float64 diffusion: ``P = softmax(score_mod(scale q k^T) + mask)`` over the base
    pattern, then the kernel's ``sum_k c_k P^k V`` (no lse)."""
    L = q.shape[2]
    pattern.validate(L, k.shape[2])
    if score_mod is not None:
        check_score_mod(score_mod)
        check_device(captured_tensors(score_mod), q.device, score_mod)
        if isinstance(score_mod, ScoreMod):
            score_mod.check(q.shape[0], q.shape[1], L, L)
    P = dense_probs(pattern.base, q, k, scale, score_mod)  # [B, H, L, L]
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
