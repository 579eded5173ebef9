"""Block plan of the torch diffusion stages: how P of one 2-D layout is stored and multiplied.

Per layout (cached): the band of block offsets most rows share (read as a strided view of
zero-padded key blocks), the other blocks of each row (gathered; rows bucketed by their count),
the chunks of query blocks whose tiles are computed together, and the masks of the few rows
that need one. With global tokens split apart (:class:`~attncompiler.families.diffusion.program.GlobalSplit`)
every tile row also holds ``|G|`` global-key columns. See :mod:`.torch_diffusion`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from attncompiler.dsl.score_mod import ScoreMod, check_result
from attncompiler.families.diffusion.program import GlobalSplit
from attncompiler.layout.block_layout import BlockLayout, Blocks2D, pairs_from_ranges
from attncompiler.program.schedule import Schedule

from .common import pad_len

NEG_INF = float("-inf")
_BAND_SHARE = 0.5  # an offset belongs to the band when at least this share of rows has it
_PAD_SLACK = 1.25  # rows with up to this many times the others of a bucket's first row share it
# A chunk's tile is stored P, reused by every hop, not a transient score tile: larger chunks
# (fewer, larger products) measured faster than the attention stage's tile size (1 thread, CPU).
_TILE_SCALE = 4


@dataclass(frozen=True, eq=False)
class Chunk:
    """Query blocks whose tiles are computed together (same number ``wo`` of other blocks).

    A tile row is ``[band | rest]``: ``nb * BN`` band columns read through a strided view, then
    ``nr = wo * BN + |G|`` rest columns (the other blocks' keys, then the global keys) gathered
    token by token, so the rest is one product however it is made up.
    """

    rows: np.ndarray
    q_slice: tuple[int, int] | None  # consecutive rows: a slice of query blocks
    q_index: torch.Tensor  # [R]
    band_affine: tuple[int, int] | None  # (padded block of row 0's band, step between rows)
    band_index: torch.Tensor  # [R * nb] padded key-block ids of the band
    rest_index: torch.Tensor  # [R * nr] padded token ids of the rest (block 0 is zero: missing slots)
    wo: int
    nr: int
    patch_rows: torch.Tensor | None  # [Rm] rows of the chunk whose tile needs a mask
    patch: torch.Tensor | None  # [Rm, BM, W] additive 0 / -inf
    empty_tokens: torch.Tensor | None  # tile rows (of R * BM) with no visible key: softmax NaN -> 0
    offset: int  # element offset of the chunk's tile per (batch, head)


@dataclass(frozen=True, eq=False)
class Plan:
    """How P of one 2-D layout is stored and multiplied (see the module docstring)."""

    blocks: Blocks2D
    nb: int
    dlo: int
    pad_lo: int  # key block c lives at c + pad_lo of the padded block array; block 0 is zero
    npad: int
    ng: int
    chunks: tuple[Chunk, ...]
    size: int  # elements of P per (batch, head)

    def width(self, c: Chunk) -> int:
        """Columns of chunk ``c``'s tile: band, then the rest (other blocks, global keys)."""
        return self.nb * self.blocks.geom.block_n + c.nr


def _band(blocks: Blocks2D) -> tuple[int, int]:
    """``(dlo, nb)``: the run of block offsets ``col - row`` that most rows share."""
    g = blocks.geom
    if g.block_m != g.block_n or g.q_len != g.kv_len or not blocks.num_blocks:
        return 0, 0
    lo, hist = _offset_histogram(blocks)
    common = np.flatnonzero(hist >= _BAND_SHARE * g.nqb) + lo
    best = (0, 0)
    for start in common:  # the longest run of consecutive common offsets
        n = 1
        while start + n in common:
            n += 1
        best = max(best, (n, -int(start)))
    return -best[1], best[0]


def _offset_histogram(blocks: Blocks2D) -> tuple[int, np.ndarray]:
    """``(lo, hist)``: how many blocks lie on each offset ``col - row`` (from ``lo`` on), counted
    from the full ranges (a difference array over offsets) and the partial list, never from the
    expanded blocks."""
    rr, rs, re = blocks.range_rows, blocks.range_start, blocks.range_end
    pd = blocks.part_cols - blocks.part_rows
    lo = int(min(np.min(rs - rr, initial=0), np.min(pd, initial=0)))
    hi = int(max(np.max(re - rr, initial=0), np.max(pd + 1, initial=0)))  # one past the last offset
    diff = np.zeros(hi - lo + 1, dtype=np.int64)
    np.add.at(diff, rs - rr - lo, 1)
    np.add.at(diff, re - rr - lo, -1)
    hist = np.cumsum(diff)[:-1]
    hist += np.bincount(pd - lo, minlength=hi - lo)
    return lo, hist


def _others(blocks: Blocks2D, dlo: int, nb: int) -> tuple[np.ndarray, np.ndarray]:
    """``(ptr [nqb + 1], cols)``: per query block, its key blocks outside the band
    ``[row + dlo, row + dlo + nb)``, sorted -- the pieces of its full ranges left and right of
    the band and its partial blocks there (the plan stores a tile column for each anyway)."""
    nqb = blocks.geom.nqb
    rr, rs, re = blocks.range_rows, blocks.range_start, blocks.range_end
    b_lo, b_hi = rr + dlo, rr + dlo + nb
    left = pairs_from_ranges(rr, rs, np.minimum(re, b_lo) - 1)
    right = pairs_from_ranges(rr, np.maximum(rs, b_hi), re - 1)
    pr, pc = blocks.part_rows, blocks.part_cols
    outside = (pc - pr < dlo) | (pc - pr >= dlo + nb)
    rows = np.concatenate([left[0], right[0], pr[outside]])
    cols = np.concatenate([left[1], right[1], pc[outside]])
    order = np.lexsort((cols, rows))
    ptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=nqb))]).astype(np.int64)
    return ptr, cols[order]


def _kinds_at(blocks: Blocks2D, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(present, full)`` of the blocks ``(rows, cols)`` (same shape; columns outside
    ``[0, nkb)`` are absent), by binary search in the ranges and the partial list."""
    nkb = blocks.geom.nkb
    inside = (cols >= 0) & (cols < nkb)
    key = rows * (nkb + 1) + np.where(inside, cols, nkb)
    full = np.zeros(rows.shape, dtype=bool)
    if len(blocks.range_start):
        starts = blocks.range_rows * (nkb + 1) + blocks.range_start
        i = np.searchsorted(starts, key, side="right") - 1
        ic = np.maximum(i, 0)
        full = (i >= 0) & (blocks.range_rows[ic] == rows) & (blocks.range_end[ic] > cols) & inside
    part = np.zeros(rows.shape, dtype=bool)
    if len(blocks.part_cols):
        pkeys = blocks.part_rows * (nkb + 1) + blocks.part_cols
        j = np.minimum(np.searchsorted(pkeys, key), len(pkeys) - 1)
        part = (pkeys[j] == key) & inside
    return full | part, full


def _buckets(counts: np.ndarray) -> list[tuple[np.ndarray, int]]:
    """``(rows, wo)``: rows padded to the same number of other blocks, bounded waste."""
    order = np.argsort(counts, kind="stable")
    out, i = [], 0
    while i < len(order):
        limit = max(counts[order[i]] * _PAD_SLACK, counts[order[i]] + 1)
        j = i
        while j < len(order) and counts[order[j]] <= limit:
            j += 1
        out.append((np.sort(order[i:j]), int(counts[order[j - 1]])))
        i = j
    return out


@functools.lru_cache(maxsize=64)
def global_parts(split: GlobalSplit | None, L: int, nqb: int, bm: int, device: str):
    """``(tokens [G], col_ok [nqb*BM, G] bool, row_bias [G, L] or None)``: which query rows may
    see each global key (global rows take the dense row path, so none of theirs), and the mask
    of the dense global rows."""
    if split is None:
        return None
    G = torch.tensor(split.tokens, dtype=torch.long)
    q = torch.arange(nqb * bm)
    ok = torch.ones(nqb * bm, len(G), dtype=torch.bool)
    ok[G] = False
    row_bias = None
    if split.within is not None:
        qc = q.clamp_max(L - 1)
        ok &= split.within.evaluate(0, 0, qc[:, None], G[None, :], L, L)
        row_ok = split.within.evaluate(0, 0, G[:, None], torch.arange(L)[None, :], L, L)
        row_bias = torch.zeros(len(G), L).masked_fill_(~row_ok, NEG_INF).to(device)
    return G.to(device), ok, row_bias


def dense_global_probs(split: GlobalSplit | None, q: torch.Tensor, k: torch.Tensor, scale: float, bh: int, L: int,
                       nqb: int, bm: int, mod: TileMod | None = None) -> torch.Tensor | None:
    """``PG [BH, G, Lk]``: the dense rows of the global queries (softmax over every allowed key,
    of the scores through ``mod`` when given), None without global tokens. ``q``, ``k`` are
    ``[Bi, Hi, L, D]`` in the compute dtype."""
    if split is None:
        return None
    G, _, row_bias = global_parts(split, L, nqb, bm, str(q.device))
    D = q.shape[-1]
    s = torch.bmm(q.reshape(bh, -1, D)[:, G], k.reshape(bh, -1, D).transpose(1, 2)).mul_(scale)
    if mod is not None:
        mod.apply(s, G.view(1, -1, 1), torch.arange(s.shape[-1], device=s.device).view(1, 1, -1))
    if row_bias is not None:
        s += row_bias.to(s.dtype)
    return torch.softmax(s, dim=-1).nan_to_num_(0.0)  # [BH, G, Lk]


@functools.lru_cache(maxsize=64)
def plan_for(blocks: Blocks2D, schedule: Schedule, split: GlobalSplit | None) -> Plan:
    """The :class:`Plan` of one 2-D layout (cached): band, buckets, chunks, masks."""
    g = blocks.geom
    bm, bn, nqb, nkb = g.block_m, g.block_n, g.nqb, g.nkb
    dlo, nb = _band(blocks)
    pad_lo = max(1, -dlo)
    npad = pad_lo + nkb + max(0, dlo + nb - 1)
    ng = len(split.tokens) if split is not None else 0
    gtok = np.asarray(split.tokens if ng else (), dtype=np.int64) + pad_lo * bn  # padded token ids
    gok = global_parts(split, g.q_len, nqb, bm, "cpu")[1] if ng else None
    optr, ocols = _others(blocks, dlo, nb)
    counts = np.diff(optr)
    chunks, offset = [], 0
    for bucket, wo in _buckets(counts):
        nr = wo * bn + ng
        W = nb * bn + nr
        per_chunk = max(1, _TILE_SCALE * schedule.tile_elems // (bm * max(W, 1)))  # W = 0: rows see no key
        for s in range(0, len(bucket), per_chunk):
            r = bucket[s:s + per_chunk]
            R = len(r)
            band = r[:, None] + dlo + np.arange(nb)  # [R, nb] key blocks (may fall off the ends)
            other = np.full((R, wo), -1, dtype=np.int64)
            n_o = counts[r]
            sel = np.arange(wo)[None, :] < n_o[:, None]
            other[sel] = ocols[(optr[r][:, None] + np.arange(wo)[None, :])[sel]]
            slots = np.concatenate([band, other], axis=1)  # [R, nb + wo]
            present, full = _kinds_at(blocks, np.broadcast_to(r[:, None], slots.shape), slots)
            ragged = (slots == nkb - 1) & (g.kv_len % bn != 0)
            need = ~(full & ~ragged).all(axis=1) | (nb + wo == 0)
            tok = torch.from_numpy(r * bm)[:, None] + torch.arange(bm)  # [R, BM] query tokens
            if ng:
                need |= ~gok[tok].flatten(1).all(dim=1).numpy()
            patch_rows, patch, empty = None, None, None
            if need.any():
                pr = np.flatnonzero(need)
                allowed = _slot_masks(blocks, r[pr], slots[pr], present[pr], full[pr])  # [Rm, BM, S*BN]
                if ng:
                    allowed = torch.cat([allowed, gok[tok[pr]]], dim=-1)
                patch_rows = torch.from_numpy(pr)
                patch = torch.zeros(allowed.shape).masked_fill_(~allowed, NEG_INF)
                dead = (~allowed.any(dim=-1)).nonzero()  # (row of pr, token of the block)
                if len(dead):
                    empty = patch_rows[dead[:, 0]] * bm + dead[:, 1]
            consecutive = bool((np.diff(r) == 1).all())
            step = np.diff(r)
            affine = (int(r[0]) + dlo + pad_lo, int(step[0]) if R > 1 else 1) \
                if nb and (R == 1 or (step == step[0]).all()) else None
            band_ids = (band + pad_lo).reshape(-1)  # >= 0: pad_lo covers the lowest band offset
            other_tok = (np.where(other >= 0, other + pad_lo, 0) * bn)[:, :, None] + np.arange(bn)
            rest = np.concatenate([other_tok.reshape(R, wo * bn), np.broadcast_to(gtok, (R, ng))], axis=1)
            chunks.append(Chunk(r, (int(r[0]), int(r[-1]) + 1) if consecutive else None, torch.from_numpy(r.copy()),
                                 affine, torch.from_numpy(band_ids.copy()), torch.from_numpy(rest.reshape(-1).copy()),
                                 wo, nr, patch_rows, patch, empty, offset))
            offset += R * bm * W
    return Plan(blocks, nb, dlo, pad_lo, npad, ng, tuple(chunks), offset)


def _slot_masks(blocks: Blocks2D, rows, slots, present, full) -> torch.Tensor:
    """``[R, BM, S*BN]`` bool: which pairs of each row's slots are in the pattern."""
    g = blocks.geom
    bm, bn = g.block_m, g.block_n
    R, S = slots.shape
    m = torch.from_numpy(full)[:, None, :, None].expand(R, bm, S, bn).contiguous()
    pr, pc = np.nonzero(present & ~full)
    if len(pr):
        q = torch.from_numpy(rows[pr] * bm)[:, None] + torch.arange(bm)
        k = torch.from_numpy(slots[pr, pc] * bn)[:, None] + torch.arange(bn)
        em = blocks.pattern.evaluate(0, 0, q.clamp_max(g.q_len - 1)[:, :, None], k.clamp_max(g.kv_len - 1)[:, None, :],
                                     g.q_len, g.kv_len)
        m.permute(0, 2, 1, 3)[torch.from_numpy(pr), torch.from_numpy(pc)] = em
    k_pos = torch.from_numpy(slots * bn)[:, :, None] + torch.arange(bn)  # [R, S, BN]
    return m.view(R, bm, S * bn) & (k_pos < g.kv_len).view(R, 1, S * bn)


class TileMod:
    """A score_mod applied to score tiles of one :class:`Item` whose first axis runs over its
    ``bh`` (batch, head) entries: ``b_ids``, ``h_ids [bh]`` are their global indices. ``vjp``
    differentiates it with autograd, adding the gradients of ``captured`` into ``grads`` (by id)."""

    def __init__(self, fn, b_ids: torch.Tensor, h_ids: torch.Tensor, captured=(), grads: dict | None = None):
        self.fn, self.b_ids, self.h_ids = fn, b_ids, h_ids
        self.want = [t for t in captured if t.requires_grad]
        self.grads = {} if grads is None else grads

    def indices(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(b, h)`` shaped ``[bh, 1, ...]`` to broadcast against ``s``."""
        shape = (-1,) + (1,) * (s.dim() - 1)
        return self.b_ids.view(shape), self.h_ids.view(shape)

    def apply(self, s: torch.Tensor, q_pos: torch.Tensor, kv_pos: torch.Tensor) -> None:
        """``s = fn(s, b, h, q_pos, kv_pos)`` in place (checked: shape and dtype)."""
        fn = self.fn
        b, h = self.indices(s)
        out = fn.apply_(s, b, h, q_pos, kv_pos, {}) if isinstance(fn, ScoreMod) else fn(s, b, h, q_pos, kv_pos)
        out = check_result(fn, out, s)
        if out is not s:
            s.copy_(out)

    def vjp(self, s: torch.Tensor, ds: torch.Tensor, q_pos: torch.Tensor, kv_pos: torch.Tensor) -> torch.Tensor:
        """``ds * d fn / d s`` at the raw scores ``s`` (a fresh tensor), adding the captured
        tensors' gradients into :attr:`grads`."""
        b, h = self.indices(s)
        with torch.enable_grad():
            s = s.requires_grad_()
            out = check_result(self.fn, self.fn(s, b, h, q_pos, kv_pos), s)
        got = torch.autograd.grad(out, [s, *self.want], grad_outputs=ds, allow_unused=True)
        for t, g in zip(self.want, got[1:]):
            if g is not None:
                self.grads[id(t)] = g if id(t) not in self.grads else self.grads[id(t)] + g
        return got[0] if got[0] is not None else torch.zeros_like(ds)


def tile_mod(fn, it: Item, heads: int, device, captured=(), grads: dict | None = None) -> TileMod | None:
    """The :class:`TileMod` of score_mod ``fn`` on item ``it`` (None without a score_mod)."""
    if fn is None:
        return None
    if it.b == slice(None):
        ids = torch.arange(it.bh, device=device)
        b_ids, h_ids = ids // heads, ids % heads
    else:
        b_ids = torch.tensor([it.b.start], device=device)
        h_ids = torch.tensor([it.h.start], device=device)
    return TileMod(fn, b_ids, h_ids, captured, grads)


@functools.lru_cache(maxsize=256)
def tile_positions(plan: Plan, c: Chunk, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q_pos [1, R, BM, 1], kv_pos [1, R, 1, W])``: the query and key position of every entry of
    chunk ``c``'s tile (band columns, then the rest: other blocks' keys and global keys); slots
    past the ends or missing (always masked) are clamped into ``[0, L)``."""
    g = plan.blocks.geom
    bm, bn = g.block_m, g.block_n
    rows = torch.from_numpy(c.rows.copy())
    R = len(rows)
    q = (rows[:, None] * bm + torch.arange(bm)).clamp_max(g.q_len - 1)
    band = ((rows[:, None, None] + plan.dlo + torch.arange(plan.nb)[None, :, None]) * bn
            + torch.arange(bn)).reshape(R, plan.nb * bn)
    rest = c.rest_index.view(R, c.nr) - plan.pad_lo * bn
    kv = torch.cat([band, rest], dim=1).clamp(0, g.kv_len - 1)
    return q.view(1, R, bm, 1).to(device), kv.view(1, R, 1, -1).to(device)


@dataclass(frozen=True, eq=False)
class Item:
    """(batch, head) entries sharing one 2-D layout and its plan."""

    plan: Plan
    b: slice
    h: slice
    bh: int


@functools.lru_cache(maxsize=128)
def items_for(layout: BlockLayout, schedule: Schedule, batch: int, heads: int, split: GlobalSplit | None):
    """One :class:`Item` per layout group: all (batch, head) at once, or one per (batch, head)."""
    if len(layout.groups) == 1:
        return (Item(plan_for(layout.groups[0], schedule, split), slice(None), slice(None), batch * heads),)
    return tuple(Item(plan_for(layout.group_for(b, h), schedule, split), slice(b, b + 1), slice(h, h + 1), 1)
                 for b in range(batch) for h in range(heads))


# ---------------------------------------------------------------------------------------------
# Block views
# ---------------------------------------------------------------------------------------------

def as_blocks(t: torch.Tensor, n: int, b: int) -> torch.Tensor:
    """``[Bi, Hi, L, X]`` padded to ``n * b`` rows and viewed as ``[BH, n, b, X]``."""
    Bi, Hi, _, X = t.shape
    return pad_len(t, n * b).contiguous().view(Bi * Hi, n, b, X)


def padded_blocks(t: torch.Tensor, plan: Plan) -> torch.Tensor:
    """``[Bi, Hi, L, X]`` as key blocks ``[BH, npad, BN, X]`` with zero blocks around them
    (no copy when ``t`` is a hop output laid out that way, see :func:`_hop_forward`)."""
    cached = getattr(t, "_attnc_padded", None)
    if cached is not None and cached[0] is plan:
        return cached[1]
    g = plan.blocks.geom
    Bi, Hi, L, X = t.shape
    out = t.new_empty(Bi * Hi, plan.npad, g.block_n, X)
    flat = out.view(Bi * Hi, -1, X)
    lo = plan.pad_lo * g.block_n
    flat[:, :lo].zero_()
    flat[:, lo + L:].zero_()
    flat[:, lo:lo + L] = t.reshape(Bi * Hi, L, X)
    return out


def band_view(tp: torch.Tensor, i: int, plan: Plan, c: Chunk, r0: int = 0, r1: int | None = None) -> torch.Tensor:
    """Band blocks of rows ``r0:r1`` of ``c`` for (batch, head) ``i``: ``[R, nb*BN, X]`` (no copy
    when the rows step evenly)."""
    _, npad, bn, X = tp.shape
    r1 = len(c.rows) if r1 is None else r1
    if c.band_affine is not None:
        b0, st = c.band_affine
        s0, s1, s2, s3 = tp.stride()
        return tp.as_strided((r1 - r0, plan.nb * bn, X), (st * s1, s2, s3),
                             tp.storage_offset() + i * s0 + (b0 + r0 * st) * s1)
    return tp[i].index_select(0, c.band_index[r0 * plan.nb:r1 * plan.nb]).view(r1 - r0, plan.nb * bn, X)


@functools.lru_cache(maxsize=256)
def _rest_gather_index(c: Chunk, bh: int, npad_tokens: int, device: torch.device) -> torch.Tensor:
    return (torch.arange(bh)[:, None] * npad_tokens + c.rest_index[None, :]).reshape(-1).to(device)


def rest_rows(tp: torch.Tensor, c: Chunk) -> torch.Tensor:
    """The rest columns' rows (other blocks, global keys) of every row of ``c``:
    ``[BH, R, nr, X]`` (one token gather)."""
    BH, npad, bn, X = tp.shape
    idx = _rest_gather_index(c, BH, npad * bn, tp.device)
    return tp.reshape(BH * npad * bn, X).index_select(0, idx).view(BH, len(c.rows), c.nr, X)


def chunk_rows(t: torch.Tensor, c: Chunk) -> torch.Tensor:
    """``[BH, nqb, BM, X]`` -> the chunk's rows ``[BH, R, BM, X]`` (a view if consecutive)."""
    return t[:, c.q_slice[0]:c.q_slice[1]] if c.q_slice is not None else t.index_select(1, c.q_index)


def chunk_tile(P: torch.Tensor, plan: Plan, c: Chunk, bh: int) -> torch.Tensor:
    """The chunk's stored tile ``[BH, R, BM, W]`` (a view into the flat buffer)."""
    R, W = len(c.rows), plan.width(c)
    n = R * plan.blocks.geom.block_m * W
    return P[bh * c.offset:bh * (c.offset + n)].view(bh, R, plan.blocks.geom.block_m, W)
