"""PyTorch stages of attention diffusion: P once over the block layout, then K SpMM hops.

* ``SparseProbs`` computes the row-softmax of ``scale q k^T`` chunk by chunk with the block plan
  of :mod:`attncompiler.codegen.torch_attention` (bucketed query blocks, strided key views for
  affine bands, cached additive masks for partial blocks) and **stores** the probabilities:
  one ``[R, BM, C*BN]`` tile per chunk, concatenated in a flat ``[B, H, nnz]`` buffer. Memory is
  the block layout's nnz, no index arrays (the plan holds them once per layout).
* ``DiffusionHop`` multiplies those tiles with the key blocks of ``z`` (a strided view or one
  gather) in batched matmuls and fuses the axpby into the same ``baddbmm``.
* Backward: a hop gives ``dz = beta P^T g`` (scatter-added per key block), ``dv = gamma g``
  and ``dP = beta g z^T`` on the stored tiles only; ``SparseProbs`` turns ``dP`` into
  ``dS = P * (dP - rowsum(P * dP))`` in place and then into dq and dk.

GQA: keys and values are expanded to the query heads first (P differs per query head, so the
hop iterates ``z`` per query head); autograd folds the gradient back.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass

import numpy as np
import torch

from attncompiler.diffusion import (Axpby, DiffusionHop, ExpandHeads, PassThrough, SparseProbs,
                                    expand_heads)
from attncompiler.layout import BlockLayout, Blocks2D
from attncompiler.schedule import Schedule

from .registry import RunContext, register_stage
from .torch_attention import Chunk, Step, _compute_dtype, _pad_len, _step_bias, make_plan


@dataclass(frozen=True, eq=False)
class _Item:
    """(batch, head) entries sharing one 2-D layout, with the offsets of each chunk's tile.

    P is stored chunk-major: chunk ``i`` holds a contiguous ``[Bi*Hi*R, BM, C*BN]`` tile at
    ``offsets[i]``, so one batched matmul covers every (batch, head) of the chunk.
    """

    blocks: Blocks2D
    b: slice
    h: slice
    bh: int
    plan: tuple[Chunk, ...]
    offsets: tuple[int, ...]
    size: int


@functools.lru_cache(maxsize=128)
def _items(layout: BlockLayout, schedule: Schedule, batch: int, heads: int) -> tuple[_Item, ...]:
    g = layout.geom
    if len(layout.groups) == 1:
        where = [(layout.groups[0], slice(None), slice(None), batch * heads)]
    else:
        where = [(layout.group_for(b, h), slice(b, b + 1), slice(h, h + 1), 1)
                 for b in range(batch) for h in range(heads)]
    items = []
    for blocks, bs, hs, bh in where:
        plan = make_plan(blocks, schedule, bh)  # every (batch, head) shares a chunk: size tiles for all
        sizes = [bh * len(c.rows) * g.block_m * c.cols.shape[1] * g.block_n for c in plan]
        offsets = tuple(int(x) for x in np.concatenate([[0], np.cumsum(sizes)])[:-1]) if sizes else ()
        items.append(_Item(blocks, bs, hs, bh, plan, offsets, int(sum(sizes))))
    return tuple(items)


@dataclass(frozen=True, eq=False)
class BlockProbs:
    """The stored P: per item a flat tensor of its chunks' ``[Bi*Hi*R, BM, C*BN]`` tiles."""

    layout: BlockLayout
    items: tuple[_Item, ...]
    tensors: tuple[torch.Tensor, ...]
    scale: float


def _tile(flat: torch.Tensor, item: _Item, i: int, bm: int, bn: int) -> torch.Tensor:
    """Chunk ``i``'s tile ``[Bi*Hi*R, BM, C*BN]`` (a view into the flat buffer)."""
    R, C = item.plan[i].cols.shape
    n = item.bh * R * bm * C * bn
    return flat[item.offsets[i]:item.offsets[i] + n].view(item.bh * R, bm, C * bn)


# Gather indices live as long as the plan's steps/chunks they belong to (keyed weakly).
_GATHER_INDEX: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _cached_index(owner, ids: torch.Tensor, n: int, bh: int) -> torch.Tensor:
    per_owner = _GATHER_INDEX.setdefault(owner, {})
    idx = per_owner.get(bh)
    if idx is None:
        idx = per_owner[bh] = (torch.arange(bh)[:, None] * n + ids[None, :]).reshape(-1)
    return idx


def _gather_index(step: Step, nkb: int, bh: int) -> torch.Tensor:
    """Row ids into a ``[bh * nkb, ...]`` view for a step's key blocks of every (batch, head)."""
    return _cached_index(step, step.index, nkb, bh)


def _key_blocks(t: torch.Tensor, step: Step, R: int, bn: int) -> list[torch.Tensor] | torch.Tensor:
    """Key blocks of a step for every (batch, head), from ``t [BH, nkb, BN, X]`` (contiguous).

    Non-affine steps: one 2-D row gather, returned as ``[BH*R, C*BN, X]``. Affine bands (sliding
    windows): per-(batch, head) strided views ``[R, C*BN, X]`` (no copy), returned as a list.
    """
    BH, nkb, _, X = t.shape
    C = step.c1 - step.c0
    if step.affine is not None:
        c0, st = step.affine
        sH, sK, sN, sX = t.stride()
        return [t[i].as_strided((R, C * bn, X), (st * sK, sN, sX), t[i].storage_offset() + c0 * sK)
                for i in range(BH)]
    rows = t.view(BH * nkb, bn * X).index_select(0, _gather_index(step, nkb, BH))  # 2-D gather: fast path
    return rows.view(BH * R, C * bn, X)


def _bmm_keys(a: torch.Tensor, keys, R: int, transpose: bool = False) -> torch.Tensor:
    """``a [BH*R, M, N] @ keys`` (or ``@ keys^T``) for either form returned by :func:`_key_blocks`."""
    if isinstance(keys, torch.Tensor):
        return torch.bmm(a, keys.transpose(1, 2) if transpose else keys)
    return torch.cat([torch.bmm(a[i * R:(i + 1) * R], k.transpose(1, 2) if transpose else k)
                      for i, k in enumerate(keys)])


def _row_index(chunk: Chunk, nqb: int, bh: int) -> torch.Tensor:
    """Row ids into a ``[bh * nqb, ...]`` view for a chunk's query blocks of every (batch, head)."""
    return _cached_index(chunk, chunk.q_index, nqb, bh)


def _rows(t: torch.Tensor, chunk: Chunk) -> torch.Tensor:
    """``[BH, nqb, BM, X]`` (contiguous) -> the chunk's rows ``[BH*R, BM, X]``."""
    BH, nqb, bm, X = t.shape
    if chunk.q_slice is not None:
        return t[:, chunk.q_slice[0]:chunk.q_slice[1]].reshape(-1, bm, X)
    rows = t.view(BH * nqb, bm * X).index_select(0, _row_index(chunk, nqb, BH))  # 2-D gather: fast path
    return rows.view(-1, bm, X)


def _add_rows(dst: torch.Tensor, val: torch.Tensor, chunk: Chunk, alpha: float = 1.0) -> None:
    """``dst [BH, nqb, BM, X]`` (contiguous) chunk rows += alpha * ``val [BH*R, BM, X]``."""
    BH, nqb, bm, X = dst.shape
    if chunk.q_slice is not None:
        dst[:, chunk.q_slice[0]:chunk.q_slice[1]].add_(val.view(BH, -1, bm, X), alpha=alpha)
    else:
        dst.view(BH * nqb, bm * X).index_add_(0, _row_index(chunk, nqb, BH), val.reshape(-1, bm * X), alpha=alpha)


def _cols(step: Step, bn: int) -> slice:
    return slice(step.c0 * bn, step.c1 * bn)


def _blocks(t: torch.Tensor, n: int, b: int) -> torch.Tensor:
    """``[Bi, Hi, L, X]`` padded to ``n * b`` rows and viewed as ``[Bi*Hi, n, b, X]``."""
    Bi, Hi, _, X = t.shape
    return _pad_len(t, n * b).contiguous().view(Bi * Hi, n, b, X)


# ---------------------------------------------------------------------------------------------
# P = rowsoftmax(scale q k^T) on the layout
# ---------------------------------------------------------------------------------------------

def _probs_forward(item: _Item, q, k, scale, cdt) -> torch.Tensor:
    g = item.blocks.geom
    bm, bn = g.block_m, g.block_n
    qb = _blocks(q.to(cdt) * scale, g.nqb, bm)  # [BH, nqb, BM, D]
    kb = _blocks(k.to(cdt), g.nkb, bn)  # [BH, nkb, BN, D]
    P = torch.empty(item.size, dtype=cdt, device=q.device)
    for i, chunk in enumerate(item.plan):
        R = len(chunk.rows)
        s = _tile(P, item, i, bm, bn)  # [BH*R, BM, C*BN]
        qt = _rows(qb, chunk)  # [BH*R, BM, D]
        for st in chunk.steps:
            K = _key_blocks(kb, st, R, bn)
            if len(chunk.steps) == 1 and isinstance(K, torch.Tensor):
                torch.bmm(qt, K.transpose(1, 2), out=s)
            else:
                s[:, :, _cols(st, bn)] = _bmm_keys(qt, K, R, transpose=True)
            if st.needs_mask:
                bias = _step_bias(item.blocks, chunk, st, cdt, q.device).dense(st.c1 - st.c0, bn)  # [R, BM, Cs*BN]
                s.view(item.bh, R, bm, -1)[..., _cols(st, bn)].add_(bias)
        # One fused softmax pass, in place (row-local: each element is read before it is written).
        torch.ops.aten._softmax.out(s, -1, False, out=s)
        if _has_empty_rows(item.blocks, chunk, cdt, q.device):
            s.nan_to_num_(0.0)  # rows with no key in the pattern: softmax of all -inf is NaN -> 0
    return P


_EMPTY_ROWS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _has_empty_rows(blocks: Blocks2D, chunk: Chunk, dtype, device) -> bool:
    """Whether some query row of the chunk has no allowed key (cached per chunk)."""
    flag = _EMPTY_ROWS.get(chunk)
    if flag is None:
        if not all(st.needs_mask for st in chunk.steps):
            flag = False
        else:
            allowed = None
            for st in chunk.steps:
                bn = blocks.geom.block_n
                row_any = (_step_bias(blocks, chunk, st, dtype, device).dense(st.c1 - st.c0, bn) == 0).any(dim=-1)  # [R, BM]
                allowed = row_any if allowed is None else allowed | row_any
            flag = not bool(allowed.all())
        _EMPTY_ROWS[chunk] = flag
    return flag


def _probs_backward(item: _Item, q, k, P, dP, scale, cdt):
    """dq, dk of one item from ``dP`` (overwritten with dS)."""
    g = item.blocks.geom
    bm, bn = g.block_m, g.block_n
    Bi, Hi, Lq, D = q.shape
    qb = _blocks(q.to(cdt) * scale, g.nqb, bm)
    kb = _blocks(k.to(cdt), g.nkb, bn)
    dq = torch.zeros(Bi * Hi, g.nqb, bm, D, dtype=cdt, device=q.device)
    dk = torch.zeros(Bi * Hi * g.nkb, bn, D, dtype=cdt, device=q.device)
    for i, chunk in enumerate(item.plan):
        R = len(chunk.rows)
        p, ds = _tile(P, item, i, bm, bn), _tile(dP, item, i, bm, bn)  # [BH*R, BM, C*BN]
        ds.sub_((p * ds).sum(dim=-1, keepdim=True)).mul_(p)  # softmax backward, in place
        qt, acc = _rows(qb, chunk), None
        for st in chunk.steps:
            dst = ds[:, :, _cols(st, bn)]  # [BH*R, BM, Cs*BN]
            part = _bmm_keys(dst, _key_blocks(kb, st, R, bn), R)  # [BH*R, BM, D]
            acc = part if acc is None else acc.add_(part)
            dk.index_add_(0, _gather_index(st, g.nkb, item.bh), torch.bmm(dst.transpose(1, 2), qt).view(-1, bn, D))
        _add_rows(dq, acc, chunk)
    dq = dq.view(Bi, Hi, -1, D)[:, :, :Lq] * scale
    return dq, dk.view(Bi, Hi, -1, D)[:, :, :k.shape[2]]  # q rows were already scaled


class _ProbsFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, items, scale, q, k):
        cdt = _compute_dtype(q.dtype)
        outs = tuple(_probs_forward(it, q[it.b, it.h], k[it.b, it.h], scale, cdt) for it in items)
        ctx.items, ctx.scale = items, scale
        ctx.save_for_backward(q, k, *outs)
        return outs

    @staticmethod
    def backward(ctx, *dPs):
        q, k, *Ps = ctx.saved_tensors
        cdt = _compute_dtype(q.dtype)
        dq = torch.zeros(q.shape, dtype=cdt, device=q.device)
        dk = torch.zeros(k.shape, dtype=cdt, device=q.device)
        for it, P, dP in zip(ctx.items, Ps, dPs):
            if dP is None:
                continue
            a, b = _probs_backward(it, q[it.b, it.h], k[it.b, it.h], P, dP.contiguous(), ctx.scale, cdt)
            dq[it.b, it.h] = a
            dk[it.b, it.h] = b
        return None, None, dq.to(q.dtype), dk.to(k.dtype)


def sparse_probs(q, k, layout: BlockLayout, schedule: Schedule, scale: float) -> BlockProbs:
    """P of ``q [B,H,L,D]``, ``k [B,Hkv,L,D]`` over ``layout``, stored block-sparse (differentiable)."""
    B, H = q.shape[:2]
    items = _items(layout, schedule, B, H)
    k = expand_heads(k, H)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        tensors = _ProbsFn.apply(items, scale, q, k)
    else:
        cdt = _compute_dtype(q.dtype)
        tensors = tuple(_probs_forward(it, q[it.b, it.h], k[it.b, it.h], scale, cdt) for it in items)
    return BlockProbs(layout, items, tuple(tensors), scale)


# ---------------------------------------------------------------------------------------------
# Hops: z_out = beta P z + gamma v
# ---------------------------------------------------------------------------------------------

def _hop_forward(item: _Item, P, z, v, beta, gamma):
    g = item.blocks.geom
    bm, bn = g.block_m, g.block_n
    Bi, Hi, L, Dv = z.shape
    zb = _blocks(z, g.nkb, bn)  # [BH, nkb, BN, Dv]
    out = _blocks(v * gamma, g.nqb, bm)  # rows without keys keep gamma * v
    for i, chunk in enumerate(item.plan):
        R = len(chunk.rows)
        p, acc = _tile(P, item, i, bm, bn), None  # [BH*R, BM, C*BN]
        for st in chunk.steps:
            part = _bmm_keys(p[:, :, _cols(st, bn)], _key_blocks(zb, st, R, bn), R)  # [BH*R, BM, Dv]
            acc = part if acc is None else acc.add_(part)
        _add_rows(out, acc, chunk, alpha=beta)
    return out.view(Bi, Hi, -1, Dv)[:, :, :L]


def _hop_backward(item: _Item, P, z, gz, beta, need_dp: bool):
    """``dz = beta P^T gz`` and (``need_dp``) ``dP = beta gz z^T`` on the stored tiles."""
    g = item.blocks.geom
    bm, bn = g.block_m, g.block_n
    Bi, Hi, L, Dv = z.shape
    zb = _blocks(z, g.nkb, bn)
    gb = _blocks(gz, g.nqb, bm)  # [BH, nqb, BM, Dv]
    dz = torch.zeros(item.bh * g.nkb, bn, Dv, dtype=z.dtype, device=z.device)
    dP = torch.empty_like(P) if need_dp else None
    for i, chunk in enumerate(item.plan):
        R = len(chunk.rows)
        p = _tile(P, item, i, bm, bn)
        gr = _rows(gb, chunk)  # [BH*R, BM, Dv]
        for st in chunk.steps:
            cols = _cols(st, bn)
            t = torch.bmm(p[:, :, cols].transpose(1, 2), gr)  # [BH*R, C*BN, Dv]
            dz.index_add_(0, _gather_index(st, g.nkb, item.bh), t.view(-1, bn, Dv), alpha=beta)
            if need_dp:
                d = _tile(dP, item, i, bm, bn)
                part = _bmm_keys(gr, _key_blocks(zb, st, R, bn), R, transpose=True)  # [BH*R, BM, Cs*BN]
                d[:, :, cols] = part.mul_(beta)
    return dz.view(Bi, Hi, -1, Dv)[:, :, :L], dP


class _HopFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, items, beta, gamma, z, v, *Ps):
        cdt = _compute_dtype(z.dtype)
        z, v = z.to(cdt), v.to(cdt)
        out = torch.empty(v.shape, dtype=cdt, device=v.device)
        for it, P in zip(items, Ps):
            out[it.b, it.h] = _hop_forward(it, P, z[it.b, it.h], v[it.b, it.h], beta, gamma)
        ctx.items, ctx.beta, ctx.gamma = items, beta, gamma
        ctx.save_for_backward(z, *Ps)
        return out

    @staticmethod
    def backward(ctx, gz):
        z, *Ps = ctx.saved_tensors
        gz = gz.to(z.dtype)
        need_dp = any(ctx.needs_input_grad[5:])
        dz = torch.empty_like(z)
        dPs = []
        for it, P in zip(ctx.items, Ps):
            d, dP = _hop_backward(it, P, z[it.b, it.h], gz[it.b, it.h], ctx.beta, need_dp)
            dz[it.b, it.h] = d
            dPs.append(dP)
        return (None, None, None, dz, gz * ctx.gamma, *dPs)


def diffusion_hop(probs: BlockProbs, z: torch.Tensor, v: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """``beta * P z + gamma * v`` with z, v ``[B, H, L, Dv]`` (differentiable in P, z and v)."""
    tensors = probs.tensors
    if torch.is_grad_enabled() and (z.requires_grad or v.requires_grad or any(t.requires_grad for t in tensors)):
        return _HopFn.apply(probs.items, beta, gamma, z, v, *tensors)
    cdt = _compute_dtype(z.dtype)
    z, v = z.to(cdt), v.to(cdt)
    out = torch.empty(v.shape, dtype=cdt, device=v.device)
    for it, P in zip(probs.items, tensors):
        out[it.b, it.h] = _hop_forward(it, P, z[it.b, it.h], v[it.b, it.h], beta, gamma)
    return out


# ---------------------------------------------------------------------------------------------
# Stage registrations
# ---------------------------------------------------------------------------------------------

@register_stage("torch", SparseProbs)
def run_sparse_probs(stage: SparseProbs, env: dict, ctx: RunContext) -> dict:
    q, k = (env[n] for n in stage.inputs)
    s = stage.schedule
    layout = stage.pattern.layout(q.shape[2], k.shape[2], s.block_m, s.block_n, batch=ctx.batch, heads=ctx.heads)
    return {stage.outputs[0]: sparse_probs(q, k, layout, s, ctx.scale)}


@register_stage("torch", DiffusionHop)
def run_diffusion_hop(stage: DiffusionHop, env: dict, ctx: RunContext) -> dict:
    probs, z, v = (env[n] for n in stage.inputs)
    out = diffusion_hop(probs, expand_heads(z, ctx.heads), expand_heads(v, ctx.heads), stage.beta, stage.gamma)
    return {stage.outputs[0]: out}


def run_expand_heads(stage: ExpandHeads, env: dict, ctx: RunContext) -> dict:
    return {o: expand_heads(env[i], ctx.heads) for i, o in zip(stage.inputs, stage.outputs)}


def run_axpby(stage: Axpby, env: dict, ctx: RunContext) -> dict:
    x, y = (env[n] for n in stage.inputs)
    return {stage.outputs[0]: torch.add(x.to(y.dtype) * stage.beta, y, alpha=stage.gamma)}


def run_pass_through(stage: PassThrough, env: dict, ctx: RunContext) -> dict:
    return {stage.outputs[0]: expand_heads(env[stage.inputs[1]], ctx.heads)}


# These three are plain tensor algebra and run on any device: the triton backend uses them too
# (its recompute-schedule hops are BlockSparseAttention kernels joined by Axpby).
for _backend in ("torch", "triton"):
    register_stage(_backend, ExpandHeads)(run_expand_heads)
    register_stage(_backend, Axpby)(run_axpby)
    register_stage(_backend, PassThrough)(run_pass_through)
