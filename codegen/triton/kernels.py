"""Runtime of the generated Triton kernels: sources, layout tensors, launches, autograd.

``kernels_for`` renders (or fetches from the on-disk cache) the module for a pattern, schedule
and dtype; ``layout_tensors`` turns a :class:`~attncompiler.layout.block_layout.BlockLayout` into the int32
BCSR tensors the kernels walk (plus byte masks for opaque predicates); ``TritonAttentionFn``
runs the forward kernel and, for the backward pass, the dk/dv kernel over the transposed lists
and the dq kernel. Nothing here depends on the sequence length except the layout tensors.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from attncompiler.program.autograd_guard import single_backward
from attncompiler.errors import ScheduleError
from attncompiler.ir import expr as E
from attncompiler.ir.expr import Expr
from attncompiler.layout.block_layout import BlockLayout, partial_masks
from attncompiler.dsl.pattern import Complement, Intersection, Pattern, PerHead, Union
from attncompiler.program.schedule import Schedule

from .. import cache
from .render import KernelSource, render_predicate, template_digest
from .common import VALID_TILES, dot_precision, on_device, pad_dim, tool_versions

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}




def kernel_tiles(schedule: Schedule) -> tuple[int, int]:
    """Kernel tile sizes ``(TM, TN)``: the schedule's tiles, or the largest valid tile that
    divides each layout block.

    Raises:
        ScheduleError: a tile is not a power of two in 16..128, or no valid tile divides a block.
    """
    out = []
    for name, explicit, blk in (("kernel_block_m", schedule.kernel_block_m, schedule.block_m),
                                ("kernel_block_n", schedule.kernel_block_n, schedule.block_n)):
        if explicit is not None:
            if explicit not in VALID_TILES:
                raise ScheduleError(f"{name}={explicit} is not usable by the triton backend; "
                                    f"kernel tiles must be one of {VALID_TILES} (tl.dot needs >= 16)")
            out.append(explicit)
            continue
        fits = [t for t in VALID_TILES if blk % t == 0]
        if not fits:
            raise ScheduleError(f"layout block size {blk} has no kernel tile in {VALID_TILES} dividing it; "
                                "use a block size that is a multiple of 16 with the triton backend")
        out.append(fits[-1])
    return out[0], out[1]




@functools.lru_cache(maxsize=512)
def predicate_for(pattern: Pattern, q_len: int, kv_len: int) -> Expr | None:
    return kernel_predicate(pattern, q_len, kv_len)


def kernel_predicate(pattern: Pattern, q_len: int, kv_len: int) -> Expr | None:
    """The predicate a kernel evaluates: ``pattern.predicate``, and for per-head patterns (which
    have none) a dispatch on ``h % n`` over the heads' predicates. None: opaque."""
    e = pattern.predicate(q_len, kv_len)
    if e is not None:
        return e
    if isinstance(pattern, PerHead):
        parts = [kernel_predicate(p, q_len, kv_len) for p in pattern.patterns]
        if any(x is None for x in parts):
            return None
        n = len(parts)
        out = parts[-1]
        for i in range(n - 2, -1, -1):
            out = E.where((E.H % n).eq(i), parts[i], out)
        return out
    if isinstance(pattern, (Union, Intersection, Complement)):
        parts = [kernel_predicate(p, q_len, kv_len) for p in pattern.children()]
        if any(x is None for x in parts):
            return None
        if isinstance(pattern, Complement):
            return ~parts[0]
        return functools.reduce((lambda a, b: a | b) if isinstance(pattern, Union) else (lambda a, b: a & b), parts)
    return None


@dataclass(frozen=True)
class Kernels:
    """A generated module and where it came from."""

    module: ModuleType
    key: str
    path: Path
    source: KernelSource


def kernel_source(pattern: Pattern, predicate: Expr | None, schedule: Schedule, dtype: torch.dtype) -> KernelSource:
    """Everything a generated file depends on (pattern structure, schedule, dtype)."""
    return KernelSource(repr(pattern), render_predicate(predicate), predicate is None, describe_schedule(schedule),
                        _DTYPE_NAMES[dtype], dot_precision(dtype))


def describe_schedule(schedule: Schedule) -> str:
    """The schedule as the generated kernels see it (torch-only knobs left out of the cache key)."""
    tm, tn = kernel_tiles(schedule)
    return (f"block=({schedule.block_m}, {schedule.block_n}), tile=({tm}, {tn}), "
            f"warps={schedule.num_warps}, stages={schedule.num_stages}")


def cache_key(src: KernelSource) -> str:
    """Content hash of the source description, the templates and the library versions."""
    return cache.content_key({"source": src.__dict__, "templates": template_digest(), "versions": tool_versions()})


def kernels_for(pattern: Pattern, q_len: int, kv_len: int, schedule: Schedule, dtype: torch.dtype) -> Kernels:
    """The generated kernel module for this pattern, schedule and dtype (cached in memory and on disk)."""
    src = kernel_source(pattern, predicate_for(pattern, q_len, kv_len), schedule, dtype)
    key = cache_key(src)
    module, path = cache.load(key, src.render(key))
    return Kernels(module, key, path, src)


# ---------------------------------------------------------------------------------------------
# Layout tensors
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class LayoutTensors:
    """What the kernels read about one layout on one device.

    ``fwd``/``bwd`` hold ``(num, idx, full_num, full_idx, mask_ids)`` with shapes
    ``[Bm, Hm, n]`` and ``[Bm, Hm, n, W]`` (int32): partial and full blocks per query block
    (forward, dq) and per key block (dk/dv). ``mask_tab`` ``[T, BM, BN]`` uint8 holds the byte
    masks of partial blocks when the predicate is opaque (else one dummy byte).
    """

    fwd: tuple[torch.Tensor, ...]
    bwd: tuple[torch.Tensor, ...]
    mask_tab: torch.Tensor
    bufs: torch.Tensor
    buf_meta: torch.Tensor
    opaque: bool

    @property
    def bm_hm(self) -> tuple[int, int]:
        return int(self.fwd[0].shape[0]), int(self.fwd[0].shape[1])


def _pack(ptr: np.ndarray, values: np.ndarray, full: np.ndarray, n_rows: int, width: int) -> np.ndarray:
    """ELL-pack ``values`` of the partial entries of a CSR structure, in CSR order per row."""
    row_of = np.repeat(np.arange(n_rows), np.diff(ptr))
    sel = ~full
    r = row_of[sel]
    counts = np.bincount(r, minlength=n_rows)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    out = np.zeros((n_rows, width), dtype=np.int32)
    out[r, np.arange(len(r)) - starts[r]] = values[sel]
    return out


@functools.lru_cache(maxsize=64)
def _layout_tensors(layout: BlockLayout, opaque: bool, device: str) -> tuple:
    g = layout.geom
    fwd, bwd = layout.bcsr(), layout.bcsr(transposed=True)
    Bm, Hm = layout.group_index.shape
    wf, wb = fwd["kv_indices"].shape[-1], bwd["q_indices"].shape[-1]
    ids_f = torch.zeros(Bm, Hm, g.nqb, wf, dtype=torch.int32)
    ids_b = torch.zeros(Bm, Hm, g.nkb, wb, dtype=torch.int32)
    tabs = []
    if opaque:
        base, per_group = 0, []
        for grp in layout.groups:
            partial = np.flatnonzero(~grp.full)
            ids = np.full(grp.num_blocks, -1, dtype=np.int64)
            ids[partial] = base + np.arange(len(partial))
            base += len(partial)
            if len(partial):
                tabs.append(partial_masks(grp, partial).to(torch.uint8))  # [P, BM, BN]
            col_ptr, _, full_t = grp.csc
            order = np.lexsort((grp.rows, grp.cols))  # the order of grp.csc
            per_group.append((_pack(grp.row_ptr, ids, grp.full, g.nqb, wf),
                              _pack(col_ptr, ids[order], full_t, g.nkb, wb)))
        for (bi, hi), gid in np.ndenumerate(layout.group_index):
            ids_f[bi, hi] = torch.from_numpy(per_group[gid][0])
            ids_b[bi, hi] = torch.from_numpy(per_group[gid][1])
    tab = torch.cat(tabs) if tabs else torch.zeros(1, dtype=torch.uint8)

    def dev(t):
        return t.to(device).contiguous()

    f = tuple(dev(fwd[k]) for k in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices")) + (dev(ids_f),)
    b = tuple(dev(bwd[k]) for k in ("q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices")) + (dev(ids_b),)
    return f, b, dev(tab)


@functools.lru_cache(maxsize=64)
def _buffer_tensors(predicate: Expr | None, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    bufs = predicate.buffers() if predicate is not None else ()
    if not bufs:
        return torch.zeros(1, dtype=torch.int64, device=device), torch.zeros(1, 2, dtype=torch.int64, device=device)
    lengths = [len(b) for b in bufs]
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    data = torch.from_numpy(np.concatenate([b.data for b in bufs] + [np.zeros(1, np.int64)]))
    meta = torch.tensor(np.stack([offsets, lengths], axis=1), dtype=torch.int64)
    return data.to(device), meta.to(device)


def layout_tensors(layout: BlockLayout, device: torch.device) -> LayoutTensors:
    """Kernel-side tensors of ``layout`` on ``device`` (cached per layout and device)."""
    pred = predicate_for(layout.pattern, layout.q_len, layout.kv_len)
    opaque = pred is None
    f, b, tab = _layout_tensors(layout, opaque, str(device))
    bufs, meta = _buffer_tensors(pred, str(device))
    return LayoutTensors(f, b, tab, bufs, meta, opaque)


# ---------------------------------------------------------------------------------------------
# Launches and autograd
# ---------------------------------------------------------------------------------------------



@dataclass(frozen=True, eq=False)
class Plan:
    """Everything one call needs besides q, k, v: kernels, layout tensors and launch sizes."""

    kernels: Kernels
    layout: BlockLayout
    tensors: LayoutTensors
    schedule: Schedule
    tile_m: int
    tile_n: int

    def consts(self, q: torch.Tensor, v: torch.Tensor) -> dict:
        return dict(BM=self.layout.block_m, BN=self.layout.block_n, TM=self.tile_m, TN=self.tile_n,
                    D_PAD=pad_dim(q.shape[-1]), DV_PAD=pad_dim(v.shape[-1]), OPAQUE=self.tensors.opaque,
                    DOT_PREC=dot_precision(q.dtype), num_warps=self.schedule.num_warps,
                    num_stages=self.schedule.num_stages)


def make_plan(layout: BlockLayout, schedule: Schedule, dtype: torch.dtype, device: torch.device) -> Plan:
    """Kernels and layout tensors for one call (everything cached underneath)."""
    tm, tn = kernel_tiles(schedule)
    kern = kernels_for(layout.pattern, layout.q_len, layout.kv_len, schedule, dtype)
    return Plan(kern, layout, layout_tensors(layout, device), schedule, tm, tn)


def _forward(plan: Plan, q, k, v, scale: float):
    B, H, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    out = torch.empty((B, H, Lq, Dv), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)
    t = plan.tensors
    Bm, Hm = t.bm_hm
    grid = (-(-Lq // plan.tile_m), B * H)
    plan.kernels.module._attn_fwd[grid](
        q, k, v, out, lse, *t.fwd, t.mask_tab, t.bufs, t.buf_meta, scale,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        H, H // Hkv, Bm, Hm, plan.layout.num_q_blocks, t.fwd[1].shape[-1], Lq, Lk, D, Dv,
        EVEN_N=Lk % plan.tile_n == 0, **plan.consts(q, v))
    return out, lse


def _backward(plan: Plan, q, k, v, out, lse, dout, scale: float):
    B, H, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    delta = (dout.float() * out.float()).sum(-1).contiguous()  # [B, H, Lq]
    dq = torch.empty((B, H, Lq, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, Hkv, Lk, D), dtype=k.dtype, device=q.device)
    dv = torch.empty((B, Hkv, Lk, Dv), dtype=v.dtype, device=q.device)
    t = plan.tensors
    Bm, Hm = t.bm_hm
    consts = plan.consts(q, v)
    strides = (*q.stride(), *k.stride(), *v.stride(), *dout.stride())
    plan.kernels.module._attn_bwd_dkdv[(-(-Lk // plan.tile_n), B * Hkv)](
        q, k, v, dout, dk, dv, lse, delta, *t.bwd, t.mask_tab, t.bufs, t.buf_meta, scale, *strides,
        H, Hkv, H // Hkv, Bm, Hm, plan.layout.num_kv_blocks, t.bwd[1].shape[-1], Lq, Lk, D, Dv, **consts)
    plan.kernels.module._attn_bwd_dq[(-(-Lq // plan.tile_m), B * H)](
        q, k, v, dout, dq, lse, delta, *t.fwd, t.mask_tab, t.bufs, t.buf_meta, scale, *strides,
        H, H // Hkv, Bm, Hm, plan.layout.num_q_blocks, t.fwd[1].shape[-1], Lq, Lk, D, Dv, **consts)
    return dq, dk, dv




class TritonAttentionFn(torch.autograd.Function):
    """Differentiable block-sparse attention running the generated kernels."""

    @staticmethod
    def forward(ctx, q, k, v, plan: Plan, scale: float):
        with on_device(q):
            out, lse = _forward(plan, q, k, v, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.scale = plan, scale
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @single_backward("BlockSparseAttention (triton backend)")
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        with on_device(q):
            dq, dk, dv = _backward(ctx.plan, q, k, v, out, lse, dout, ctx.scale)
        return dq, dk, dv, None, None


def triton_attention(q, k, v, layout: BlockLayout, schedule: Schedule, scale: float):
    """``(out [B,H,Lq,Dv], lse [B,H,Lq] float32)`` of the layout's pattern with generated kernels."""
    plan = make_plan(layout, schedule, q.dtype, q.device)
    return TritonAttentionFn.apply(q, k, v, plan, scale)
