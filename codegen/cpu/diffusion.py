"""The diffusion stages' chunk products on the CPU through C kernels (``cpu_diffusion.c`` beside it).

For float32 on the CPU the torch stages (:mod:`.torch_diffusion`) hand each chunk of their plan
to kernels instead of torch ops: P (scores, mask and softmax in one pass per query block; the
band's keys read in place from the head's keys transposed once, the other keys packed per
block), the dense global rows' P from the same transposed keys, and a hop (``gamma v + beta P
z``, z rows read in place). The torch ops need a gathered copy of the other blocks, a separate
product per part, a cat and separate axpby and softmax passes; the kernels do none of that.
Stored P keeps its layout, so the backward (torch ops) is unchanged. Query blocks are split
across ``torch.get_num_threads()`` threads.
"""

from __future__ import annotations

import ctypes
import functools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from . import build as cpu_build
from ..pytorch.diffusion_plan import as_blocks, dense_global_probs, global_parts

_I64, _PTR, _F32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float


def _library():
    """The library of the default variant (:func:`.build.default_variant`; both follow
    ``ATTNC_CPU_KERNELS`` on every call), or None."""
    lib = cpu_build.load("cpu_diffusion")
    return _typed(lib) if lib is not None else None


@functools.lru_cache(maxsize=None)
def _typed(lib):
    """``lib`` with its entry points' argument types set (once per library)."""
    lib.transpose_f32.argtypes = [_PTR, _I64, _I64, _PTR, _I64, _I64, _I64]
    lib.probs_f32.argtypes = [_PTR, _I64, _I64, _I64, _I64, _I64, _PTR, _PTR, _I64, _I64, _PTR, _PTR, _I64, _PTR,
                              _PTR, _F32, _PTR, _PTR, _I64, _I64]
    lib.dense_probs_f32.argtypes = [_PTR, _I64, _I64, _I64, _PTR, _PTR, _I64, _I64, _F32, _PTR]
    lib.hop_f32.argtypes = [_PTR, _I64, _I64, _I64, _I64, _I64, _PTR, _PTR, _I64, _I64, _PTR, _PTR, _PTR, _PTR, _PTR,
                            _F32, _F32, _I64, _I64]
    for fn in (lib.transpose_f32, lib.probs_f32, lib.dense_probs_f32, lib.hop_f32):
        fn.restype = ctypes.c_int
    return lib


def usable(plan, dtype: torch.dtype, device: torch.device, value_dim: int | None = None) -> bool:
    """Whether the kernels run this plan: float32 on the CPU, value heads (for a hop) a multiple
    of 16, and the library built (:mod:`.cpu_build`)."""
    return (device.type == "cpu" and dtype == torch.float32 and (value_dim is None or value_dim % 16 == 0)
            and _library() is not None)


@dataclass(frozen=True, eq=False)
class _Launch:
    """One chunk's kernel arguments that do not depend on the data: sizes, and addresses of
    index tensors that the (cached) launch keeps alive."""

    R: int  # query blocks
    W: int  # tile columns
    nr: int  # rest columns
    offset: int  # element offset of the chunk's tiles (times bh: the P buffer holds every head)
    tile_elems: int  # R * BM * W: one head's tiles
    band_start: int  # [R] padded key row of each query block's first band key
    rest_index: int  # [R * nr] padded key rows of the rest columns
    qrow: int  # [R] first query row of each block
    patch_of_row: int  # [R] index into patch, -1: no mask
    patch: int  # [Rm, BM, W] additive mask (or one unused element)
    keep: tuple  # the tensors behind the addresses


@functools.lru_cache(maxsize=64)
def _launches(plan) -> tuple[_Launch, ...]:
    g = plan.blocks.geom
    out = []
    for c in plan.chunks:
        R, W = len(c.rows), plan.width(c)
        band = c.band_index.view(R, plan.nb)[:, 0] * g.block_n if plan.nb else torch.zeros(R, dtype=torch.long)
        pof = torch.full((R,), -1, dtype=torch.long)
        patch = torch.zeros(1)
        if c.patch is not None:
            pof[c.patch_rows] = torch.arange(len(c.patch_rows))
            patch = c.patch.float().contiguous()
        keep = (band.contiguous(), c.rest_index.contiguous(), (c.q_index * g.block_m).contiguous(), pof, patch)
        out.append(_Launch(R, W, c.nr, c.offset, R * g.block_m * W, *(t.data_ptr() for t in keep), keep))
    return tuple(out)


@functools.lru_cache(maxsize=64)
def _global_rows(split, L: int, nqb: int, bm: int):
    """``(G, (first, end) or None)``: the dense global rows, and their range when consecutive."""
    G = global_parts(split, L, nqb, bm, "cpu")[0]
    first = int(G[0])
    return G, ((first, first + len(G)) if G.tolist() == list(range(first, first + len(G))) else None)


_POOLS: dict[int, ThreadPoolExecutor] = {}


def _run(fn, R: int, bh: int) -> None:
    """``fn(i, r0, r1)`` over heads and query-block ranges, on torch's thread count (a foreign
    call releases the GIL)."""
    n = torch.get_num_threads()
    if n <= 1 or bh * R <= 1:
        codes = [fn(i, 0, R) for i in range(bh)]
    else:
        pool = _POOLS.get(n)
        if pool is None:
            pool = _POOLS[n] = ThreadPoolExecutor(max_workers=n)
        step = -(-R // max(1, -(-n // bh)))  # row ranges per head so that every thread has work
        codes = list(pool.map(lambda a: fn(*a), [(i, r0, min(R, r0 + step)) for i in range(bh)
                                                  for r0 in range(0, R, step)]))
    if any(codes):
        raise MemoryError("diffusion CPU kernel could not allocate its scratch buffers")


def _rows(t: torch.Tensor, bh: int) -> torch.Tensor:
    """``[Bi, Hi, L, X]`` as ``[BH, L, X]`` with contiguous rows."""
    t = t.reshape(bh, t.shape[-2], t.shape[-1])
    return t if t.stride(-1) == 1 and t.stride(-2) == t.shape[-1] else t.contiguous()


def probs_forward(it, split, q, k, scale: float):
    """``(P flat [bh * size], PG [bh, G, L] or None)``, as :func:`.torch_diffusion._probs_forward`
    computes them. With key blocks of a multiple of 16 rows, each head's keys are first transposed
    once (:func:`transpose_f32`): the band's key columns and the dense global rows then read them
    in place."""
    plan, bh = it.plan, it.bh
    g = plan.blocks.geom
    lib = _library()
    D = q.shape[-1]
    qb = as_blocks(q, g.nqb, g.block_m).view(bh, -1, D)
    kr = _rows(k, bh)
    qp, kp = qb.data_ptr(), kr.data_ptr()
    qs, ks = 4 * qb.stride(0), 4 * kr.stride(0)  # bytes per head
    bn, nbk, shift = g.block_n, plan.nb * g.block_n, plan.pad_lo * g.block_n
    kts = plan.npad * bn * D  # elements of one head's transposed keys
    kt = torch.empty(bh, kts, dtype=torch.float32) if bn % 16 == 0 else None
    ktp = kt.data_ptr() if kt is not None else 0
    if kt is not None:
        _run(lambda i, r0, r1: lib.transpose_f32(kp + i * ks, g.kv_len, D, ktp + 4 * i * kts, plan.npad, bn, shift),
             1, bh)
    P = torch.empty(bh * plan.size, dtype=torch.float32)
    Pp = P.data_ptr()
    for c in _launches(plan):
        pc = Pp + 4 * bh * c.offset

        def one(i, r0, r1, c=c, pc=pc):
            return lib.probs_f32(pc + 4 * i * c.tile_elems, g.block_m, c.W, nbk, c.nr, D, c.band_start, c.rest_index,
                                 shift, g.kv_len, kp + i * ks, ktp and ktp + 4 * i * kts, bn, qp + i * qs, c.qrow,
                                 scale, c.patch_of_row, c.patch, r0, r1)

        _run(one, c.R, bh)
    if not plan.ng:
        return P, None
    if kt is None:
        return P, dense_global_probs(split, q, k, scale, bh, g.q_len, g.nqb, g.block_m)
    G, _, bias = global_parts(split, g.q_len, g.nqb, g.block_m, "cpu")
    ng, Lk = len(G), g.kv_len
    qg = qb[:, G].contiguous()  # [bh, G, D]
    PG = torch.empty(bh, ng, Lk, dtype=torch.float32)
    PGp, qgp = PG.data_ptr(), qg.data_ptr()

    def dense(i, r0, r1):
        return lib.dense_probs_f32(PGp + 4 * i * ng * Lk, ng, Lk, D, qgp + 4 * i * ng * D, ktp + 4 * i * kts, bn,
                                   shift, scale, bias.data_ptr() if bias is not None else None)

    _run(dense, 1, bh)
    return P, PG


def hop_forward(it, split, P, PG, z, v, beta: float, gamma: float):
    """``beta P z + gamma v`` (``[Bi, Hi, L, Dv]``), as :func:`.torch_diffusion._hop_forward`."""
    plan, bh = it.plan, it.bh
    g = plan.blocks.geom
    lib = _library()
    Bi, Hi, L, Dv = z.shape
    zr = _rows(z, bh)
    vb = as_blocks(v, g.nqb, g.block_m).view(bh, -1, Dv)
    out = torch.empty(bh, g.nqb * g.block_m, Dv, dtype=torch.float32)
    Pp, zp, vp, op = P.data_ptr(), zr.data_ptr(), vb.data_ptr(), out.data_ptr()
    zs, vs, os_ = 4 * zr.stride(0), 4 * vb.stride(0), 4 * out.stride(0)  # bytes per head
    nbk, shift = plan.nb * g.block_n, plan.pad_lo * g.block_n
    for c in _launches(plan):
        pc = Pp + 4 * bh * c.offset

        def one(i, r0, r1, c=c, pc=pc):
            return lib.hop_f32(pc + 4 * i * c.tile_elems, g.block_m, c.W, nbk, c.nr, Dv, c.band_start, c.rest_index,
                               shift, L, zp + i * zs, vp + i * vs, c.qrow, op + i * os_, c.qrow, beta, gamma, r0, r1)

        _run(one, c.R, bh)
    if plan.ng:  # the dense global rows (their tile rows are empty: gamma * v so far)
        G, rows = _global_rows(split, L, g.nqb, g.block_m)
        if rows is not None:  # consecutive: accumulate in place
            out[:, rows[0]:rows[1]].baddbmm_(PG, zr, alpha=beta)
        else:
            out[:, G] += beta * torch.bmm(PG, zr)
    return out[:, :L].view(Bi, Hi, L, Dv)
