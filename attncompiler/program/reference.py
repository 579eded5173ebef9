"""The float64 dense oracle that every backend is compared with.

Each pattern family registers its own dense reference; mask patterns use plain masked
softmax attention. References favour obviousness over speed: they materialize L x L.
"""

from __future__ import annotations

import importlib

import inspect
from typing import Callable

import torch

from ..errors import InputError, PatternError, UnsupportedError
from .inputs import Dims, check_keywords, check_qkv, default_scale
from .positions import batch_groups, is_default
from ..dsl.pattern import Family, Pattern
from ..dsl.mask_mod import check_batch_head_dependence
from ..dsl.score_mod import ScoreMod, captured_tensors, check_device, check_result, check_score_mod

# The families beyond masks, by module: each exports ``REFERENCES`` (family -> float64 reference),
# read on first use (the families build on this layer, so the table names them).
REFERENCE_MODULES = ("attncompiler.families.combiner.reference", "attncompiler.families.diffusion.reference",
                     "attncompiler.families.memory.reference")

_REFERENCES: dict[str, Callable] = {}
_LOADED: list[bool] = []


def register_reference(family: str):
    """Register ``fn(pattern, q, k, v, scale, **kw) -> (out, lse)`` as the reference of a family
    defined outside the package (the package's own are listed in :data:`REFERENCE_MODULES`)."""

    def deco(fn):
        _REFERENCES[family] = fn
        return fn

    return deco


def family_reference(family: str) -> Callable | None:
    """The float64 reference of ``family``, loading :data:`REFERENCE_MODULES` on first use."""
    if not _LOADED:
        _REFERENCES.setdefault(Family.MASK, mask_reference)
        for name in REFERENCE_MODULES:
            for fam, fn in importlib.import_module(name).REFERENCES.items():
                _REFERENCES.setdefault(fam, fn)
        _LOADED.append(True)
    return _REFERENCES.get(family)


def reference(pattern: Pattern, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              scale: float | None = None, *, return_lse: bool = False, **kwargs):
    """Dense float64 attention of ``pattern`` on ``q [B,H,Lq,D]``, ``k, v [B,Hkv,Lk,D]``.

    Rows with no visible key give zeros (and log-sum-exp ``-inf``). The result is float64 and
    differentiable with respect to q, k and v. When ``Lq != Lk`` positions are top-left (query
    row i is position i); mask patterns take the call-time positions ``q_offset``, ``align``,
    ``cu_seqlens`` and ``kv_lens`` as the compiled module does. Keywords other than ``scale``,
    ``return_lse`` and the family's own (e.g. ABC's ``param``, ``control``; the positions and
    ``score_mod`` / ``sinks`` for masks, see :func:`mask_reference`) raise :class:`~attncompiler.errors.UnexpectedArgumentError`.

    Returns:
        ``out [B, H, Lq, Dv]`` (float64), or ``(out, lse [B, H, Lq])`` with ``return_lse``.
    """
    if not isinstance(pattern, Pattern):
        raise PatternError(f"reference() needs an attention pattern, got {type(pattern).__name__} {pattern!r}")
    fn = family_reference(pattern.family)
    if fn is None:
        raise UnsupportedError(f"no reference implementation for {pattern.family} patterns ({pattern!r})")
    check_keywords("reference", kwargs, ("scale", "return_lse", *_keywords(fn)))
    dims = check_qkv(q, k, v)
    out, lse = fn(pattern, q.double(), k.double(), v.double(), default_scale(dims.head_dim, scale), **kwargs)
    return (out, lse) if return_lse else out


def _keywords(fn: Callable) -> tuple[str, ...]:
    """The keyword-only parameters of a registered reference (what its family accepts)."""
    return tuple(name for name, p in inspect.signature(fn).parameters.items() if p.kind is p.KEYWORD_ONLY)


def dense_masks(pattern: Pattern, batch: int, heads: int, q_len: int, kv_len: int, device) -> torch.Tensor:
    """``[Bm, Hm, Lq, Lk]`` bool masks with Bm/Hm = 1 where the pattern does not vary."""
    check_batch_head_dependence(pattern, batch, heads, q_len, kv_len)
    Bm = batch if pattern.batch_dependent else 1
    Hm = 1 if pattern.head_period == 1 else heads
    return torch.stack([
        torch.stack([pattern.to_dense(q_len, kv_len, b=b, h=h, device=device) for h in range(Hm)])
        for b in range(Bm)])


def masked_attention(q, k, v, mask, scale, score_mod=None, q_pos=None, sinks=None):
    """Softmax attention with a boolean mask broadcastable to ``[B, H, Lq, Lk]``; GQA-aware.

    ``score_mod(score, b, h, q_idx, kv_idx)`` is applied to the scaled scores before the mask,
    with ``q_idx = q_pos`` (positions, broadcastable to ``[B, 1, Lq, 1]``; default the row index).
    ``sinks [H]`` join every row's denominator (a row with no visible key keeps output 0 and
    gets lse = its sink)."""
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale  # [B, H, Lq, Lk]
    if score_mod is not None:
        B, H, Lq, Lk = s.shape
        dev = s.device
        if q_pos is None:
            q_pos = torch.arange(Lq, device=dev).view(1, 1, Lq, 1)
        idx = (torch.arange(B, device=dev).view(B, 1, 1, 1), torch.arange(H, device=dev).view(1, H, 1, 1),
               q_pos, torch.arange(Lk, device=dev).view(1, 1, 1, Lk))
        s = check_result(score_mod, score_mod(s, *idx), s)
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # [B, H, Lq]
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    p = torch.exp(s - safe[..., None])  # rows with no key: exp(-inf) = 0
    out = torch.matmul(p, v)
    if sinks is not None:
        new_lse = torch.logaddexp(lse, sinks.to(lse.dtype)[None, :, None])
        out, lse = out * torch.exp(lse - new_lse)[..., None], new_lse
    return out, lse


def mask_reference(pattern, q, k, v, scale, *, q_offset=0, align: str | None = None, cu_seqlens=None,
                   kv_lens=None, score_mod=None, sinks=None):
    """Masked softmax attention; the call-time positions (see :mod:`.positions`) pick, per batch
    entry, rows ``q_offset .. q_offset + Lq - 1`` of the dense mask at query length
    ``q_offset + Lq`` and key length ``kv_lens[b]`` (later keys masked). ``score_mod`` and
    ``sinks`` as in :func:`masked_attention` (``q_idx`` is the query position)."""
    B, H, Lq, _ = q.shape
    Lk = k.shape[2]
    dims = Dims(B, H, k.shape[1], Lq, Lk, q.shape[3], v.shape[3])
    groups = batch_groups(pattern, dims, q_offset=q_offset, align=align, cu_seqlens=cu_seqlens, kv_lens=kv_lens)
    if score_mod is not None:
        check_score_mod(score_mod)
        check_device(captured_tensors(score_mod), q.device, score_mod)
    if sinks is not None and (not isinstance(sinks, torch.Tensor) or tuple(sinks.shape) != (H,)):
        raise InputError(f"sinks must be a tensor of shape [{H}], got "
                         f"{tuple(sinks.shape) if isinstance(sinks, torch.Tensor) else type(sinks).__name__}")
    if is_default(groups, dims):
        if isinstance(score_mod, ScoreMod):
            score_mod.check(B, H, Lq, Lk)
        return masked_attention(q, k, v, dense_masks(pattern, B, H, Lq, Lk, q.device), scale, score_mod, None, sinks)
    Hm = 1 if pattern.head_period == 1 else H
    mask = torch.zeros(B, Hm, Lq, Lk, dtype=torch.bool, device=q.device)
    q_pos = torch.zeros(B, 1, Lq, 1, dtype=torch.long, device=q.device)
    for grp in groups:
        p, off, n = grp.positions.bind(pattern), grp.positions.q_offset, grp.kv_len
        for b in (range(B) if grp.index is None else grp.index):
            q_pos[b, 0, :, 0] = off + torch.arange(Lq, device=q.device)
            for h in range(Hm):
                if n:
                    mask[b, h, :, :n] = p.to_dense(off + Lq, n, b=b, h=h, device=q.device)[off:]
    if isinstance(score_mod, ScoreMod):
        score_mod.check(B, H, int(q_pos.max()) + 1, Lk)
    return masked_attention(q, k, v, mask, scale, score_mod, q_pos, sinks)
