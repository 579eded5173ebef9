"""PyTorch implementations of the Combiner stages (span pooling, local expectation, concat, mix).

The joint softmax itself is the shared ``BlockSparseAttention`` stage; these stages only build
the summaries it attends to. Each span group is one batched gather of its lines
(``[B, H, lines, length, D]``), so pooling and the local expectation are a handful of batched
ops per group, not a loop over spans. Prefix groups (causal partial columns) use a running
max / sum along the line and a lower-triangular mask, so summaries never see the future.
Spans of one token skip the reduction and the softmax (both are the identity there), and short
spans use multiply-and-sum instead of thousands of tiny matmuls (Combiner-Logsparse's lowest
levels). The concat lays the summaries into the joint mask's slots: shared slots are one
``torch.cat``, packed slots one gather of ``[tokens ; 0 ; summaries]`` (see
:mod:`attncompiler.families.combiner.joint`). All ops are differentiable; backward goes through autograd.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from attncompiler.program.autograd_guard import single_backward
from attncompiler.families.combiner.pattern import Combiner, span_table
from attncompiler.families.combiner.program import ConcatSummaries, MixOutputs, ReorderTokens, SpanAttention, SpanPool
from attncompiler.families.combiner.joint import JointMask
from attncompiler.families.combiner.tables import SpanTable
from attncompiler.families.combiner.joint import slot_plan
from attncompiler.errors import InputError

from ..context import RunContext

NEG_INF = float("-inf")
_ELEMENTWISE_MAX_SPAN = 4  # local expectations over at most this many keys skip matmul (measured on CPU)


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
    return _rows(x, index.reshape(-1)).view(B, H, *index.shape, D)


class _GatherGroups(torch.autograd.Function):
    """Every group's members of ``x [B, H, L, D]`` as ``[B, H, lines, n, D]`` tensors (strided
    views where affine). Backward adds every group's gradient into one buffer: autograd's own
    backward of a view gives ``x`` a full-size zero gradient per view, one ``[B, H, L, D]``
    fill and add per group and tensor, which dominated Combiner-Logsparse's backward."""

    @staticmethod
    def forward(ctx, x, index):
        ctx.index, ctx.shape = index, x.shape
        ctx.set_materialize_grads(False)  # groups without a gradient stay None: nothing to add
        return tuple(_gather(x, i) for i in index)

    @staticmethod
    @single_backward("the Combiner span gather (torch backend)")
    def backward(ctx, *grads):
        B, H, L, D = ctx.shape
        given = [g for g in grads if g is not None]
        if not given:
            return None, None
        dx = given[0].new_zeros(B, H, L, D)
        for g, (index, affine) in zip(grads, ctx.index):
            if g is None:
                continue
            if affine is not None:  # the members are distinct: the view does not overlap itself
                _gather(dx, (index, affine)).add_(g)
            else:
                dx.view(B * H * L, D).index_add_(0, _row_offsets(B * H, L, index.reshape(-1)), g.reshape(-1, D))
        return dx, None


def _gather_groups(x: torch.Tensor, table: SpanTable) -> tuple[torch.Tensor, ...]:
    """``x [B, H, L, D]`` at every group's members -> one ``[B, H, lines, n, D]`` per group."""
    index = _group_index(table, str(x.device))
    if torch.is_grad_enabled() and x.requires_grad:
        return _GatherGroups.apply(x, index)
    return tuple(_gather(x, i) for i in index)


def _row_offsets(rows: int, L: int, index: torch.Tensor) -> torch.Tensor:
    """Rows of ``[rows * L, X]`` holding positions ``index`` of each of the ``rows`` sequences."""
    return (torch.arange(rows, device=index.device)[:, None] * L + index[None, :]).reshape(-1)


def _rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[:, :, index]`` for ``x [B, H, L, X]``, as one 2-D row gather (several times faster on
    CPU than ``index_select`` on dim 2)."""
    B, H, L, X = x.shape
    return x.reshape(B * H * L, X).index_select(0, _row_offsets(B * H, L, index)).view(B, H, len(index), X)


def pool_spans(x: torch.Tensor, table: SpanTable, pool: str) -> torch.Tensor:
    """Pool ``x [B, H, L, D]`` over every summary's span -> ``[B, H, S, D]`` (summary order)."""
    B, H, _, D = x.shape
    outs = []
    for g, xs in zip(table.groups, _gather_groups(x, table)):  # xs [B, H, lines, n, D]
        n = xs.shape[3]
        if g.prefix:
            if pool == "max":
                p = torch.cummax(xs, dim=3).values
            else:
                p = xs.cumsum(dim=3) / torch.arange(1, n + 1, device=x.device, dtype=x.dtype)[:, None]
            outs.append(p.transpose(2, 3).reshape(B, H, -1, D))  # summary t * lines + l
        elif n == 1:  # one member: the pool is the member itself (a view, no reduction)
            outs.append(xs[:, :, :, 0])
        else:
            outs.append(xs.amax(dim=3) if pool == "max" else xs.mean(dim=3))  # [B, H, lines, D]
    return torch.cat(outs, dim=2) if outs else x.new_zeros(B, H, 0, D)


def local_expectation(q_sum: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: SpanTable,
                      scale: float) -> torch.Tensor:
    """``v_S = sum_{j in S} softmax_j(scale q_S . k_j) v_j`` for every summary -> ``[B, H, S, Dv]``."""
    B, H, _, Dv = v.shape
    outs, s0 = [], 0
    for g, K, V in zip(table.groups, _gather_groups(k, table), _gather_groups(v, table)):
        lines, n = K.shape[2:4]  # K, V [B, H, lines, n, D]
        qs = q_sum[:, :, s0:s0 + g.num_summaries]
        s0 += g.num_summaries
        if g.prefix:  # summary t * lines + l sees members 0..t of line l
            qs = qs.view(B, H, n, lines, -1).transpose(2, 3)  # [B, H, lines, n, D]
            s = torch.matmul(qs, K.transpose(-1, -2)) * scale  # [B, H, lines, n, n]
            future = torch.ones(n, n, dtype=torch.bool, device=k.device).triu_(1)
            p = torch.softmax(s.masked_fill(future, NEG_INF), dim=-1)
            outs.append(torch.matmul(p, V).transpose(2, 3).reshape(B, H, n * lines, Dv))
        elif n == 1:  # a softmax over one key is exactly 1
            outs.append(V[:, :, :, 0])
        elif n <= _ELEMENTWISE_MAX_SPAN:  # batched 1 x n matmuls are slower than multiply-and-sum
            s = (qs[:, :, :, None, :] * K).sum(-1) * scale  # [B, H, lines, n]
            outs.append((torch.softmax(s, dim=-1)[..., None] * V).sum(3))  # [B, H, lines, Dv]
        else:
            s = torch.matmul(qs[:, :, :, None, :], K.transpose(-1, -2)) * scale  # [B, H, lines, 1, n]
            outs.append(torch.matmul(torch.softmax(s, dim=-1), V)[:, :, :, 0])  # [B, H, lines, Dv]
    return torch.cat(outs, dim=2) if outs else v.new_zeros(B, H, 0, Dv)


def _expand_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    g = heads // x.shape[1]
    return x if g == 1 else x.repeat_interleave(g, dim=1)


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def run_span_pool(stage: SpanPool, env: dict, ctx: RunContext) -> dict:
    """Pooled queries and keys of every span of the factorization's span table."""
    q, k = (env[n] for n in stage.inputs)
    if q.shape[2] != k.shape[2]:
        raise InputError(f"Combiner is self-attention: q has {q.shape[2]} positions but k has {k.shape[2]}")
    f = stage.factorization
    table = span_table(f, q.shape[2])
    return dict(zip(stage.outputs, (pool_spans(q, table, f.pool), pool_spans(k, table, f.pool))))


def run_span_attention(stage: SpanAttention, env: dict, ctx: RunContext) -> dict:
    """Local expectation inside each span: the summary keys and values the joint softmax reads."""
    q_sum, k, v = (env[n] for n in stage.inputs)
    cdt = _compute_dtype(v)
    k, v = _expand_heads(k, ctx.heads).to(cdt), _expand_heads(v, ctx.heads).to(cdt)
    table = span_table(stage.factorization, k.shape[2])
    v_sum = local_expectation(q_sum.to(cdt), k, v, table, ctx.scale)
    return {stage.outputs[0]: v_sum.to(env[stage.inputs[2]].dtype)}


@functools.lru_cache(maxsize=64)
def _slot_index(joint: JointMask, L: int, device: str) -> tuple[torch.Tensor | None, int]:
    """``(index, tail)`` of the joint key axis at ``L`` tokens. Packed slots: ``index`` gathers
    the whole axis from ``[tokens ; 0 ; summaries]`` in one pass (padding reads the zero row).
    Shared slots (``index`` None): ``[tokens ; 0 ; summaries ; tail zero rows]``, no gather."""
    plan = slot_plan(joint, L)
    S = span_table(joint.factorization, L).num_summaries
    if not plan.packed:
        return None, plan.num_slots - S
    pad = joint.offset(L) - L
    slots = np.where(plan.summary >= 0, L + 1 + plan.summary, L)
    index = np.concatenate([np.arange(L), np.full(pad, L), slots])
    return torch.from_numpy(index).to(device), 0


def run_concat(stage: ConcatSummaries, env: dict, ctx: RunContext) -> dict:
    """Keys and values joined with their summary slots along the key axis ([keys ; summaries])."""
    k, v, k_sum, v_sum = (env[n] for n in stage.inputs)
    k, v, k_sum = (_expand_heads(t, ctx.heads) for t in (k, v, k_sum))
    B, H, L, D = k.shape
    pad = -(-L // stage.align) * stage.align - L  # summaries start on a key-block boundary
    index, tail = (None, 0) if stage.joint is None else _slot_index(stage.joint, L, str(k.device))

    def cat(x: torch.Tensor, sums: torch.Tensor) -> torch.Tensor:  # [B, H, L, X], [B, H, S, X]
        X = x.shape[-1]
        sums = sums.to(x.dtype)
        if index is not None:  # packed: each query block's summaries, duplicated where shared
            return _rows(torch.cat([x, x.new_zeros(B, H, 1, X), sums], dim=2), index)
        return torch.cat([x, x.new_zeros(B, H, pad, X), sums, x.new_zeros(B, H, tail, X)], dim=2)

    return dict(zip(stage.outputs, (cat(k, k_sum), cat(v, v_sum))))


def run_mix(stage: MixOutputs, env: dict, ctx: RunContext) -> dict:
    """Mixture variants: the mean of the component factorizations' outputs."""
    outs = [env[n] for n in stage.inputs]
    return {stage.outputs[0]: sum(outs[1:], outs[0]) / len(outs)}


@functools.lru_cache(maxsize=64)
def _order_index(f: Combiner, L: int, inverse: bool, device: str) -> torch.Tensor:
    order = f.token_order(L)
    return torch.from_numpy(np.argsort(order) if inverse else order).to(device)


def run_reorder(stage: ReorderTokens, env: dict, ctx: RunContext) -> dict:
    """Permute tokens into (or back from) the order a factorization works in (axial variants)."""
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


STAGES = {SpanPool: run_span_pool, SpanAttention: run_span_attention, ConcatSummaries: run_concat,
          MixOutputs: run_mix, ReorderTokens: run_reorder}
