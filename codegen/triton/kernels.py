"""Runtime of the generated Triton kernels: sources, layout tensors, launches, autograd.

``kernels_for`` renders (or fetches from the on-disk cache) the module for a pattern, schedule
and dtype; ``layout_tensors`` turns a :class:`~attncompiler.layout.block_layout.BlockLayout` into
the int32 tensors the kernels walk -- partial-block lists and ``[start, end)`` ranges of full
blocks, never the expanded block lists (plus byte masks for opaque predicates);
``TritonAttentionFn`` runs the forward kernel and, for the backward pass, the dk/dv kernel over
the transposed lists and the dq kernel. Nothing here depends on the sequence length except the layout tensors.
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
from attncompiler.layout.block_layout import EVAL_CHUNK, BlockLayout, block_masks
from attncompiler.dsl.pattern import Complement, Intersection, Pattern, PerHead, Union
from attncompiler.dsl.primitives import Document
from attncompiler.program.schedule import Schedule

from .. import cache
from .split import chunk_size, merge_partials, num_splits
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
    """Cached :func:`kernel_predicate` for ``pattern`` at these lengths (None: opaque to the kernel)."""
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


def kernel_source(pattern: Pattern, predicate: Expr | None, schedule: Schedule, dtype: torch.dtype,
                  score_mod: str = "") -> KernelSource:
    """Everything a generated file depends on (pattern structure, schedule, dtype, the rendered
    score_mod helpers if any)."""
    return KernelSource(source_repr(pattern), render_predicate(predicate), predicate is None, describe_schedule(schedule),
                        _DTYPE_NAMES[dtype], dot_precision(dtype), score_mod)


def source_repr(pattern: Pattern) -> str:
    """``repr(pattern)`` with every document written ``ac.document()``: the kernels read document
    ids from a runtime table, so one generated file serves every set of lengths (``cu_seqlens``)."""
    text = repr(pattern)
    for node in _walk(pattern):
        if isinstance(node, Document) and node.lengths is not None:
            text = text.replace(repr(node), "ac.document()")
    return text


def _walk(pattern: Pattern):
    yield pattern
    for child in pattern.children():
        yield from _walk(child)


def describe_schedule(schedule: Schedule) -> str:
    """The schedule as the generated kernels see it (torch-only knobs left out of the cache key)."""
    tm, tn = kernel_tiles(schedule)
    return (f"block=({schedule.block_m}, {schedule.block_n}), tile=({tm}, {tn}), "
            f"warps={schedule.num_warps}, stages={schedule.num_stages}")


def cache_key(src: KernelSource) -> str:
    """Content hash of the source description, the templates and the library versions."""
    return cache.content_key({"source": src.__dict__, "templates": template_digest(), "versions": tool_versions()})


def kernels_for(pattern: Pattern, q_len: int, kv_len: int, schedule: Schedule, dtype: torch.dtype,
                score_mod: str = "") -> Kernels:
    """The generated kernel module for this pattern, schedule and dtype (cached in memory and on disk);
    ``score_mod`` is the rendered text of a traced score_mod (:mod:`.score_render`), if any."""
    src = kernel_source(pattern, predicate_for(pattern, q_len, kv_len), schedule, dtype, score_mod)
    key = cache_key(src)
    module, path = cache.load(key, src.render(key))
    return Kernels(module, key, path, src)


# ---------------------------------------------------------------------------------------------
# Layout tensors
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class LayoutTensors:
    """What the kernels read about one layout on one device.

    ``fwd``/``bwd`` hold ``(num, idx, full_num_ranges, full_ranges, mask_ids)`` (int32): per
    query block (forward, dq) or per key block (dk/dv), the partial blocks ``[Bm, Hm, n]`` /
    ``[Bm, Hm, n, PW]``, the full blocks as ``[start, end)`` ranges ``[Bm, Hm, n]`` /
    ``[Bm, Hm, n, RW, 2]``, and each partial entry's byte-mask id. ``mask_tab`` ``[T, BM, BN]``
    uint8 holds the byte masks of partial blocks when the predicate is opaque (else one dummy
    byte). Nothing here expands a run of full blocks, so a causal layout costs O(L / block).
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

    @staticmethod
    def widths(t: tuple[torch.Tensor, ...]) -> tuple[int, int]:
        """``(PW, RW)``: padded widths of the partial lists and of the range lists."""
        return int(t[1].shape[-1]), int(t[3].shape[-2])


def _ell(ptr: np.ndarray, values: np.ndarray, n_rows: int, width: int) -> np.ndarray:
    """ELL-pack the CSR ``(ptr, values)`` into ``[n_rows, width]`` int32 (padding 0)."""
    counts = np.diff(ptr)
    r = np.repeat(np.arange(n_rows), counts)
    out = np.zeros((n_rows, width), dtype=np.int32)
    out[r, np.arange(len(r)) - ptr[:-1][r]] = values
    return out


def _mask_ids(layout: BlockLayout, pw_f: int, pw_b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Byte masks of every group's partial blocks (numbered in each group's partial-list order,
    groups one after another) and, aligned with the partial lists, their ids per query row and
    per key column. Proportional to the partial blocks (an opaque predicate needs their masks)."""
    g = layout.geom
    Bm, Hm = layout.group_index.shape
    ids_f = torch.zeros(Bm, Hm, g.nqb, pw_f, dtype=torch.int32)
    ids_b = torch.zeros(Bm, Hm, g.nkb, pw_b, dtype=torch.int32)
    tabs, per_group, base = [], [], 0
    per = max(1, EVAL_CHUNK // (g.block_m * g.block_n))  # bounded float temporaries
    for grp in layout.groups:
        n = grp.num_partial
        ids = base + np.arange(n, dtype=np.int64)
        for s in range(0, n, per):
            tabs.append(block_masks(grp, grp.part_rows[s:s + per], grp.part_cols[s:s + per]).to(torch.uint8))
        base += n
        col_ptr, _ = grp.csc_partial
        order = np.lexsort((grp.part_rows, grp.part_cols))  # the order of grp.csc_partial
        per_group.append((_ell(grp.part_ptr, ids, g.nqb, pw_f), _ell(col_ptr, ids[order], g.nkb, pw_b)))
    for (bi, hi), gid in np.ndenumerate(layout.group_index):
        ids_f[bi, hi] = torch.from_numpy(per_group[gid][0])
        ids_b[bi, hi] = torch.from_numpy(per_group[gid][1])
    tab = torch.cat(tabs) if tabs else torch.zeros(1, dtype=torch.uint8)
    return ids_f, ids_b, tab


@functools.lru_cache(maxsize=64)
def _layout_tensors(layout: BlockLayout, opaque: bool, device: str) -> tuple:
    fwd, bwd = layout.bcsr_ranges(), layout.bcsr_ranges(transposed=True)
    pw_f, pw_b = fwd["kv_indices"].shape[-1], bwd["q_indices"].shape[-1]
    if opaque:
        ids_f, ids_b, tab = _mask_ids(layout, pw_f, pw_b)
    else:  # the kernels never read mask ids without byte masks: one shared zero table
        ids_f, ids_b = torch.zeros_like(fwd["kv_indices"]), torch.zeros_like(bwd["q_indices"])
        tab = torch.zeros(1, dtype=torch.uint8)

    def dev(t):
        return t.to(device).contiguous()

    f = tuple(dev(fwd[k]) for k in ("kv_num_blocks", "kv_indices", "full_kv_num_ranges", "full_kv_ranges")) + (dev(ids_f),)
    b = tuple(dev(bwd[k]) for k in ("q_num_blocks", "q_indices", "full_q_num_ranges", "full_q_ranges")) + (dev(ids_b),)
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
    pred = predicate_for(layout.pattern, layout.geom.q_end, layout.kv_len)
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
    score_args: tuple = ()  # (sbuf, smeta, mbufs, mbuf_meta) of a score_mod; () for none

    @property
    def q_start(self) -> int:
        """Absolute position of query row 0 (a runtime kernel argument: one kernel for every offset)."""
        return self.layout.geom.q_start

    def consts(self, q: torch.Tensor, v: torch.Tensor) -> dict:
        return dict(BM=self.layout.block_m, BN=self.layout.block_n, TM=self.tile_m, TN=self.tile_n,
                    D_PAD=pad_dim(q.shape[-1]), DV_PAD=pad_dim(v.shape[-1]), OPAQUE=self.tensors.opaque,
                    DOT_PREC=dot_precision(q.dtype), SCORE_MOD=bool(self.score_args),
                    num_warps=self.schedule.num_warps,
                    num_stages=self.schedule.num_stages)


def make_plan(layout: BlockLayout, schedule: Schedule, dtype: torch.dtype, device: torch.device,
              score_mod: str = "", score_args: tuple = ()) -> Plan:
    """Kernels and layout tensors for one call (everything cached underneath); a score_mod's
    rendered helpers and runtime tensors when given."""
    tm, tn = kernel_tiles(schedule)
    kern = kernels_for(layout.pattern, layout.geom.q_end, layout.kv_len, schedule, dtype, score_mod)
    return Plan(kern, layout, layout_tensors(layout, device), schedule, tm, tn, score_args)


@functools.lru_cache(maxsize=8)
def no_score_args(device: str) -> tuple[torch.Tensor, ...]:
    """Placeholder score_mod arguments for kernels without one (never read: SCORE_MOD=False)."""
    return (torch.zeros(1, dtype=torch.float32, device=device), torch.zeros(6, dtype=torch.int64, device=device),
            torch.zeros(1, dtype=torch.int64, device=device), torch.zeros(2, dtype=torch.int64, device=device))


def run_forward(plan: Plan, q, k, v, scale: float):
    """``(out, lse float32)`` of the forward kernel (the score_mod module's entry point)."""
    return _forward(plan, q, k, v, scale)


def run_backward(plan: Plan, q, k, v, out, lse, dout, scale: float, dlse=None):
    """``(dq, dk, dv)`` of the backward kernels, with ``dlse`` when lse is differentiable."""
    return _backward(plan, q, k, v, out, lse, dout, scale, dlse)


def _forward(plan: Plan, q, k, v, scale: float):
    B, H, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    out = torch.empty((B, H, Lq, Dv), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)
    t = plan.tensors
    Bm, Hm = t.bm_hm
    grid = (-(-Lq // plan.tile_m), B * H)
    splits = num_splits(plan.layout, Lq, grid[0], B * H)
    if splits > 1:
        return _forward_split(plan, q, k, v, scale, splits)
    plan.kernels.module._attn_fwd[grid](
        q, k, v, out, lse, *t.fwd, t.mask_tab, t.bufs, t.buf_meta,
        *(plan.score_args or no_score_args(str(q.device))), scale,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        H, H // Hkv, Bm, Hm, plan.layout.num_q_blocks, *t.widths(t.fwd), Lq, Lk, D, Dv, plan.q_start,
        EVEN_N=Lk % plan.tile_n == 0, **plan.consts(q, v))
    return out, lse


def _forward_split(plan: Plan, q, k, v, scale: float, splits: int):
    """The forward with each row's key blocks cut into chunks (``split.py``), merged through their lse."""
    B, H, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    ch, n = chunk_size(plan.layout, splits)
    out_p = torch.empty((n, B, H, Lq, Dv), dtype=torch.float32, device=q.device)
    lse_p = torch.empty((n, B, H, Lq), dtype=torch.float32, device=q.device)
    t = plan.tensors
    Bm, Hm = t.bm_hm
    grid = (-(-Lq // plan.tile_m), B * H, n)
    plan.kernels.module._attn_fwd_split[grid](
        q, k, v, out_p, lse_p, *t.fwd, t.mask_tab, t.bufs, t.buf_meta,
        *(plan.score_args or no_score_args(str(q.device))), scale,
        *q.stride(), *k.stride(), *v.stride(),
        H, H // Hkv, Bm, Hm, plan.layout.num_q_blocks, *t.widths(t.fwd), Lq, Lk, D, Dv, plan.q_start, ch,
        EVEN_N=Lk % plan.tile_n == 0, **plan.consts(q, v))
    return merge_partials(out_p, lse_p, q.dtype)


def _backward(plan: Plan, q, k, v, out, lse, dout, scale: float, dlse=None):
    B, H, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    delta = (dout.float() * out.float()).sum(-1)  # [B, H, Lq]
    if dlse is not None:  # a differentiable lse (attention sinks): d lse / d s = p joins ds as -dlse
        delta = delta - dlse.float()
    delta = delta.contiguous()
    sargs = plan.score_args or no_score_args(str(q.device))
    dq = torch.empty((B, H, Lq, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, Hkv, Lk, D), dtype=k.dtype, device=q.device)
    dv = torch.empty((B, Hkv, Lk, Dv), dtype=v.dtype, device=q.device)
    t = plan.tensors
    Bm, Hm = t.bm_hm
    consts = plan.consts(q, v)
    strides = (*q.stride(), *k.stride(), *v.stride(), *dout.stride())
    plan.kernels.module._attn_bwd_dkdv[(-(-Lk // plan.tile_n), B * Hkv)](
        q, k, v, dout, dk, dv, lse, delta, *t.bwd, t.mask_tab, t.bufs, t.buf_meta, *sargs, scale, *strides,
        H, Hkv, H // Hkv, Bm, Hm, plan.layout.num_kv_blocks, *t.widths(t.bwd), Lq, Lk, D, Dv, plan.q_start,
        **consts)
    plan.kernels.module._attn_bwd_dq[(-(-Lq // plan.tile_m), B * H)](
        q, k, v, dout, dq, lse, delta, *t.fwd, t.mask_tab, t.bufs, t.buf_meta, *sargs, scale, *strides,
        H, H // Hkv, Bm, Hm, plan.layout.num_q_blocks, *t.widths(t.fwd), Lq, Lk, D, Dv, plan.q_start,
        **consts)
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


def triton_attention_backward(q, k, v, out, lse, dout, layout: BlockLayout, schedule: Schedule, scale: float):
    """``(dq, dk, dv)`` of :func:`triton_attention` from its ``out`` and ``lse`` (the backward of a
    custom operator, which runs outside autograd)."""
    plan = make_plan(layout, schedule, q.dtype, q.device)
    with on_device(q):
        return _backward(plan, q, k, v, out, lse.float().contiguous(), dout.contiguous(), scale)
