"""The diffusion stages' chunk products on the CPU through C kernels (``templates/cpu_diffusion.c``).

For float32 on the CPU the torch stages (:mod:`.torch_diffusion`) hand each chunk of their plan
to two kernels instead of torch ops: P (scores, mask and softmax in one pass per query block,
keys read in place) and a hop (``gamma v + beta P z``, z rows read in place; the dense global
rows are one more block of it). The torch ops need a gathered copy of the other blocks, a
separate product per part, a cat and separate axpby and softmax passes; the kernels do none of
that. Stored P keeps its layout, so the backward (torch ops) is unchanged. Query blocks are
split across ``torch.get_num_threads()`` threads.
"""

from __future__ import annotations

import ctypes
import functools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from . import cpu_build
from .torch_diffusion_plan import as_blocks, chunk_tile, dense_global_probs, global_parts

_I64, _PTR, _F32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float


@functools.lru_cache(maxsize=1)
def _library():
    lib = cpu_build.load("cpu_diffusion")
    if lib is not None:
        lib.probs_f32.argtypes = [_PTR, _I64, _I64, _I64, _I64, _I64, _PTR, _PTR, _I64, _I64, _PTR, _PTR, _PTR, _F32,
                                  _PTR, _PTR, _I64, _I64]
        lib.hop_f32.argtypes = [_PTR, _I64, _I64, _I64, _I64, _I64, _PTR, _PTR, _I64, _I64, _PTR, _PTR, _PTR, _PTR, _PTR,
                                _F32, _F32, _I64, _I64]
        lib.probs_f32.restype = lib.hop_f32.restype = ctypes.c_int
    return lib


def usable(plan, dtype: torch.dtype, device: torch.device, value_dim: int | None = None) -> bool:
    """Whether the kernels run this plan: float32 on the CPU, query blocks a multiple of 4 rows,
    value heads (for a hop) a multiple of 16, and the library built (:mod:`.cpu_build`)."""
    return (device.type == "cpu" and dtype == torch.float32 and plan.blocks.geom.block_m % 4 == 0
            and (value_dim is None or value_dim % 16 == 0) and _library() is not None)


@dataclass(frozen=True, eq=False)
class _ChunkArgs:
    band_start: torch.Tensor  # [R] padded key row of each query block's first band key
    rest_index: torch.Tensor  # [R * nr] padded key rows of the rest columns
    qrow: torch.Tensor  # [R] first query row of each block
    patch_of_row: torch.Tensor  # [R] index into patch, -1: no mask
    patch: torch.Tensor  # [Rm, BM, W] additive mask (or one unused element)


@functools.lru_cache(maxsize=256)
def _chunk_args(plan, c) -> _ChunkArgs:
    g = plan.blocks.geom
    R = len(c.rows)
    band = c.band_index.view(R, plan.nb)[:, 0] * g.block_n if plan.nb else torch.zeros(R, dtype=torch.long)
    pof = torch.full((R,), -1, dtype=torch.long)
    patch = torch.zeros(1)
    if c.patch is not None:
        pof[c.patch_rows] = torch.arange(len(c.patch_rows))
        patch = c.patch.float().contiguous()
    return _ChunkArgs(band.contiguous(), c.rest_index.contiguous(), (c.q_index * g.block_m).contiguous(), pof, patch)


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
    """``(P flat [bh * size], PG [bh, G, L] or None)``: the kernel's tiles and the dense global
    rows (a torch product), as :func:`.torch_diffusion._probs_forward` computes them."""
    plan, bh = it.plan, it.bh
    g = plan.blocks.geom
    lib = _library()
    D = q.shape[-1]
    qb = as_blocks(q, g.nqb, g.block_m).view(bh, -1, D)
    kr = _rows(k, bh)
    P = torch.empty(bh * plan.size, dtype=torch.float32)
    shift = plan.pad_lo * g.block_n
    for c in plan.chunks:
        a, tile = _chunk_args(plan, c), chunk_tile(P, plan, c, bh)
        R, W = len(c.rows), plan.width(c)

        def one(i, r0, r1, c=c, a=a, tile=tile, W=W):
            return lib.probs_f32(tile[i].data_ptr(), g.block_m, W, plan.nb * g.block_n, c.nr, D, a.band_start.data_ptr(),
                                 a.rest_index.data_ptr(), shift, g.kv_len, kr[i].data_ptr(), qb[i].data_ptr(),
                                 a.qrow.data_ptr(), scale, a.patch_of_row.data_ptr(), a.patch.data_ptr(), r0, r1)

        _run(one, R, bh)
    return P, dense_global_probs(split, q, k, scale, bh, g.q_len, g.nqb, g.block_m)


def hop_forward(it, split, P, PG, z, v, beta: float, gamma: float):
    """``beta P z + gamma v`` (``[Bi, Hi, L, Dv]``), as :func:`.torch_diffusion._hop_forward`."""
    plan, bh = it.plan, it.bh
    g = plan.blocks.geom
    lib = _library()
    Bi, Hi, L, Dv = z.shape
    zr = _rows(z, bh)
    vb = as_blocks(v, g.nqb, g.block_m).view(bh, -1, Dv)
    out = torch.empty(bh, g.nqb * g.block_m, Dv, dtype=torch.float32)
    shift = plan.pad_lo * g.block_n
    for c in plan.chunks:
        a, tile = _chunk_args(plan, c), chunk_tile(P, plan, c, bh)
        R, W = len(c.rows), plan.width(c)

        def one(i, r0, r1, c=c, a=a, tile=tile, W=W):
            return lib.hop_f32(tile[i].data_ptr(), g.block_m, W, plan.nb * g.block_n, c.nr, Dv, a.band_start.data_ptr(),
                               a.rest_index.data_ptr(), shift, L, zr[i].data_ptr(), vb[i].data_ptr(), a.qrow.data_ptr(),
                               out[i].data_ptr(), a.qrow.data_ptr(), beta, gamma, r0, r1)

        _run(one, R, bh)
    if plan.ng:  # the dense global rows (their tile rows are empty: gamma * v so far)
        G = global_parts(split, L, g.nqb, g.block_m, "cpu")[0]
        out[:, G] += _dense_rows(lib, PG, zr, shift, beta)
    return out[:, :L].view(Bi, Hi, L, Dv)


_ONE_ROW = (torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long))


@functools.lru_cache(maxsize=64)
def _band_from(shift: int) -> torch.Tensor:
    return torch.full((1,), shift, dtype=torch.long)


def _dense_rows(lib, PG: torch.Tensor, zr: torch.Tensor, shift: int, beta: float) -> torch.Tensor:
    """``beta PG z`` ``[BH, G, Dv]``: the hop kernel on one block of the dense global rows (rows
    padded to a multiple of 4) whose keys are all of ``z`` (the band from row 0)."""
    bh, ng, Lk = PG.shape
    Dv = zr.shape[-1]
    pad = -ng % 4
    PGp = torch.nn.functional.pad(PG, (0, 0, 0, pad)) if pad else PG.contiguous()
    acc = torch.zeros(bh, ng + pad, Dv, dtype=torch.float32)  # also the "v" term, with gamma 0
    band = _band_from(shift)
    zero_row, empty = _ONE_ROW

    def one(i, r0, r1):
        return lib.hop_f32(PGp[i].data_ptr(), ng + pad, Lk, Lk, 0, Dv, band.data_ptr(), empty.data_ptr(), shift, Lk,
                           zr[i].data_ptr(), acc[i].data_ptr(), zero_row.data_ptr(), acc[i].data_ptr(),
                           zero_row.data_ptr(), beta, 0.0, r0, r1)

    _run(one, 1, bh)
    return acc[:, :ng]
