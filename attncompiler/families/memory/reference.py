"""The float64 dense ABC reference: write the slots, then read them, as the equations say (the oracle)."""

from __future__ import annotations

import torch

from .pattern import MEMORY, Memory, WindowControl
from .program import control_weights

# ---------------------------------------------------------------------------------------------
# Float64 reference: the equations, densely
# ---------------------------------------------------------------------------------------------

def _memory_reference(pattern: Memory, q, k, v, scale, *, param=None, control=None):
    B, H, Lq, D = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    if isinstance(pattern.control, WindowControl):
        kt, vt, valid = _fifo_slots(k, v, pattern.slots, Lq)  # [B, Hkv, Lq, n, D], [Lq, n]
    else:
        s = control_weights(pattern, k, None if param is None else param.double(),
                            None if control is None else control.double())  # [B, Hkv, Lk, n]
        kt, vt, valid = _written_slots(pattern, s, k, v, Lq)
    kt, vt = kt.repeat_interleave(G, 1), vt.repeat_interleave(G, 1)  # GQA: [B, H, Lq, n, *]
    scores = torch.einsum("bhid,bhimd->bhim", q, kt) * scale  # [B, H, Lq, n]
    scores = scores.masked_fill(~valid.repeat_interleave(G, 1), float("-inf"))
    lse = torch.logsumexp(scores, -1)  # [B, H, Lq]
    p = torch.exp(scores - torch.where(torch.isinf(lse), 0, lse)[..., None])  # empty rows: 0
    return torch.einsum("bhim,bhime->bhie", p, vt), lse


def _written_slots(pattern: Memory, s, k, v, Lq):
    """Per-query memories ``K~_i, V~_i [B, Hkv, Lq, n, D]`` and which slots hold anything."""
    Lk = k.shape[2]
    if pattern.control.normalized:
        top = s.amax(2, keepdim=True)  # [B, Hkv, 1, n]; float64 keeps exp(s - top) in range
        w = torch.exp(s - torch.where(torch.isinf(top), 0, top))  # exp(s_{j,m}) up to a per-slot factor
    else:
        w = s
    kw = w[..., None] * k[:, :, :, None, :]  # [B, Hkv, Lk, n, D]: phi_{j,m} k_j
    vw = w[..., None] * v[:, :, :, None, :]
    z = w
    if pattern.is_causal:  # query i reads the prefix j <= i
        kw, vw, z = kw.cumsum(2), vw.cumsum(2), z.cumsum(2)
        at = torch.arange(Lq).clamp(max=Lk - 1)
        kw, vw, z = kw[:, :, at], vw[:, :, at], z[:, :, at]  # [B, Hkv, Lq, n, *]
    else:
        kw, vw, z = (t.sum(2, keepdim=True).expand(*t.shape[:2], Lq, *t.shape[3:]) for t in (kw, vw, z))
    if not pattern.control.normalized:
        return kw, vw, torch.ones(z.shape, dtype=torch.bool)
    valid = z > 0  # cluster slots with no key yet hold nothing
    zs = torch.where(valid, z, 1)[..., None]
    return kw / zs, vw / zs, valid


def _fifo_slots(k, v, n, Lq):
    """FIFO memory: slot m of query i holds token ``i - n + 1 + m`` when that token exists."""
    Lk = k.shape[2]
    j = torch.arange(Lq)[:, None] - n + 1 + torch.arange(n)  # [Lq, n]
    valid = (j >= 0) & (j < Lk)
    jc = j.clamp(0, Lk - 1)
    return k[:, :, jc], v[:, :, jc], valid.expand(k.shape[0], k.shape[1], Lq, n)


REFERENCES = {MEMORY: _memory_reference}  # read by program.reference.reference
