"""The float64 dense Combiner reference (the oracle; small L)."""

from __future__ import annotations

import numpy as np
import torch

from .pattern import FAMILY, Combiner, span_table
from .tables import SpanTable
from ...errors import InputError
from ...program.reference import masked_attention


def summary_membership(table: SpanTable) -> torch.Tensor:
    """``[S, L]`` bool: which tokens each summary pools."""
    ptr, idx = table.members_csr
    m = torch.zeros(table.num_summaries, table.num_tokens, dtype=torch.bool)
    m[torch.from_numpy(np.repeat(np.arange(table.num_summaries), np.diff(ptr))), torch.from_numpy(idx)] = True
    return m


def summary_readers(table: SpanTable) -> torch.Tensor:
    """``[L, S]`` bool: which summaries each query reads (``R_i``)."""
    m = torch.zeros(table.num_tokens, table.num_summaries, dtype=torch.bool)
    m[torch.from_numpy(table.pair_q), torch.from_numpy(table.pair_s)] = True
    return m


def _dense_pool(x: torch.Tensor, member: torch.Tensor, pool: str) -> torch.Tensor:
    """``x [B, H, L, D]`` pooled over each summary's members ``[S, L]`` -> ``[B, H, S, D]``."""
    if pool == "mean":
        w = member.to(x.dtype)
        return (w @ x) / w.sum(-1, keepdim=True)
    return x[:, :, None].masked_fill(~member[:, :, None], float("-inf")).amax(dim=3)


def _factorization_reference(f: Combiner, q, k, v, scale):
    B, H, L, _ = q.shape
    G = H // k.shape[1]
    if G > 1:
        k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
    table = span_table(f, L)
    member = summary_membership(table).to(q.device)  # [S, L]
    q_sum, k_sum = _dense_pool(q, member, f.pool), _dense_pool(k, member, f.pool)  # [B, H, S, D]
    v_sum, _ = masked_attention(q_sum, k, v, member, scale)  # [B, H, S, Dv]
    mask = torch.cat([f.direct().to_dense(L, device=q.device), summary_readers(table).to(q.device)], dim=1)
    return masked_attention(q, torch.cat([k, k_sum], 2), torch.cat([v, v_sum], 2), mask, scale)


def combiner_reference(pattern: Combiner, q, k, v, scale):
    """Dense float64 Combiner attention (mixtures average their factorizations, lse None)."""
    if q.shape[2] != k.shape[2]:
        raise InputError(f"Combiner is self-attention: q has {q.shape[2]} positions, k has {k.shape[2]}")
    outs = [_factorization_reference(f, q, k, v, scale) for f in pattern.factorizations()]
    if len(outs) == 1:
        return outs[0]
    return sum(o for o, _ in outs) / len(outs), None


REFERENCES = {FAMILY: combiner_reference}  # read by program.reference.reference
