"""Local pieces of sequence-parallel attention: a pattern shifted to a shard's offsets, lse merging."""

from __future__ import annotations

import functools

import torch

from ..ir import expr as E
from ..ir.index import Index, index
from ..dsl.mask_mod import Mask, mask


@functools.lru_cache(maxsize=256)
def shifted_pattern(pattern, q_off: int, k_off: int, seq_len: int):
    """``pattern`` restricted to queries ``q_off + i`` and keys ``k_off + j`` of a length-L problem.

    An analyzable predicate stays analyzable (its index variables are shifted, so the layout
    is classified analytically); an opaque one is wrapped and evaluated chunk by chunk.
    """
    e = pattern.predicate(seq_len, seq_len)
    if e is not None:
        return Mask(None, _shift(e, {"q_idx": q_off, "kv_idx": k_off}))

    def shard_mask(b, h, q_idx, kv_idx):
        return pattern.evaluate(b, h, q_idx + q_off, kv_idx + k_off, seq_len, seq_len)

    shard_mask.__name__ = f"shard_of_{type(pattern).__name__}_{q_off}_{k_off}"
    return mask(shard_mask, per_head=pattern.head_period != 1, per_batch=pattern.batch_dependent)


def _shift(e, offsets):
    """``e`` with index variable ``x`` replaced by ``x + offsets[x]`` (structure as in expr.substitute)."""
    match e:
        case E.Var(name) if offsets.get(name):
            return E.binop("add", e, E.Const(int(offsets[name])))
        case E.Var() | E.Const():
            return e
        case E.Load(buf, idx, fill):
            return E.Load(buf, _shift(idx, offsets), fill)
        case Index(buf, shape, idxs):
            return index(buf, shape, tuple(_shift(i, offsets) for i in idxs))
        case E.BinOp(op, a, b):
            return E.binop(op, _shift(a, offsets), _shift(b, offsets))
        case E.UnOp(op, a):
            return E.unop(op, _shift(a, offsets))
        case E.Where(c, a, b):
            return E.where(_shift(c, offsets), _shift(a, offsets), _shift(b, offsets))
    raise AssertionError(f"unknown expression node {e!r}")


def merge_partials(outs: list[torch.Tensor], lses: list[torch.Tensor]):
    """Merge partial attention results over disjoint key sets through their log-sum-exp."""
    lse_all = torch.stack(lses)  # [n, B, H, Lq]
    lse = torch.logsumexp(lse_all, dim=0)  # [B, H, Lq]
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    w = torch.exp(lse_all - safe)  # [n, B, H, Lq]; rows with no key anywhere get weight 0
    w = torch.where(torch.isfinite(lse_all), w, torch.zeros_like(w))
    out = (w.unsqueeze(-1) * torch.stack(outs).to(w.dtype)).sum(0)  # [B, H, Lq, Dv]
    return out, lse
