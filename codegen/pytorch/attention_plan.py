"""The plan of the torch ``BlockSparseAttention`` stage (see :mod:`.torch_attention`): query
blocks bucketed by cost and cut into chunks, each chunk's key blocks cut into online-softmax
steps (a strided band or a gather), and the additive masks of the steps that need one, cached.
:mod:`.torch_probs` reuses the same plan and masks.
"""

from __future__ import annotations

import functools
import threading
import weakref
from dataclasses import dataclass

import numpy as np
import torch

from attncompiler.layout.block_layout import Blocks2D
from attncompiler.layout.block_sets import pairs_from_ranges
from attncompiler.program.schedule import Schedule

NEG_INF = float("-inf")


@dataclass(frozen=True, eq=False)
class Step:
    """One online-softmax step of a chunk: a slice ``[c0, c1)`` of its key-block columns.

    Only partial (or padded) blocks are listed; the key-block ids of the step are derived on
    demand from the chunk (:meth:`Chunk.step_index`), so a plan is as large as its rows, steps
    and partial blocks, never one entry per computed block."""

    c0: int
    c1: int
    affine: tuple[int, int] | None  # (first block, step between rows) when the band is strided
    needs_mask: bool
    partial_r: torch.Tensor  # positions of partial blocks in the step's [R, C] grid
    partial_c: torch.Tensor


@dataclass(frozen=True, eq=False)
class Chunk:
    """Query blocks processed together (same number of key blocks).

    Rows whose key blocks are one contiguous run (``lo`` given) read columns
    ``lo[r] + j``; of those, ``[first[r], first[r] + count[r])`` are in the layout (the rest is
    padding) and full unless listed as partial by the step. Other rows list their blocks
    (``explicit = (cols, full)``, ``[R, width]``)."""

    rows: np.ndarray
    q_slice: tuple[int, int] | None  # consecutive rows: a slice of query blocks
    q_index: torch.Tensor
    width: int
    lo: np.ndarray | None
    first: np.ndarray | None
    count: np.ndarray | None
    explicit: tuple[np.ndarray, np.ndarray] | None
    step_list: tuple[Step, ...] | None  # rows with gaps: their steps; bands derive theirs
    band: tuple | None = None  # (partial rows, partial columns sorted, stride, blocks per step, nkb, ragged)

    @property
    def steps(self) -> tuple[Step, ...]:
        """The chunk's steps. A band's are derived on each call from its partial blocks (a causal
        row at 1M tokens has 256 steps: stored for every row they would grow with (L/B)^2)."""
        if self.step_list is not None:
            return self.step_list
        p_row, p_pos, stride, per, nkb, ragged = self.band
        lo, first, end = self.lo, self.first, self.first + self.count
        out = []
        for c0 in range(0, self.width, per):
            c1 = min(self.width, c0 + per)
            i0, i1 = np.searchsorted(p_pos, [c0, c1])
            padded = bool(((lo + c0) < first).any() or ((lo + c1) > end).any())
            edge = ragged and bool(((lo + c0 <= nkb - 1) & (nkb - 1 < lo + c1)).any())
            affine = None if stride is None else (int(lo[0]) + c0, stride)
            out.append(Step(c0, c1, affine, padded or edge or i1 > i0,
                            torch.from_numpy(p_row[i0:i1]), torch.from_numpy(p_pos[i0:i1] - c0)))
        return tuple(out)

    def step_cols(self, step: Step) -> np.ndarray:
        """``[R, C]`` key-block ids of the step (built on demand, bounded by the chunk)."""
        if self.explicit is not None:
            return self.explicit[0][:, step.c0:step.c1]
        return self.lo[:, None] + np.arange(step.c0, step.c1)

    def step_index(self, step: Step) -> torch.Tensor:
        """``[R * C]`` key-block ids of the step, for gathers and the backward's scatter-add."""
        return torch.from_numpy(np.ascontiguousarray(self.step_cols(step)).reshape(-1))

    def step_full(self, step: Step) -> np.ndarray:
        """``[R, C]`` bool: blocks of the step that are full (neither partial nor padding)."""
        if self.explicit is not None:
            return self.explicit[1][:, step.c0:step.c1].copy()
        cols = self.step_cols(step)
        full = (cols >= self.first[:, None]) & (cols < (self.first + self.count)[:, None])
        full[step.partial_r.numpy(), step.partial_c.numpy()] = False
        return full

    @property
    def cols(self) -> np.ndarray:
        """``[R, width]`` key-block ids of every column (built on demand)."""
        if self.explicit is not None:
            return self.explicit[0]
        return self.lo[:, None] + np.arange(self.width)


# Rows whose key blocks form one contiguous run are merged into buckets of similar length, padded
# with (empty, masked) neighbouring blocks: causal and prefix rows then share one strided key view
# instead of running one small matmul per row. This bounds the padding waste.
_MERGE_SLACK = 1.25


def _row_extent(blocks: Blocks2D) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(counts, first, last)`` per query-block row, from the full ranges and the partial list
    (never the expanded block list); empty rows have first 0 and last -1."""
    nqb = blocks.geom.nqb
    rptr, pptr = blocks.range_ptr, blocks.part_ptr
    n_ranges, n_part = np.diff(rptr), np.diff(pptr)
    counts = n_part + np.bincount(blocks.range_rows, weights=blocks.range_end - blocks.range_start,
                                  minlength=nqb).astype(np.int64)
    big = np.iinfo(np.int64).max
    first = np.full(nqb, big, dtype=np.int64)
    last = np.full(nqb, -1, dtype=np.int64)
    has_r, has_p = n_ranges > 0, n_part > 0
    # ranges and partial blocks are sorted within a row: the first / last entry bounds it
    first[has_r] = blocks.range_start[rptr[:-1][has_r]]
    last[has_r] = blocks.range_end[rptr[1:][has_r] - 1] - 1
    first[has_p] = np.minimum(first[has_p], blocks.part_cols[pptr[:-1][has_p]])
    last[has_p] = np.maximum(last[has_p], blocks.part_cols[pptr[1:][has_p] - 1])
    first[counts == 0] = 0
    return counts, first, last


@dataclass(frozen=True, eq=False)
class KeyRange:
    """The keys of a one-block-row layout when they are one contiguous range ``[k0, k1)``.

    ``visible`` is ``[q_len, k1 - k0]`` bool (query rows by key columns), or None when every
    row sees every key of the range. Edge columns no row sees are trimmed off."""

    k0: int
    k1: int
    visible: torch.Tensor | None


@functools.lru_cache(maxsize=256)
def single_key_range(blocks: Blocks2D) -> KeyRange | None:
    """The layout's keys as one :class:`KeyRange`, or None when the layout has more than one
    query block, its key blocks are not contiguous, or some query row sees no key.

    Decoding (a few rows against a long cache) has this shape: the step is then one fused
    attention over a slice of K/V, with a mask only when the edge blocks are partial."""
    g = blocks.geom
    if g.nqb != 1:
        return None
    counts, first, last = (int(a[0]) for a in _row_extent(blocks))
    if counts == 0 or last - first + 1 != counts:
        return None
    k0, k1 = first * g.block_n, min((last + 1) * g.block_n, g.kv_len)
    vis = torch.ones(g.q_len, k1 - k0, dtype=torch.bool)
    parts = blocks.part_cols[blocks.part_ptr[0]:blocks.part_ptr[1]]
    if len(parts):
        k = torch.from_numpy(parts * g.block_n)[:, None] + torch.arange(g.block_n)  # [P, bn]
        k = k[k < k1]  # the ragged last block ends at kv_len
        q = torch.arange(g.q_start, g.q_end)
        vis[:, k - k0] = blocks.pattern.evaluate(0, 0, q[:, None], k[None, :], g.q_end, g.kv_len)
    if not bool(vis.any(dim=1).all()):
        return None  # a row with no visible key: the block path gives it zeros and lse -inf
    cols = torch.nonzero(vis.any(dim=0)).reshape(-1)
    lo, hi = int(cols[0]), int(cols[-1]) + 1
    vis = vis[:, lo:hi]
    return KeyRange(k0 + lo, k0 + hi, None if bool(vis.all()) else vis.contiguous())


def _buckets(blocks: Blocks2D) -> list[tuple[np.ndarray, int, bool]]:
    """``(rows, width, contiguous)`` groups of query blocks processed with the same width."""
    counts, first, last = _row_extent(blocks)
    nonempty = counts > 0
    if not nonempty.any():
        return []
    contiguous = nonempty & (last - first + 1 == counts)
    out = [(np.flatnonzero((counts == c) & ~contiguous & nonempty), int(c), False)
           for c in np.unique(counts[nonempty & ~contiguous])]
    rows = np.flatnonzero(contiguous)
    rows = rows[np.argsort(counts[rows], kind="stable")]
    i = 0
    while i < len(rows):
        limit = counts[rows[i]] * _MERGE_SLACK
        j = i
        while j < len(rows) and counts[rows[j]] <= limit:
            j += 1
        group = np.sort(rows[i:j])
        out.append((group, int(counts[rows[j - 1]]), True))
        i = j
    return out


@functools.lru_cache(maxsize=256)
def make_plan(blocks: Blocks2D, schedule: Schedule, group: int) -> tuple[Chunk, ...]:
    """Bucket, chunk and step a 2-D layout; ``group`` query heads share each key/value head
    (their rows are folded into one matmul, so they count towards the tile size).

    Works from the layout's full ranges and partial list: contiguous rows keep one start column
    each and their partial blocks, so the plan is as large as its rows and partial blocks,
    never the expanded layout (causal at 1M tokens has 134 million computed blocks)."""
    g = blocks.geom
    counts, firsts, _ = _row_extent(blocks)
    chunks = []
    for rows, width, contiguous in _buckets(blocks):
        per_row_elems = group * g.block_m * min(width, schedule.key_blocks_per_step) * g.block_n
        rows_per_chunk = max(1, schedule.tile_elems // per_row_elems)
        for start in range(0, len(rows), rows_per_chunk):
            r = rows[start:start + rows_per_chunk]
            w = int(counts[r].max())  # a chunk pads only to its own longest row
            consecutive = bool((np.diff(r) == 1).all())
            q_slice = (int(r[0]), int(r[-1]) + 1) if consecutive else None
            if contiguous:
                chunks.append(_band_chunk(blocks, r, w, firsts[r], counts[r], q_slice, schedule))
            else:
                chunks.append(_explicit_chunk(blocks, r, w, q_slice, schedule))
    return tuple(chunks)


def _step_range(w: int, schedule: Schedule):
    return ((c0, min(w, c0 + schedule.key_blocks_per_step)) for c0 in range(0, w, schedule.key_blocks_per_step))


def _band_chunk(blocks: Blocks2D, r: np.ndarray, w: int, first: np.ndarray, count: np.ndarray, q_slice,
                schedule: Schedule) -> Chunk:
    """A chunk of rows whose key blocks are one contiguous run each: columns ``lo + j``."""
    g = blocks.geom
    lo = np.minimum(first, g.nkb - w)  # extend right, or left at the end
    pptr = blocks.part_ptr
    n_p = pptr[r + 1] - pptr[r]
    pidx = np.repeat(pptr[r] - np.concatenate([[0], np.cumsum(n_p)[:-1]]), n_p) + np.arange(int(n_p.sum()))
    p_row = np.repeat(np.arange(len(r)), n_p)
    p_pos = blocks.part_cols[pidx] - lo[p_row]  # column of each partial block in the chunk
    order = np.argsort(p_pos, kind="stable")
    p_row, p_pos = p_row[order], p_pos[order]
    band = (p_row, p_pos, _progression(lo), schedule.key_blocks_per_step, g.nkb, g.kv_len % g.block_n != 0)
    return Chunk(r, q_slice, torch.from_numpy(r.copy()), w, lo, first.copy(), count.copy(), None, None, band)


def _explicit_chunk(blocks: Blocks2D, r: np.ndarray, w: int, q_slice, schedule: Schedule) -> Chunk:
    """A chunk of rows with gaps between their key blocks (every row has exactly ``w``)."""
    g = blocks.geom
    pos, col, full_flags = _row_blocks(blocks, r)
    cols, full = col.reshape(len(r), w), full_flags.reshape(len(r), w)
    steps = []
    for c0, c1 in _step_range(w, schedule):
        sc, sf = cols[:, c0:c1], full[:, c0:c1]
        pr, pc = np.nonzero(~sf)
        needs_mask = not sf.all() or (g.kv_len % g.block_n != 0 and bool((sc == g.nkb - 1).any()))
        steps.append(Step(c0, c1, _affine(sc), needs_mask, torch.from_numpy(pr), torch.from_numpy(pc)))
    return Chunk(r, q_slice, torch.from_numpy(r.copy()), w, None, None, None, (cols, full), tuple(steps))


def _progression(lo: np.ndarray) -> int | None:
    """The common difference of ``lo`` when it is a non-negative arithmetic progression."""
    if len(lo) < 2:
        return 1
    d = np.diff(lo)
    return int(d[0]) if d[0] >= 0 and (d == d[0]).all() else None


def _row_blocks(blocks: Blocks2D, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(row position, col, full)`` of every block of the given rows, sorted by (position, col):
    the rows' full ranges expanded, merged with their partial blocks (rows with gaps only)."""
    rptr, pptr = blocks.range_ptr, blocks.part_ptr
    nr, np_ = rptr[rows + 1] - rptr[rows], pptr[rows + 1] - pptr[rows]
    ridx = np.repeat(rptr[rows] - np.concatenate([[0], np.cumsum(nr)[:-1]]), nr) + np.arange(int(nr.sum()))
    pidx = np.repeat(pptr[rows] - np.concatenate([[0], np.cumsum(np_)[:-1]]), np_) + np.arange(int(np_.sum()))
    fpos, fcol = pairs_from_ranges(np.repeat(np.arange(len(rows)), nr), blocks.range_start[ridx],
                                   blocks.range_end[ridx] - 1)
    pos = np.concatenate([fpos, np.repeat(np.arange(len(rows)), np_)])
    col = np.concatenate([fcol, blocks.part_cols[pidx]])
    full = np.concatenate([np.ones(len(fpos), bool), np.zeros(len(pidx), bool)])
    order = np.lexsort((col, pos))
    return pos[order], col[order], full[order]


def _affine(cols: np.ndarray) -> tuple[int, int] | None:
    """``(c0, step)`` when ``cols[r, j] == c0 + r * step + j`` for every entry, else None."""
    R, C = cols.shape
    if C > 1 and not (np.diff(cols, axis=1) == 1).all():
        return None
    first = cols[:, 0]
    step = int(first[1] - first[0]) if R > 1 else 1
    if step < 0 or (R > 1 and not (np.diff(first) == step).all()):
        return None
    return int(first[0]), step


@dataclass(frozen=True, eq=False)
class StepMask:
    """The additive mask (0 / -inf) of one step, kept only on block columns that need it.

    Attributes:
        runs: ``(j0, j1)`` ranges of block columns holding partial or padded blocks.
        biases: one ``[R, bm, (j1-j0)*bn]`` tensor per run.
        empty_rows: ``[R, bm]`` bool of query rows that see no key in the step, or None.
    """

    runs: tuple[tuple[int, int], ...]
    biases: tuple[torch.Tensor, ...]
    empty_rows: torch.Tensor | None

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.biases)

    def dense(self, num_cols: int, block_n: int) -> torch.Tensor:
        """The whole ``[R, bm, num_cols*block_n]`` additive mask (for stages that want it dense)."""
        R, bm, _ = self.biases[0].shape
        out = self.biases[0].new_zeros(R, bm, num_cols * block_n)
        for (j0, j1), bias in zip(self.runs, self.biases):
            out[:, :, j0 * block_n:j1 * block_n] = bias
        return out


# Step masks are cached per step while the total stays under a fixed budget (it never grows
# with L^2): opaque mask_mods, whose predicate runs as Python-level torch code, up to 256 MiB;
# traced predicates up to 64 MiB, past which they are evaluated per chunk when the step is
# processed (only its partial blocks). Rebuilding every mask on each call measured 1.5-3x
# slower for sliding_window(256) at L=4096, hence the small cache.
_MASK_CACHE_BYTES = 256 << 20
_TRACED_CACHE_BYTES = 64 << 20
_mask_cache: dict[tuple, StepMask] = {}
_mask_cache_used = [0]
_mask_chunks: dict[int, list[tuple]] = {}  # chunk id -> its cached keys
_MASK_LOCK = threading.RLock()  # a finalizer may run inside a locked block of the same thread


@functools.lru_cache(maxsize=256)
def _is_traced(blocks: Blocks2D) -> bool:
    g = blocks.geom
    return blocks.pattern.predicate(g.q_end, g.kv_len) is not None


def step_bias(blocks: Blocks2D, chunk: Chunk, step: Step, dtype, device) -> StepMask:
    """The step's :class:`StepMask`: evaluated on the step's partial blocks when the pattern is
    traced, cached (bounded) for opaque mask_mods."""
    key = (id(chunk), step.c0, dtype, str(device))
    cached = _mask_cache.get(key)
    if cached is not None:
        return cached
    g = blocks.geom
    # Built on the host and copied once: deciding runs and empty rows reads values, which on a
    # device tensor would be a host sync in the forward.
    m = _step_mask(blocks, chunk, step, "cpu")  # [R, bm, C*bn]
    R, C = len(chunk.rows), step.c1 - step.c0
    need = ~m.view(R, g.block_m, C, g.block_n).all(dim=3).all(dim=1).all(dim=0)  # [C] columns to mask
    runs = _runs(need.numpy())
    if sum(j1 - j0 for j0, j1 in runs) * 2 > C:  # mostly masked: one run is cheaper than many
        runs = [(0, C)]
    bn = g.block_n
    biases = tuple(torch.zeros(R, g.block_m, (j1 - j0) * bn, dtype=dtype)
                   .masked_fill_(~m[:, :, j0 * bn:j1 * bn], NEG_INF).to(device) for j0, j1 in runs)
    empty = ~m.any(dim=-1)
    sm = StepMask(tuple(runs), biases, empty.to(device) if bool(empty.any()) else None)
    budget = _TRACED_CACHE_BYTES if _is_traced(blocks) else _MASK_CACHE_BYTES
    with _MASK_LOCK:  # head slices may build the same step in parallel threads (codegen.pytorch.threads)
        if key not in _mask_cache and _mask_cache_used[0] + sm.nbytes() <= budget:
            if key[0] not in _mask_chunks:  # first entry of this chunk: forget its entries with it
                _mask_chunks[key[0]] = []
                weakref.finalize(chunk, _forget_chunk, key[0])
            _mask_chunks[key[0]].append(key)
            _mask_cache[key] = sm
            _mask_cache_used[0] += sm.nbytes()
    return sm


def _runs(flags) -> list[tuple[int, int]]:
    """Maximal ``[j0, j1)`` ranges where ``flags`` is true."""
    out, j = [], 0
    while j < len(flags):
        if flags[j]:
            j0 = j
            while j < len(flags) and flags[j]:
                j += 1
            out.append((j0, j))
        else:
            j += 1
    return out


def _forget_chunk(chunk_id: int) -> None:
    with _MASK_LOCK:
        for key in _mask_chunks.pop(chunk_id, ()):
            sm = _mask_cache.pop(key, None)
            if sm is not None:
                _mask_cache_used[0] -= sm.nbytes()


def _step_mask(blocks: Blocks2D, chunk: Chunk, step: Step, device) -> torch.Tensor:
    """``[R, bm, C*bn]`` bool: full blocks True, partial blocks from the predicate, padding False."""
    g = blocks.geom
    R, C = len(chunk.rows), step.c1 - step.c0
    cols = chunk.step_cols(step)  # [R, C]
    m = torch.from_numpy(chunk.step_full(step)).to(device)[:, None, :, None].expand(R, g.block_m, C, g.block_n)
    m = m.contiguous()
    if len(step.partial_r):
        pr, pc = step.partial_r.numpy(), step.partial_c.numpy()
        q = torch.from_numpy(g.q_lo(chunk.rows[pr]))[:, None] + torch.arange(g.block_m)  # [P, bm] positions
        k = torch.from_numpy(cols[pr, pc] * g.block_n)[:, None] + torch.arange(g.block_n)
        em = blocks.pattern.evaluate(0, 0, q.clamp_max(g.q_end - 1)[:, :, None],
                                     k.clamp_max(g.kv_len - 1)[:, None, :], g.q_end, g.kv_len)  # [P, bm, bn]
        m.permute(0, 2, 1, 3)[step.partial_r.to(device), step.partial_c.to(device)] = em.to(device)
    m = m.view(R, g.block_m, C * g.block_n)
    if g.kv_len % g.block_n:
        k_pos = (torch.from_numpy(cols) * g.block_n)[:, :, None] + torch.arange(g.block_n)
        m &= (k_pos.view(R, 1, C * g.block_n) < g.kv_len).to(device)
    return m
