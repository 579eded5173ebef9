"""The float64 dense Combiner reference (the oracle; small L)."""

from __future__ import annotations

import numpy as np
import torch

from .pattern import FAMILY, Combiner, span_table
from .tables import SpanTable
from ...dsl.score_mod import ScoreMod, captured_tensors, check_device, check_result, check_score_mod
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


def _factorization_reference(f: Combiner, q, k, v, scale, score_mod=None, sinks=None):
    B, H, L, _ = q.shape
    G = H // k.shape[1]
    if G > 1:
        k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
    table = span_table(f, L)
    member = summary_membership(table).to(q.device)  # [S, L]
    q_sum, k_sum = _dense_pool(q, member, f.pool), _dense_pool(k, member, f.pool)  # [B, H, S, D]
    v_sum, _ = masked_attention(q_sum, k, v, member, scale)  # [B, H, S, Dv]
    mask = torch.cat([f.direct().to_dense(L, device=q.device), summary_readers(table).to(q.device)], dim=1)
    if score_mod is None and sinks is None:
        return masked_attention(q, torch.cat([k, k_sum], 2), torch.cat([v, v_sum], 2), mask, scale)
    # the joint softmax written out: direct scores through score_mod, summary scores as they are
    s_tok = torch.matmul(q, k.transpose(-1, -2)) * scale  # [B, H, L, L]
    if score_mod is not None:
        dev = q.device
        idx = (torch.arange(B, device=dev).view(B, 1, 1, 1), torch.arange(H, device=dev).view(1, H, 1, 1),
               torch.arange(L, device=dev).view(1, 1, L, 1), torch.arange(L, device=dev).view(1, 1, 1, L))
        s_tok = check_result(score_mod, score_mod(s_tok, *idx), s_tok)
    s = torch.cat([s_tok, torch.matmul(q, k_sum.transpose(-1, -2)) * scale], dim=-1).masked_fill(~mask, float("-inf"))
    if sinks is not None:  # one more column: the sink's logit, with a zero value
        s = torch.cat([s, sinks.to(s.dtype).view(1, H, 1, 1).expand(B, H, L, 1)], dim=-1)
    lse = torch.logsumexp(s, dim=-1)
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    p = torch.exp(s - safe[..., None])[..., :L + k_sum.shape[2]]
    return torch.matmul(p, torch.cat([v, v_sum], 2)), lse


def combiner_reference(pattern: Combiner, q, k, v, scale, *, score_mod=None, sinks=None):
    """Dense float64 Combiner attention (mixtures average their factorizations, lse None).

    ``score_mod(score, b, h, q_idx, kv_idx)`` modifies the direct scores ``scale q_i . k_j`` of the
    joint softmax (real positions ``i``, ``j``); the summary scores ``scale q_i . k_S`` and the
    local expectations are unmodified. ``sinks [H]`` join the joint softmax's denominator."""
    if q.shape[2] != k.shape[2]:
        raise InputError(f"Combiner is self-attention: q has {q.shape[2]} positions, k has {k.shape[2]}")
    if score_mod is not None:
        check_score_mod(score_mod)
        check_device(captured_tensors(score_mod), q.device, score_mod)
        if isinstance(score_mod, ScoreMod):
            score_mod.check(q.shape[0], q.shape[1], q.shape[2], q.shape[2])
    if sinks is not None and (not isinstance(sinks, torch.Tensor) or tuple(sinks.shape) != (q.shape[1],)):
        raise InputError(f"sinks must be a tensor of shape [{q.shape[1]}], got "
                         f"{tuple(sinks.shape) if isinstance(sinks, torch.Tensor) else type(sinks).__name__}")
    outs = [_factorization_reference(f, q, k, v, scale, score_mod, sinks) for f in pattern.factorizations()]
    if len(outs) == 1:
        return outs[0]
    return sum(o for o, _ in outs) / len(outs), None


REFERENCES = {FAMILY: combiner_reference}  # read by program.reference.reference
