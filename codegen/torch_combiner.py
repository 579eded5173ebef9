"""PyTorch implementations of the Combiner stages (span pooling, local expectation, concat, mix).

The joint softmax itself is the shared ``BlockSparseAttention`` stage; these stages only build
the summaries it attends to. Each span group is one batched gather of its lines
(``[B, H, lines, length, D]``), so pooling and the local expectation are a handful of batched
ops per group, not a loop over spans. Prefix groups (causal partial columns) use a running
max / sum along the line and a lower-triangular mask, so summaries never see the future.
All ops are differentiable; backward goes through autograd.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from attncompiler.combiner import (Combiner, ConcatSummaries, MixOutputs, ReorderTokens, SpanAttention, SpanPool,
                                   SpanTable, span_table)
from attncompiler.errors import InputError

from .registry import RunContext, register_stage

NEG_INF = float("-inf")


@functools.lru_cache(maxsize=64)
def _group_index(table: SpanTable, device: str) -> tuple[tuple[torch.Tensor, tuple[int, int, int] | None], ...]:
    """Per group: members as an index tensor on ``device`` and, when they are an affine grid
    ``first + line * line_step + t * step`` (spans, columns, dyadic levels), that grid, so the
    gather becomes a strided view (cached per table)."""
    out = []
    for g in table.groups:
        m = g.members
        lines, n = m.shape
        first = int(m[0, 0])
        step = int(m[0, 1] - m[0, 0]) if n > 1 else 1
        line_step = int(m[1, 0] - m[0, 0]) if lines > 1 else 0
        affine = (first + np.arange(lines)[:, None] * line_step + np.arange(n)[None, :] * step == m).all()
        out.append((torch.from_numpy(m).to(device), (first, line_step, step) if affine and step > 0 else None))
    return tuple(out)


def _gather(x: torch.Tensor, idx: tuple[torch.Tensor, tuple[int, int, int] | None]) -> torch.Tensor:
    """``x [B, H, L, D]`` at the group's members ``[lines, n]`` -> ``[B, H, lines, n, D]``."""
    index, affine = idx
    B, H, _, D = x.shape
    if affine is not None:
        first, line_step, step = affine
        sB, sH, sL, sD = x.stride()
        return x.as_strided((B, H, *index.shape, D), (sB, sH, line_step * sL, step * sL, sD),
                            x.storage_offset() + first * sL)
    return x.index_select(2, index.reshape(-1)).view(B, H, *index.shape, D)


def pool_spans(x: torch.Tensor, table: SpanTable, pool: str) -> torch.Tensor:
    """Pool ``x [B, H, L, D]`` over every summary's span -> ``[B, H, S, D]`` (summary order)."""
    B, H, _, D = x.shape
    outs = []
    for g, idx in zip(table.groups, _group_index(table, str(x.device))):
        xs = _gather(x, idx)  # [B, H, lines, n, D]
        n = idx[0].shape[1]
        if g.prefix:
            if pool == "max":
                p = torch.cummax(xs, dim=3).values
            else:
                p = xs.cumsum(dim=3) / torch.arange(1, n + 1, device=x.device, dtype=x.dtype)[:, None]
            outs.append(p.transpose(2, 3).reshape(B, H, -1, D))  # summary t * lines + l
        else:
            outs.append(xs.amax(dim=3) if pool == "max" else xs.mean(dim=3))  # [B, H, lines, D]
    return torch.cat(outs, dim=2) if outs else x.new_zeros(B, H, 0, D)


def local_expectation(q_sum: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: SpanTable,
                      scale: float) -> torch.Tensor:
    """``v_S = sum_{j in S} softmax_j(scale q_S . k_j) v_j`` for every summary -> ``[B, H, S, Dv]``."""
    B, H, _, Dv = v.shape
    outs, s0 = [], 0
    for g, idx in zip(table.groups, _group_index(table, str(k.device))):
        lines, n = idx[0].shape
        K, V = _gather(k, idx), _gather(v, idx)  # [B, H, lines, n, D]
        qs = q_sum[:, :, s0:s0 + g.num_summaries]
        s0 += g.num_summaries
        if g.prefix:  # summary t * lines + l sees members 0..t of line l
            qs = qs.view(B, H, n, lines, -1).transpose(2, 3)  # [B, H, lines, n, D]
            s = torch.matmul(qs, K.transpose(-1, -2)) * scale  # [B, H, lines, n, n]
            future = torch.ones(n, n, dtype=torch.bool, device=k.device).triu_(1)
            p = torch.softmax(s.masked_fill(future, NEG_INF), dim=-1)
            outs.append(torch.matmul(p, V).transpose(2, 3).reshape(B, H, n * lines, Dv))
        else:
            s = torch.matmul(qs[:, :, :, None, :], K.transpose(-1, -2)) * scale  # [B, H, lines, 1, n]
            outs.append(torch.matmul(torch.softmax(s, dim=-1), V)[:, :, :, 0])  # [B, H, lines, Dv]
    return torch.cat(outs, dim=2) if outs else v.new_zeros(B, H, 0, Dv)


def _expand_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    g = heads // x.shape[1]
    return x if g == 1 else x.repeat_interleave(g, dim=1)


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


@register_stage("torch", SpanPool)
def run_span_pool(stage: SpanPool, env: dict, ctx: RunContext) -> dict:
    q, k = (env[n] for n in stage.inputs)
    if q.shape[2] != k.shape[2]:
        raise InputError(f"Combiner is self-attention: q has {q.shape[2]} positions but k has {k.shape[2]}")
    f = stage.factorization
    table = span_table(f, q.shape[2])
    return dict(zip(stage.outputs, (pool_spans(q, table, f.pool), pool_spans(k, table, f.pool))))


@register_stage("torch", SpanAttention)
def run_span_attention(stage: SpanAttention, env: dict, ctx: RunContext) -> dict:
    q_sum, k, v = (env[n] for n in stage.inputs)
    cdt = _compute_dtype(v)
    k, v = _expand_heads(k, ctx.heads).to(cdt), _expand_heads(v, ctx.heads).to(cdt)
    table = span_table(stage.factorization, k.shape[2])
    v_sum = local_expectation(q_sum.to(cdt), k, v, table, ctx.scale)
    return {stage.outputs[0]: v_sum.to(env[stage.inputs[2]].dtype)}


@register_stage("torch", ConcatSummaries)
def run_concat(stage: ConcatSummaries, env: dict, ctx: RunContext) -> dict:
    k, v, k_sum, v_sum = (env[n] for n in stage.inputs)
    k, v, k_sum = (_expand_heads(t, ctx.heads) for t in (k, v, k_sum))
    B, H, L, D = k.shape
    pad = -(-L // stage.align) * stage.align - L  # summaries start on a key-block boundary
    k_cat = torch.cat([k, k.new_zeros(B, H, pad, D), k_sum.to(k.dtype)], dim=2)
    v_cat = torch.cat([v, v.new_zeros(B, H, pad, v.shape[-1]), v_sum.to(v.dtype)], dim=2)
    return dict(zip(stage.outputs, (k_cat, v_cat)))


@register_stage("torch", MixOutputs)
def run_mix(stage: MixOutputs, env: dict, ctx: RunContext) -> dict:
    outs = [env[n] for n in stage.inputs]
    return {stage.outputs[0]: sum(outs[1:], outs[0]) / len(outs)}


@functools.lru_cache(maxsize=64)
def _order_index(f: Combiner, L: int, inverse: bool, device: str) -> torch.Tensor:
    order = f.token_order(L)
    return torch.from_numpy(np.argsort(order) if inverse else order).to(device)


@register_stage("torch", ReorderTokens)
def run_reorder(stage: ReorderTokens, env: dict, ctx: RunContext) -> dict:
    ts = [env[n] for n in stage.inputs]
    L = ts[0].shape[2]
    idx = _order_index(stage.factorization, L, stage.inverse, str(ts[0].device))
    out = []
    for t in ts:  # [B, H, n >= L, ...]: only the token rows move
        if t is None:  # e.g. no log-sum-exp from a backend that does not return one
            out.append(None)
            continue
        moved = t.index_select(2, idx)
        out.append(moved if t.shape[2] == L else torch.cat([moved, t[:, :, L:]], dim=2))
    return dict(zip(stage.outputs, out))
