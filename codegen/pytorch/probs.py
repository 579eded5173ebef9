"""Stored block-sparse attention probabilities: "attention with probabilities out" and "apply P".

Cross-layer reuse (Reuse Transformers, Bhojanapalli et al. 2021) applies one layer's attention
map to the next layer's values. Instead of recomputing the map from the kept Q/K (the
flash-style path of :mod:`torch_attention`), :func:`attention_with_probs` computes the layer's
attention and keeps its normalized probabilities ``P = softmax(scale * q k^T + mask)`` **over the
block layout only** (O(non-empty blocks x block area), never L x L); :func:`apply_probs` computes ``P @ v`` for
any values (no projections, no QK^T, no softmax). Both are differentiable and exact:
``dv = P^T dout`` and ``dP = dout v^T`` from every use are summed by autograd before the softmax
backward ``dS = P * (dP - rowsum(P * dP))`` gives ``dq`` and ``dk``.

The storage reuses :func:`torch_attention_plan.make_plan`'s buckets, chunks, strided key views and
step masks, with one step per chunk (a whole row is normalized at once): per (batch, kv head)
the flat tensor holds each chunk's ``[R, G*bm, W*bn]`` tile back to back (GQA query heads are
folded into the rows, as in the attention kernel). float32 CPU tensors run the forward as one
parallel region of the fused C kernel (``attn_probs``, every row of the plan at once) when the
kernels are built (:mod:`.fused_cpu`), and so does :func:`apply_probs`' forward (``attn_apply``,
V read in place); other dtypes and devices, and every backward, keep the ATen ops. Layouts whose
block structure depends on the batch or head (several layout groups) are not supported here:
callers keep the recompute path.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
import weakref
from dataclasses import dataclass

import numpy as np
import torch

from attncompiler.program.autograd_guard import single_backward
from attncompiler.errors import CodegenError, InputError, UnsupportedError
from attncompiler.layout.block_layout import BlockLayout, Blocks2D
from attncompiler.program.schedule import Schedule

from ..cpu import attention as kernels
from ..cpu.tables import kernel_tables
from . import fused_cpu
from .common import Operands, compute_dtype_for, fold, key_blocks, pad_len, step_keys, write_rows
from .attention_plan import Chunk, step_bias, make_plan


@dataclass(frozen=True, eq=False)
class ProbsPlan:
    """Where each chunk's probability tile lives in the flat per-(batch, kv head) storage."""

    blocks: Blocks2D
    chunks: tuple[Chunk, ...]
    offsets: tuple[int, ...]
    size: int
    group: int

    def tile(self, flat: torch.Tensor, i: int) -> torch.Tensor:
        """Chunk ``i``'s ``[R, G*bm, W*bn]`` view of one (batch, kv head) row ``flat [size]``."""
        c = self.chunks[i]
        g = self.blocks.geom
        cols = (c.steps[0].c1 - c.steps[0].c0) * g.block_n
        n = len(c.rows) * self.group * g.block_m * cols
        return flat[self.offsets[i]:self.offsets[i] + n].view(len(c.rows), self.group * g.block_m, cols)


@functools.lru_cache(maxsize=64)
def probs_plan(blocks: Blocks2D, schedule: Schedule, group: int) -> ProbsPlan:
    """The attention plan with one key step per chunk, and each chunk's storage offset."""
    g = blocks.geom
    one_step = dataclasses.replace(schedule, key_blocks_per_step=max(schedule.key_blocks_per_step, g.nkb))
    chunks = make_plan(blocks, one_step, group)
    offsets, size = [], 0
    for c in chunks:
        assert len(c.steps) == 1  # whole rows: the softmax normalizes each row once
        offsets.append(size)
        size += len(c.rows) * group * g.block_m * (c.steps[0].c1 - c.steps[0].c0) * g.block_n
    return ProbsPlan(blocks, chunks, tuple(offsets), size, group)


_KERNEL_ROWS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # ProbsPlan -> ProbsRows
_KERNEL_ROWS_LOCK = threading.Lock()


def _kernel_rows(plan: ProbsPlan, tables: kernels.KernelTables) -> kernels.ProbsRows:
    """Every row of the plan as the fused kernel reads it (cached with the plan): each column's
    key block and kind (-2 padding, -1 full, else the tables' mask id of the partial block)."""
    with _KERNEL_ROWS_LOCK:
        got = _KERNEL_ROWS.get(plan)
    if got is not None:
        return got
    g = plan.blocks.geom
    pptr = tables.part_ptr.numpy()
    t_keys = np.repeat(np.arange(g.nqb, dtype=np.int64), np.diff(pptr)) * g.nkb + tables.part_cols.numpy()
    order = np.argsort(t_keys, kind="stable")
    t_keys, t_mask = t_keys[order], tables.part_mask.numpy()[order]
    qb, width, offset, start, cols, kinds, used = [], [], [], [], [], [], 0
    for i, chunk in enumerate(plan.chunks):
        st = chunk.steps[0]
        c = np.ascontiguousarray(chunk.step_cols(st), dtype=np.int64)  # [R, W]
        full = chunk.step_full(st)
        R, W = c.shape
        kind = np.where(full, -1, -2).astype(np.int32)
        if chunk.explicit is not None:  # rows with gaps list exactly their blocks: no padding
            pr, pc = np.nonzero(~full)
        else:
            pr, pc = st.partial_r.numpy(), st.partial_c.numpy()
        if len(pr):
            keys = chunk.rows[pr].astype(np.int64) * g.nkb + c[pr, pc]
            at = np.minimum(np.searchsorted(t_keys, keys), max(len(t_keys) - 1, 0))
            if len(t_keys) == 0 or not (t_keys[at] == keys).all():
                raise CodegenError(f"a partial block of query-block rows {chunk.rows[pr].tolist()[:4]}... is missing "
                                   "from the kernel tables; hint: build the tables and the plan from the same layout")
            kind[pr, pc] = t_mask[at]
        qb.append(chunk.rows.astype(np.int64))
        width.append(np.full(R, W, dtype=np.int64))
        offset.append(plan.offsets[i] + np.arange(R, dtype=np.int64) * (plan.group * g.block_m * W * g.block_n))
        start.append(used + np.arange(R, dtype=np.int64) * W)
        cols.append(c.reshape(-1))
        kinds.append(kind.reshape(-1))
        used += R * W

    def cat(parts, dtype):
        return torch.from_numpy(np.ascontiguousarray(np.concatenate(parts) if parts else np.zeros(0), dtype=dtype))

    rows = kernels.ProbsRows(cat(qb, np.int64), cat(width, np.int64), cat(offset, np.int64), cat(start, np.int64),
                             cat(cols, np.int64), cat(kinds, np.int32), plan.size, plan.group)
    with _KERNEL_ROWS_LOCK:
        return _KERNEL_ROWS.setdefault(plan, rows)


def _single_group(layout: BlockLayout) -> Blocks2D:
    if len(layout.groups) != 1:
        raise UnsupportedError(f"stored probabilities need one block layout for every batch and head; "
                               f"{layout.groups[0].pattern!r} has {len(layout.groups)} (batch- or head-dependent "
                               "pattern): use the recompute path (block_sparse_attention) instead")
    return layout.groups[0]


def _softmax_rows_(t: torch.Tensor) -> None:
    """In-place softmax over the last dim (aten's out= variant, which is exact when aliased:
    it saves a copy of the whole tile; tests compare against the float64 reference)."""
    torch.ops.aten._softmax.out(t, -1, False, out=t)


def _add_mask_(s: torch.Tensor, mask, G: int, bn: int) -> None:
    """Add the step's additive mask to ``s [R, G*bm, N]`` in place (only on its masked columns)."""
    R, GM, N = s.shape
    s4 = s.view(R, G, GM // G, N)
    for (j0, j1), bias in zip(mask.runs, mask.biases):
        s4[..., j0 * bn:j1 * bn].add_(bias[:, None])


class ProbsWorkspace:
    """Reusable storage for probabilities that no gradient will need (inference).

    Fresh multi-megabyte tensors are page-faulted in on every call, which on CPU costs about
    as much as computing them; a caller that knows when a map is dead (e.g. a transformer stack
    after the last layer that reuses it) hands it back with :meth:`release` and the next
    :func:`attention_with_probs` call writes into the same memory.
    """

    def __init__(self) -> None:
        self._free: list[torch.Tensor] = []

    def take(self, numel: int, dtype: torch.dtype, device) -> torch.Tensor:
        """A 1-D buffer of at least ``numel`` elements (a free one when it fits)."""
        for i, buf in enumerate(self._free):
            if buf.dtype == dtype and buf.device == torch.device(device) and buf.numel() >= numel:
                return self._free.pop(i)
        return torch.empty(numel, dtype=dtype, device=device)

    def release(self, probs: StoredProbs) -> None:
        """Give the storage of ``probs`` back (the caller promises not to use ``probs`` again)."""
        base = probs.p if probs.p._base is None else probs.p._base
        if base.dim() == 1 and not base.requires_grad:
            self._free.append(base)

    def clear(self) -> None:
        """Drop every free buffer."""
        self._free.clear()


def _probs_forward(q, k, v, layout, schedule, scale, workspace=None):
    """``(out, p)``: each tile's probabilities are written to the storage and multiplied by V
    while they are still in cache."""
    blocks = _single_group(layout)
    g = blocks.geom
    ops = Operands(q, k, v, g, scale, compute_dtype_for(q.dtype))
    G = ops.G
    plan = probs_plan(blocks, schedule, G)
    n = ops.B * ops.Hkv * plan.size  # every entry is written: no zero fill
    buf = workspace.take(n, ops.q.dtype, q.device) if workspace is not None else torch.empty(n, dtype=ops.q.dtype, device=q.device)
    p = buf[:n].view(ops.B, ops.Hkv, plan.size)
    tables = kernel_tables(blocks) if fused_cpu.operands_fit(q, k, v, dtypes=(torch.float32,)) else None
    if tables is not None:  # every row of the plan in one parallel region of the fused kernel
        out, _ = kernels.probs_forward(q, k, v, tables, _kernel_rows(plan, tables), scale, buf[:n],
                                       threads=torch.get_num_threads())
        return out, p
    out = torch.zeros(ops.B, ops.Hkv, G, g.nqb, g.block_m, ops.Dv, dtype=ops.q.dtype, device=q.device)
    for i, chunk in enumerate(plan.chunks):
        st = chunk.steps[0]
        R = len(chunk.rows)
        K, V = step_keys(ops.k, chunk, st), step_keys(ops.v, chunk, st)  # [B, Hkv, R, C*bn, X]
        mask = step_bias(blocks, chunk, st, ops.q.dtype, q.device) if st.needs_mask else None
        q_rows = ops.rows(ops.q, chunk)  # [B, Hkv, G, R, bm, D]
        for b in range(ops.B):
            for h in range(ops.Hkv):
                s = plan.tile(p[b, h], i)  # [R, G*bm, C*bn]
                torch.bmm(fold(q_rows[b, h]), K[b, h].transpose(1, 2), out=s)
                if mask is not None:
                    _add_mask_(s, mask, G, ops.bn)
                _softmax_rows_(s)
                if mask is not None and mask.empty_rows is not None:  # no visible key: zeros, not NaN
                    R_, GM, N = s.shape
                    s.view(R_, G, GM // G, N).masked_fill_(mask.empty_rows[:, None, :, None], 0.0)
                _pv_into(out[b, h], s, V[b, h], chunk)
    return _unpad_out(out, g, q.dtype), p


def _pv_into(dst: torch.Tensor, pt: torch.Tensor, V: torch.Tensor, chunk: Chunk) -> None:
    """``dst [G, nqb, bm, Dv]`` rows of the chunk = ``pt [R, G*bm, N] @ V [R, N, Dv]``."""
    if dst.shape[0] == 1 and chunk.q_slice is not None:  # write straight into the output rows
        torch.bmm(pt, V, out=dst[0, chunk.q_slice[0]:chunk.q_slice[1]])
    else:
        write_rows(dst, torch.bmm(pt, V), chunk)


def _unpad_out(out: torch.Tensor, g, dtype) -> torch.Tensor:
    """``[B, Hkv, G, nqb, bm, Dv]`` -> ``[B, H, Lq, Dv]`` in ``dtype``."""
    B, Hkv, G, _, _, Dv = out.shape
    return out.view(B, Hkv * G, g.nqb * g.block_m, Dv)[:, :, :g.q_len].to(dtype)


def _probs_backward(q, k, v, p, dout, dp, layout, schedule, scale):
    """``(dq, dk, dv)`` given ``dout`` of this layer's output and ``dp`` of the stored
    probabilities (from their other uses)."""
    blocks = _single_group(layout)
    g = blocks.geom
    cdt = p.dtype
    ops = Operands(q, k, v, g, scale, cdt)
    plan = probs_plan(blocks, schedule, ops.G)
    dq = torch.zeros(ops.B, ops.Hkv, ops.G, g.nqb, g.block_m, ops.D, dtype=cdt, device=q.device)
    dk = torch.zeros(ops.B, ops.Hkv, g.nkb, g.block_n, ops.D, dtype=cdt, device=q.device)
    dv = torch.zeros(ops.B, ops.Hkv, g.nkb, g.block_n, ops.Dv, dtype=cdt, device=q.device)
    do_all = pad_len(dout.to(cdt), g.nqb * g.block_m).reshape(ops.B, ops.Hkv, ops.G, g.nqb, g.block_m, ops.Dv)
    dp = dp.to(cdt).contiguous()  # tiles are views of its rows
    for i, chunk in enumerate(plan.chunks):
        st = chunk.steps[0]
        R, C = len(chunk.rows), st.c1 - st.c0
        K, V = step_keys(ops.k, chunk, st), step_keys(ops.v, chunk, st)
        q_rows, do_rows = ops.rows(ops.q, chunk), ops.rows(do_all, chunk)
        index = chunk.step_index(st).to(q.device)  # dk/dv scatter, built per chunk
        for b in range(ops.B):
            for h in range(ops.Hkv):
                pt = plan.tile(p[b, h], i)  # [R, G*bm, C*bn]
                do = fold(do_rows[b, h])  # [R, G*bm, Dv]
                dv[b, h].index_add_(0, index, torch.bmm(pt.transpose(1, 2), do).view(R * C, g.block_n, ops.Dv))
                dpt = torch.baddbmm(plan.tile(dp[b, h], i), do, V[b, h].transpose(1, 2))  # both uses of P
                ds = dpt.sub_((pt * dpt).sum(dim=-1, keepdim=True)).mul_(pt)  # softmax backward; masked P = 0
                write_rows(dq[b, h], torch.bmm(ds, K[b, h]), chunk)
                dk[b, h].index_add_(0, index, torch.bmm(ds.transpose(1, 2), fold(q_rows[b, h]))
                                    .view(R * C, g.block_n, ops.D))
    Lq, Lk = q.shape[2], k.shape[2]
    return ((dq.view(q.shape[0], q.shape[1], -1, ops.D)[:, :, :Lq] * scale).to(q.dtype),
            dk.view(ops.B, ops.Hkv, -1, ops.D)[:, :, :Lk].to(k.dtype),
            dv.view(ops.B, ops.Hkv, -1, ops.Dv)[:, :, :Lk].to(v.dtype))


class _ProbsFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, layout, schedule, scale):
        out, p = _probs_forward(q, k, v, layout, schedule, scale)
        ctx.save_for_backward(q, k, v, p)
        ctx.layout, ctx.schedule, ctx.scale = layout, schedule, scale
        return out, p

    @staticmethod
    @single_backward("stored attention probabilities (torch backend, cross-layer reuse)")
    def backward(ctx, dout, dp):
        q, k, v, p = ctx.saved_tensors
        dq, dk, dv = _probs_backward(q, k, v, p, dout, dp, ctx.layout, ctx.schedule, ctx.scale)
        return dq, dk, dv, None, None, None


def _apply_forward(sp: StoredProbs, p, v):
    g = sp.plan.blocks.geom
    B, Hkv, _, Dv = v.shape
    fused = fused_cpu.operands_fit(p, v, dtypes=(torch.float32,))
    tables = kernel_tables(sp.plan.blocks) if fused else None
    if tables is not None:  # every row in one parallel region of the fused kernel, V read in place
        return kernels.apply_forward(p.detach(), v.detach(), tables, _kernel_rows(sp.plan, tables), g.q_len,
                                     threads=torch.get_num_threads())
    vb = key_blocks(v, g, p.dtype)  # [B, Hkv, nkb, bn, Dv]
    out = torch.zeros(B, Hkv, sp.plan.group, g.nqb, g.block_m, Dv, dtype=p.dtype, device=v.device)
    for i, chunk in enumerate(sp.plan.chunks):
        V = step_keys(vb, chunk, chunk.steps[0])  # [B, Hkv, R, C*bn, Dv]
        for b in range(B):
            for h in range(Hkv):
                _pv_into(out[b, h], sp.plan.tile(p[b, h], i), V[b, h], chunk)
    return _unpad_out(out, g, v.dtype)


def _apply_backward(sp: StoredProbs, p, v, dout):
    g = sp.plan.blocks.geom
    G = sp.plan.group
    B, Hkv, _, Dv = v.shape
    cdt = p.dtype
    vb = key_blocks(v, g, cdt)
    do_all = pad_len(dout.to(cdt), g.nqb * g.block_m).reshape(B, Hkv, G, g.nqb, g.block_m, Dv)
    dp = torch.empty_like(p)
    dv = torch.zeros(B, Hkv, g.nkb, g.block_n, Dv, dtype=cdt, device=v.device)
    for i, chunk in enumerate(sp.plan.chunks):
        st = chunk.steps[0]
        R, C = len(chunk.rows), st.c1 - st.c0
        V = step_keys(vb, chunk, st)
        index = chunk.step_index(st).to(v.device)
        rows = do_all[:, :, :, chunk.q_slice[0]:chunk.q_slice[1]] if chunk.q_slice is not None else \
            do_all.index_select(3, chunk.q_index)
        for b in range(B):
            for h in range(Hkv):
                do = fold(rows[b, h])  # [R, G*bm, Dv]
                pt = sp.plan.tile(p[b, h], i)
                torch.bmm(do, V[b, h].transpose(1, 2), out=sp.plan.tile(dp[b, h], i))
                dv[b, h].index_add_(0, index, torch.bmm(pt.transpose(1, 2), do).view(R * C, g.block_n, Dv))
    return dp, dv.view(B, Hkv, -1, Dv)[:, :, :v.shape[2]].to(v.dtype)


class _ApplyFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, p, v, sp):
        ctx.save_for_backward(p, v)
        ctx.sp = sp
        return _apply_forward(sp, p, v)

    @staticmethod
    @single_backward("apply_probs (torch backend, cross-layer reuse)")
    def backward(ctx, dout):
        p, v = ctx.saved_tensors
        dp, dv = _apply_backward(ctx.sp, p, v, dout)
        return dp, dv, None


@dataclass(frozen=True, eq=False)
class StoredProbs:
    """Attention probabilities over a block layout (from :func:`attention_with_probs`).

    Attributes:
        p: ``[B, Hkv, size]`` flat tiles in the compute dtype (differentiable).
        plan: where each chunk's tile lives.
        heads: query heads ``H = Hkv * G``.
    """

    p: torch.Tensor
    plan: ProbsPlan
    heads: int

    def select_heads(self, heads) -> StoredProbs:
        """The probabilities of some heads (a view for a contiguous range; needs ``G == 1``)."""
        if self.plan.group != 1:
            raise UnsupportedError("selecting heads of grouped-query probabilities is not supported")
        heads = list(heads)
        if not heads or not all(0 <= h < self.heads for h in heads):
            raise InputError(f"heads {heads} must be a non-empty list of indices in [0, {self.heads - 1}]")
        if heads == list(range(heads[0], heads[-1] + 1)):
            p = self.p[:, heads[0]:heads[-1] + 1]
        else:
            p = self.p.index_select(1, torch.tensor(heads, device=self.p.device))
        return StoredProbs(p, self.plan, len(heads))

    def to_dense(self) -> torch.Tensor:
        """``[B, H, Lq, Lk]`` dense probabilities (for tests and inspection only: L x L memory)."""
        g = self.plan.blocks.geom
        G = self.plan.group
        B, Hkv = self.p.shape[:2]
        out = self.p.new_zeros(B, Hkv, G, g.nqb, g.block_m, g.nkb, g.block_n)
        for i, chunk in enumerate(self.plan.chunks):
            st = chunk.steps[0]
            R, C = len(chunk.rows), st.c1 - st.c0
            cols = torch.from_numpy(np.ascontiguousarray(chunk.step_cols(st)))  # [R, C]
            rows = torch.from_numpy(chunk.rows.copy())
            for b in range(B):
                for h in range(Hkv):
                    t = self.plan.tile(self.p[b, h], i).view(R, G, g.block_m, C, g.block_n)
                    for j in range(C):  # padding columns hold zeros: adding them is harmless
                        out[b, h, :, rows, :, cols[:, j]] += t[:, :, :, j]  # indexed dims first: [R, G, bm, bn]
        out = out.view(B, Hkv * G, g.nqb * g.block_m, g.nkb * g.block_n)
        return out[:, :, :g.q_len, :g.kv_len]


def attention_with_probs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout,
                         schedule: Schedule, scale: float, *, workspace: ProbsWorkspace | None = None
                         ) -> tuple[torch.Tensor, StoredProbs]:
    """Block-sparse attention that also returns its probabilities.

    ``out = P @ v`` with ``P = softmax(scale * q k^T + mask)`` kept over the layout's non-empty
    blocks (rows with no visible key are zeros). q ``[B, H, Lq, D]``, k/v ``[B, Hkv, Lk, D]``.
    Differentiable in q, k, v and through every later use of P (:func:`apply_probs`).
    ``workspace`` supplies the storage when no gradient is recorded (it is ignored otherwise:
    autograd keeps P for the backward pass).

    Raises:
        UnsupportedError: the layout has several groups (batch- or head-dependent pattern).
    """
    blocks = _single_group(layout)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        out, p = _ProbsFn.apply(q, k, v, layout, schedule, scale)
    else:  # no backward: the storage may come from (and go back to) the workspace
        out, p = _probs_forward(q, k, v, layout, schedule, scale, workspace)
    return out, StoredProbs(p, probs_plan(blocks, schedule, q.shape[1] // k.shape[1]), q.shape[1])


def apply_probs(probs: StoredProbs, v: torch.Tensor) -> torch.Tensor:
    """``P @ v``: ``[B, H, Lq, Dv]`` for values ``v [B, Hkv, Lk, Dv]`` (differentiable in P and v).

    Raises:
        InputError: v's batch, heads or length do not match the probabilities.
    """
    g = probs.plan.blocks.geom
    B, Hkv = probs.p.shape[:2]
    if v.dim() != 4 or v.shape[0] != B or v.shape[1] != Hkv or v.shape[2] != g.kv_len:
        raise InputError(f"values of shape {tuple(v.shape)} do not match probabilities of batch {B}, "
                         f"{Hkv} kv heads and key length {g.kv_len}")
    return _ApplyFn.apply(probs.p, v, probs)
