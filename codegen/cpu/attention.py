"""Fused block-sparse attention on the CPU through C kernels (``cpu_attention.c`` beside it).

Low level: float32 tensors in, tensors out, one layout given as block tables
(:class:`KernelTables`) for every (batch, head). Forward and backward are each one parallel
region: every thread calls the same C entry once with a shared counter and takes work items
(a query block of one head, or a key block of one key/value head) until none is left, so a
thread slowed down by another process does fewer items and nobody waits on a barrier. The
backward accumulates dq per thread (see :data:`DQ_BUFFER_BYTES`); a second region sums the buffers.
:func:`probs_forward` is the forward that also stores its normalized probabilities in the tile
layout of a plan's rows (:class:`ProbsRows`, cross-layer reuse); :func:`apply_forward` multiplies
such stored probabilities by other values.
Building the tables from a layout, autograd and dispatch live with the caller.
"""

from __future__ import annotations

import ctypes
import functools
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attncompiler.errors import CodegenError, InputError

from . import build as cpu_build

_P, _I64, _F64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double
_OPS = {"softcap": 0, "alibi": 1}
# Extra dq buffers (one per thread beyond the first, which writes dq itself) held by a backward
# call. Past it the key/value heads are done in chunks that fit, and when even one head's rows
# do not fit, with fewer threads.
DQ_BUFFER_BYTES = 512 << 20


@dataclass(frozen=True, eq=False)
class KernelTables:
    """One layout group's block structure for the kernels (all int64 unless noted, CPU, contiguous)."""

    bm: int  # query block size (1..256)
    bn: int  # key block size (1..256)
    nqb: int  # query blocks
    nkb: int  # key blocks
    # per query block r: full key-block ranges [range_start[i], range_end[i]) for i in range_ptr[r]..range_ptr[r+1]-1
    range_ptr: torch.Tensor
    range_start: torch.Tensor
    range_end: torch.Tensor
    # per query block r: partial key blocks part_cols[i] with element mask masks[part_mask[i]] (int32)
    part_ptr: torch.Tensor
    part_cols: torch.Tensor
    part_mask: torch.Tensor
    # per key block c: full query-block ranges [row_start[i], row_end[i]) for i in col_range_ptr[c]..[c+1]-1
    col_range_ptr: torch.Tensor
    row_start: torch.Tensor
    row_end: torch.Tensor
    # per key block c: partial query blocks col_part_rows[i] with mask col_part_mask[i] (int32)
    col_part_ptr: torch.Tensor
    col_part_rows: torch.Tensor
    col_part_mask: torch.Tensor
    masks: torch.Tensor  # uint8 [nmask, bm, bn], 1 = the key is visible to the query


@dataclass(frozen=True)
class ScoreMods:
    """Edge weights applied, in order, to the scaled score before masking."""

    ops: tuple[tuple[str, float], ...] = ()  # ("softcap", cap) or ("alibi", 0.0)
    slopes: torch.Tensor | None = None  # float32 [H] (query heads), needed when "alibi" is used
    q_pos0: int = 0  # position of query row 0 (kpos = key index, qpos = q_pos0 + row index)


@dataclass(frozen=True, eq=False)
class ProbsRows:
    """The query-block rows of stored probability tiles (:func:`probs_forward`), over every
    chunk of a plan. Row ``i`` is query block ``qb[i]`` against the ``width[i]`` key-block
    columns ``cols[start[i]:start[i] + width[i]]`` of kinds ``kind[...]`` (int32: -2 padding,
    P = 0; -1 full block; >= 0 an index into the tables' masks); its ``[group * bm, width * bn]``
    tile starts ``offset[i]`` floats into one (batch, kv head)'s ``size`` floats of storage."""

    qb: torch.Tensor
    width: torch.Tensor
    offset: torch.Tensor
    start: torch.Tensor
    cols: torch.Tensor
    kind: torch.Tensor
    size: int
    group: int


_ROWS_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _Args(ctypes.Structure):
    """The C ``Args`` struct of cpu_attention.c, field for field."""

    _fields_ = ([(n, _P) for n in ("q", "k", "v", "dout", "lse_in", "delta", "out", "lse", "dq", "dk", "dv")]
                + [(n, _I64) for n in ("B", "H", "Hkv", "Lq", "Lk", "D", "Dv", "bm", "bn", "nqb", "nkb")]
                + [(n, _P) for n in ("range_ptr", "range_start", "range_end", "part_ptr", "part_cols", "part_mask",
                                     "col_range_ptr", "row_start", "row_end", "col_part_ptr", "col_part_rows",
                                     "col_part_mask", "masks", "masks_t")]
                + [("scale", _F64), ("nops", _I64), ("op_kind", _P), ("op_param", _P), ("slopes", _P),
                   ("q_pos0", _I64)])


def _library():
    """The library of the default variant (:func:`.build.default_variant`; both follow
    ``ATTNC_CPU_KERNELS`` on every call), or None."""
    lib = cpu_build.load("cpu_attention")
    return _typed(lib) if lib is not None else None


@functools.lru_cache(maxsize=None)
def _typed(lib):
    """``lib`` with its entry points' argument types set (once per library)."""
    lib.attn_fwd.argtypes = [ctypes.POINTER(_Args), ctypes.POINTER(_I64)]
    lib.attn_bwd.argtypes = [ctypes.POINTER(_Args), ctypes.POINTER(_I64), _P, _I64, _I64]
    lib.attn_sum.argtypes = [ctypes.POINTER(_Args), ctypes.POINTER(_I64), _P, _P, _I64, _I64, _I64]
    lib.attn_probs.argtypes = [ctypes.POINTER(_Args), ctypes.POINTER(_I64), _I64, _P, _P, _P, _P, _P, _P, _P, _I64,
                               _I64]
    lib.attn_apply.argtypes = [ctypes.POINTER(_Args), ctypes.POINTER(_I64), _I64, _P, _P, _P, _P, _P, _P, _P, _I64]
    for fn in (lib.attn_fwd, lib.attn_bwd, lib.attn_sum, lib.attn_probs, lib.attn_apply):
        fn.restype = ctypes.c_int
    return lib


def available() -> bool:
    """Whether the kernels can run: a C compiler, ``ATTNC_CPU_KERNELS`` not 0, and the library
    of the default variant (AVX2 on x86-64 CPUs with it, else generic) built and loaded."""
    return _library() is not None


def variant() -> str:
    """The kernel variant the wrappers use here: ``"avx2"`` or ``"generic"``."""
    return cpu_build.default_variant()


def status() -> str:
    """``"loaded (<variant>)"``, or why the kernels are not available."""
    _library()
    return cpu_build.status("cpu_attention")


_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_INDEX_FIELDS = ("range_ptr", "range_start", "range_end", "part_ptr", "part_cols", "part_mask", "col_range_ptr",
                 "row_start", "row_end", "col_part_ptr", "col_part_rows", "col_part_mask")


def _prepared(t: KernelTables) -> dict:
    """The tables as the kernels read them (int64, contiguous, masks also transposed), checked
    once per tables object: a wrong index would make the kernels read out of bounds."""
    got = _TABLES.get(t)
    if got is not None:
        return got
    if not (1 <= t.bm <= 256 and 1 <= t.bn <= 256):
        raise InputError(f"block sizes bm={t.bm}, bn={t.bn} are out of range; hint: use 1..256")
    p = {f: getattr(t, f).to(torch.int64).contiguous().reshape(-1) for f in _INDEX_FIELDS}
    masks = t.masks.to(torch.uint8).contiguous()
    if masks.dim() != 3 or masks.shape[1:] != (t.bm, t.bn):
        raise InputError(f"masks has shape {tuple(masks.shape)}; hint: it must be [nmask, {t.bm}, {t.bn}]")
    nmask = masks.shape[0]
    for ptr, lists, lo, hi, n, other in (("range_ptr", ("range_start", "range_end"), "part_ptr", "part_cols",
                                          t.nqb, t.nkb),
                                         ("col_range_ptr", ("row_start", "row_end"), "col_part_ptr", "col_part_rows",
                                          t.nkb, t.nqb)):
        rp, pp = p[ptr], p[lo]
        for name, x in ((ptr, rp), (lo, pp)):
            if x.numel() != n + 1 or x[0] != 0 or bool((x[1:] < x[:-1]).any()):
                raise InputError(f"{name} is not a pointer array of {n + 1} non-decreasing entries from 0; hint: "
                                 "build the tables with one entry per block row/column")
        s, e, cols = p[lists[0]][: int(rp[-1])], p[lists[1]][: int(rp[-1])], p[hi][: int(pp[-1])]
        if bool((s < 0).any() or (e > other).any() or (s > e).any() or (cols < 0).any() or (cols >= other).any()):
            raise InputError(f"{lists[0]}/{lists[1]}/{hi} index blocks outside 0..{other - 1}; hint: check the "
                             "layout's block counts")
        per = torch.zeros(n, dtype=torch.int64)
        per.index_add_(0, torch.repeat_interleave(torch.arange(n), rp.diff()), e - s)
        per += pp.diff()
        if bool((per > other).any()):
            raise InputError(f"a block row/column of {ptr} lists more than {other} blocks; hint: each block once")
    for name, ptr in (("part_mask", "part_ptr"), ("col_part_mask", "col_part_ptr")):
        ids = p[name][: int(p[ptr][-1])]
        if bool((ids < 0).any() or (ids >= nmask).any()):
            raise InputError(f"{name} refers to masks outside 0..{nmask - 1}; hint: one mask id per partial block")
    p["masks"], p["masks_t"] = masks, masks.transpose(1, 2).contiguous()
    _TABLES[t] = p
    return p


def _check(q, k, v, tables: KernelTables, extra=()) -> None:
    for name, x in (("q", q), ("k", k), ("v", v), *extra):
        if x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() != 4:
            raise InputError(f"{name} is {x.dtype} on {x.device} with {x.dim()} dims; hint: the CPU kernels take "
                             "float32 CPU tensors [B, H, L, D]")
    B, H, Lq, D = q.shape
    if k.shape[0] != B or k.shape[3] != D or v.shape[:3] != k.shape[:3] or H % k.shape[1] != 0:
        raise InputError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit; hint: q [B,H,Lq,D],"
                         " k [B,Hkv,Lk,D], v [B,Hkv,Lk,Dv] with H a multiple of Hkv")
    Lk = k.shape[2]
    if -(-Lq // tables.bm) != tables.nqb or -(-Lk // tables.bn) != tables.nkb:
        raise InputError(f"tables have {tables.nqb} x {tables.nkb} blocks of {tables.bm} x {tables.bn} but Lq={Lq}, "
                         f"Lk={Lk}; hint: build the tables for these lengths")


def _mods(mods: ScoreMods, H: int) -> tuple:
    kinds, params = [], []
    for op in mods.ops:
        if not (isinstance(op, tuple) and len(op) == 2 and op[0] in _OPS):
            raise InputError(f"score mod {op!r} is not supported; hint: ('softcap', cap) or ('alibi', 0.0)")
        if op[0] == "softcap" and not float(op[1]) > 0:
            raise InputError(f"softcap cap {op[1]!r} must be > 0")
        kinds.append(_OPS[op[0]])
        params.append(float(op[1]))
    slopes = None
    if "alibi" in (o[0] for o in mods.ops):
        if mods.slopes is None or mods.slopes.numel() != H:
            raise InputError(f"alibi needs slopes of {H} query heads, got {mods.slopes!r}; hint: ScoreMods(slopes=...)")
        slopes = mods.slopes.detach().to(torch.float32).contiguous().reshape(-1)
    return (torch.tensor(kinds or [0], dtype=torch.int64), torch.tensor(params or [0.0], dtype=torch.float64),
            slopes, len(kinds))


def _pad8(x: torch.Tensor) -> torch.Tensor:
    """Contiguous, last dim zero-padded to a multiple of 8 (the kernels' vector width)."""
    r = -x.shape[-1] % 8
    return (F.pad(x, (0, r)) if r else x).contiguous()


_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOL_LOCK = threading.Lock()


def _threads(threads: int | None) -> int:
    return max(1, int(threads if threads is not None else torch.get_num_threads()))


def _launch(fn, args: _Args, n: int, extra=lambda i: ()) -> None:
    """``fn(args, counter, *extra(i))`` on threads i = 0..n-1 sharing one work counter."""
    counter = _I64(0)
    ref, cref = ctypes.byref(args), ctypes.byref(counter)
    if n == 1:
        codes = [fn(ref, cref, *extra(0))]
    else:
        with _POOL_LOCK:
            pool = _POOLS.get(n - 1)
            if pool is None:
                pool = _POOLS[n - 1] = ThreadPoolExecutor(max_workers=n - 1, thread_name_prefix="attnc-cpu")
        futures = [pool.submit(fn, ref, cref, *extra(i)) for i in range(1, n)]
        codes = [fn(ref, cref, *extra(0))] + [f.result() for f in futures]  # the caller works too
    if any(codes):
        raise MemoryError("CPU attention kernel could not allocate its scratch buffers")


def _args(q, k, v, tables: KernelTables, scale: float, mods: ScoreMods, keep: list) -> _Args:
    lib = _library()
    if lib is None:
        raise CodegenError(f"CPU attention kernels are not available: {status()}; hint: check available() first")
    p = _prepared(tables)
    kinds, params, slopes, nops = _mods(mods, q.shape[1])
    keep += [p, kinds, params, slopes]
    a = _Args(q=q.data_ptr(), k=k.data_ptr(), v=v.data_ptr(), B=q.shape[0], H=q.shape[1], Hkv=k.shape[1],
              Lq=q.shape[2], Lk=k.shape[2], D=q.shape[3], Dv=v.shape[3], bm=tables.bm, bn=tables.bn,
              nqb=tables.nqb, nkb=tables.nkb, scale=float(scale), nops=nops, op_kind=kinds.data_ptr(),
              op_param=params.data_ptr(), slopes=slopes.data_ptr() if slopes is not None else None,
              q_pos0=int(mods.q_pos0))
    for name in (*_INDEX_FIELDS, "masks", "masks_t"):
        setattr(a, name, p[name].data_ptr())
    return a


def forward(q, k, v, tables: KernelTables, scale: float, mods: ScoreMods = ScoreMods(), need_lse: bool = True,
            threads: int | None = None):
    """``(out [B,H,Lq,Dv], lse [B,H,Lq] or None)`` of block-sparse attention, float32.

    q [B,H,Lq,D], k [B,Hkv,Lk,D], v [B,Hkv,Lk,Dv] float32 CPU (made contiguous here); query head
    h reads key/value head h // (H // Hkv). lse is the natural-log log-sum-exp of the modified
    scaled scores. Rows that see no key give out 0 and lse -inf. threads: default
    ``torch.get_num_threads()``.
    """
    _check(q, k, v, tables)
    Dv = v.shape[3]
    q, k, v = _pad8(q), _pad8(k), _pad8(v)
    B, H, Lq = q.shape[:3]
    out = torch.empty(B, H, Lq, v.shape[3], dtype=torch.float32)
    lse = torch.empty(B, H, Lq, dtype=torch.float32) if need_lse else None
    keep: list = []
    a = _args(q, k, v, tables, scale, mods, keep)
    a.out, a.lse = out.data_ptr(), lse.data_ptr() if lse is not None else None
    _launch(_library().attn_fwd, a, _threads(threads))
    return (out[..., :Dv] if out.shape[3] != Dv else out), lse


def backward(q, k, v, out, lse, dout, tables: KernelTables, scale: float, mods: ScoreMods = ScoreMods(),
             threads: int | None = None, dlse: torch.Tensor | None = None):
    """``(dq, dk, dv)`` float32 in the shapes of q, k, v for :func:`forward`'s ``out`` and ``lse``
    and the upstream gradient ``dout``, with delta = rowsum(dout * out) and P recomputed from lse.
    ``dlse [B,H,Lq]`` (optional) is a gradient into lse itself (attention sinks make lse part of
    the result): d lse / d s = P, so it enters as ``delta - dlse``.

    dk and dv do not depend on the thread count; dq is summed over per-thread buffers, so its
    rounding does (by a few float32 ulps)."""
    _check(q, k, v, tables, (("out", out), ("dout", dout)))
    if out.shape != dout.shape or out.shape[:3] != q.shape[:3] or out.shape[3] != v.shape[3]:
        raise InputError(f"out {tuple(out.shape)} and dout {tuple(dout.shape)} must both be [B,H,Lq,Dv] = "
                         f"{(*q.shape[:3], v.shape[3])}")
    if lse is None or lse.shape != q.shape[:3] or lse.dtype != torch.float32:
        raise InputError(f"lse must be float32 {tuple(q.shape[:3])}, got {None if lse is None else lse.shape}; "
                         "hint: call forward with need_lse=True")
    D, Lk = q.shape[3], k.shape[2]
    delta = (dout * out).sum(-1)
    if dlse is not None:
        delta = delta - dlse.to(torch.float32)
    delta = delta.contiguous()
    q, k, v, dout = _pad8(q), _pad8(k), _pad8(v), _pad8(dout)
    lse = lse.contiguous()
    run = bool(Lk and k.shape[0])  # with Lq = 0 the kernel still writes dk = dv = 0
    dq = torch.empty_like(q) if run else torch.zeros_like(q)  # the kernel zeroes the dq rows it owns
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    keep: list = [delta, lse]
    a = _args(q, k, v, tables, scale, mods, keep)
    a.dout, a.lse_in, a.delta = dout.data_ptr(), lse.data_ptr(), delta.data_ptr()
    a.dq, a.dk, a.dv = dq.data_ptr(), dk.data_ptr(), dv.data_ptr()
    if run:
        _backward_chunks(a, dq, k.shape[0] * k.shape[1], _threads(threads))
    Dv = out.shape[3]
    return dq[..., :D], dk[..., :D], dv[..., :Dv]


def _backward_chunks(a: _Args, dq: torch.Tensor, heads: int, n: int) -> None:
    """Run ``attn_bwd`` over the ``heads`` (= B * Hkv) key/value heads on ``n`` threads: thread 0
    accumulates into ``dq`` itself, every other thread into its own buffer (each zeroed by its
    thread), summed into ``dq`` afterwards by ``attn_sum`` on the same threads; heads go in chunks
    so that the buffers fit :data:`DQ_BUFFER_BYTES`."""
    lib = _library()
    fn = lib.attn_bwd
    rows = dq.view(heads, dq.numel() // heads)  # the rows of one key/value head's G query heads
    head_bytes = max(1, rows.shape[1] * rows.element_size())
    n = min(n, 1 + DQ_BUFFER_BYTES // head_bytes)
    if n == 1:
        _launch(fn, a, 1, lambda i: (dq.data_ptr(), 0, heads))
        return
    chunk = min(heads, DQ_BUFFER_BYTES // ((n - 1) * head_bytes))
    scratch = torch.empty(n - 1, chunk, rows.shape[1], dtype=dq.dtype)
    for h0 in range(0, heads, chunk):
        h1 = min(heads, h0 + chunk)
        part, extra = rows[h0:h1], scratch[:, : h1 - h0]
        _launch(fn, a, n, lambda i: (part.data_ptr() if i == 0 else extra[i - 1].data_ptr(), h0, h1))
        _launch(lib.attn_sum, a, n, lambda i: (part.data_ptr(), extra.data_ptr(), n - 1, part.numel(),
                                               scratch.stride(0)))


def _checked_rows(rows: ProbsRows, t: KernelTables) -> ProbsRows:
    """``rows`` validated against ``t`` (once per pair): a wrong index or offset would make the
    kernel read or write out of bounds."""
    if _ROWS_CHECKED.get(rows) is t:
        return rows
    n = rows.qb.numel()
    vecs = {f: getattr(rows, f) for f in ("qb", "width", "offset", "start", "cols")}
    for name, x in (*vecs.items(), ("kind", rows.kind)):
        want = torch.int32 if name == "kind" else torch.int64
        if x.dtype != want or x.device.type != "cpu" or x.dim() != 1 or not x.is_contiguous():
            raise InputError(f"ProbsRows.{name} is {x.dtype} {tuple(x.shape)} on {x.device}; hint: a contiguous 1-D "
                             f"CPU tensor of {want}")
    if any(x.numel() != n for x in (rows.width, rows.offset, rows.start)) or rows.cols.numel() != rows.kind.numel():
        raise InputError("ProbsRows: qb, width, offset and start must have one entry per row, cols and kind one per "
                         "column; hint: build them together")
    cap = rows.cols.numel()
    nmask = t.masks.shape[0]
    tile = rows.group * t.bm * t.bn * rows.width
    if n and bool((rows.qb < 0).any() or (rows.qb >= t.nqb).any() or (rows.width < 1).any()
                  or (rows.start < 0).any() or (rows.start + rows.width > cap).any()
                  or (rows.offset < 0).any() or (rows.offset + tile > rows.size).any()):
        raise InputError(f"ProbsRows index query blocks outside 0..{t.nqb - 1}, columns outside 0..{cap} or tiles "
                         f"outside the {rows.size} floats of storage; hint: build them from the plan of these tables")
    used = rows.kind != -2
    if bool((rows.kind < -2).any() or (rows.kind >= nmask).any() or (rows.cols[used] < 0).any()
            or (rows.cols[used] >= t.nkb).any()):
        raise InputError(f"ProbsRows.kind must be in -2..{nmask - 1} and its used cols in 0..{t.nkb - 1}; hint: -2 "
                         "padding, -1 full, else the tables' mask id")
    _ROWS_CHECKED[rows] = t
    return rows


def probs_forward(q, k, v, tables: KernelTables, rows: ProbsRows, scale: float, p: torch.Tensor | None = None,
                  threads: int | None = None):
    """``(out [B,H,Lq,Dv], p [B,Hkv,size])``: block-sparse attention that stores its normalized
    probabilities in ``rows``' tile layout (cross-layer reuse), float32.

    q [B,H,Lq,D], k [B,Hkv,Lk,D], v [B,Hkv,Lk,Dv] float32 CPU with ``H = rows.group * Hkv``. Every
    entry of ``p`` is written (given, it must be a contiguous float32 CPU tensor of
    ``B * Hkv * rows.size`` elements; it is returned viewed as ``[B, Hkv, size]``): padding
    columns, keys past Lk and query rows past Lq hold 0, and so do rows that see no key (their
    out is 0 too). Query blocks listed in no row get out 0. threads: default
    ``torch.get_num_threads()``.
    """
    _check(q, k, v, tables)
    B, H, Lq, _ = q.shape
    Hkv, Dv = k.shape[1], v.shape[3]
    if H != rows.group * Hkv:
        raise InputError(f"{H} query heads over {Hkv} key/value heads do not match rows of group {rows.group}; hint: "
                         "build the rows for this head grouping")
    _checked_rows(rows, tables)
    n = B * Hkv * rows.size
    if p is None:
        p = torch.empty(n, dtype=torch.float32)
    elif p.dtype != torch.float32 or p.device.type != "cpu" or not p.is_contiguous() or p.numel() != n:
        raise InputError(f"p is {p.dtype} with {p.numel()} elements on {p.device}; hint: a contiguous float32 CPU "
                         f"tensor of {n} elements")
    q, k, v = _pad8(q), _pad8(k), _pad8(v)
    out = torch.zeros(B, H, Lq, v.shape[3], dtype=torch.float32)
    keep: list = []
    a = _args(q, k, v, tables, scale, ScoreMods(), keep)
    a.out = out.data_ptr()
    nrows = rows.qb.numel()
    if nrows and B * Hkv:
        maxw = int(rows.width.max())
        _launch(_library().attn_probs, a, _threads(threads),
                lambda i: (nrows, rows.qb.data_ptr(), rows.width.data_ptr(), rows.offset.data_ptr(),
                           rows.start.data_ptr(), rows.cols.data_ptr(), rows.kind.data_ptr(), p.data_ptr(), rows.size,
                           maxw))
    return (out[..., :Dv] if out.shape[3] != Dv else out), p.view(B, Hkv, rows.size)


def apply_forward(p: torch.Tensor, v: torch.Tensor, tables: KernelTables, rows: ProbsRows, q_len: int,
                  threads: int | None = None) -> torch.Tensor:
    """``out [B, H, q_len, Dv] = P @ v`` for probabilities ``p [B, Hkv, rows.size]`` stored in
    ``rows``' tile layout (as :func:`probs_forward` writes them), float32 (cross-layer reuse).

    v [B, Hkv, Lk, Dv] float32 CPU; ``H = rows.group * Hkv``. V is read in place (only the valid
    rows of a ragged last key block); query blocks listed in no row give 0. A NaN in ``p`` or in
    a used row of ``v`` reaches the outputs it multiplies. threads: default
    ``torch.get_num_threads()``.
    """
    for name, x in (("p", p), ("v", v)):
        if x.dtype != torch.float32 or x.device.type != "cpu":
            raise InputError(f"{name} is {x.dtype} on {x.device}; hint: the CPU kernels take float32 CPU tensors")
    if v.dim() != 4 or p.dim() != 3 or p.shape != (*v.shape[:2], rows.size):
        raise InputError(f"p {tuple(p.shape)} and v {tuple(v.shape)} do not fit; hint: p [B, Hkv, {rows.size}] "
                         "(the rows' storage size), v [B, Hkv, Lk, Dv]")
    B, Hkv, Lk, Dv = v.shape
    if -(-q_len // tables.bm) != tables.nqb or -(-Lk // tables.bn) != tables.nkb:
        raise InputError(f"tables have {tables.nqb} x {tables.nkb} blocks of {tables.bm} x {tables.bn} but Lq={q_len}, "
                         f"Lk={Lk}; hint: build the tables for these lengths")
    _checked_rows(rows, tables)
    lib = _library()
    if lib is None:
        raise CodegenError(f"CPU attention kernels are not available: {status()}; hint: check available() first")
    H = rows.group * Hkv
    p, v = p.contiguous(), _pad8(v)
    out = torch.zeros(B, H, q_len, v.shape[3], dtype=torch.float32)
    a = _Args(v=v.data_ptr(), out=out.data_ptr(), B=B, H=H, Hkv=Hkv, Lq=q_len, Lk=Lk, D=v.shape[3], Dv=v.shape[3],
              bm=tables.bm, bn=tables.bn, nqb=tables.nqb, nkb=tables.nkb)
    nrows = rows.qb.numel()
    if nrows and B * Hkv and q_len:
        _launch(lib.attn_apply, a, _threads(threads),
                lambda i: (nrows, rows.qb.data_ptr(), rows.width.data_ptr(), rows.offset.data_ptr(),
                           rows.start.data_ptr(), rows.cols.data_ptr(), rows.kind.data_ptr(), p.data_ptr(), rows.size))
    return out[..., :Dv] if out.shape[3] != Dv else out
