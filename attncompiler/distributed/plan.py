"""Sparsity-aware distribution plans: who needs which key shard, bytes moved, blocks computed.

The plan is computed from the pattern's block layout only (no tensors, no processes), so
``attnc plan`` can print it for any L and world size. Sequence-parallel ("ring") mode splits
the sequence into ``P`` contiguous shards; query shard ``i`` needs key shard ``j`` when some
non-empty layout block overlaps both, and then only needs the key range ``key_range[i, j]``
covered by those blocks (a sliding window needs a window-wide strip of each neighbour). At
ring step ``s`` (1..P-1) rank ``r`` sends to rank ``(r + s) % P`` only the key/value rows that
rank needs, if any; the dense ring sends the whole shard at every step. Head-parallel
("heads") mode needs no key exchange; only the optional output gather moves bytes. The
backward pass mirrors the forward exchange (gradients of the received shards go back to
their owners), so it moves the same bytes again.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from ..errors import LayoutError, UnsupportedError

MODES = ("ring", "heads")


def require_mask_family(pattern, what: str = "distributed attention") -> None:
    """Raise :class:`UnsupportedError` for structural families (Combiner, Diffuser, ABC, ...)."""
    fam = str(getattr(pattern, "family", "mask"))
    if fam.lower().split(".")[-1] != "mask":
        raise UnsupportedError(
            f"{what} supports mask patterns only, got a {fam!r} pattern {pattern!r}; distributing it would "
            f"need a per-shard lowering of the {fam} family (its summaries/state exchanged between ranks), "
            "which is not implemented")


def shard_bounds(seq_len: int, world_size: int) -> tuple[int, ...]:
    """Contiguous shard boundaries ``b[0]=0 < ... < b[P]=L``; sizes differ by at most one."""
    for name, v in (("seq_len", seq_len), ("world_size", world_size)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
            raise LayoutError(f"{name}={v!r} must be a positive integer")
    if world_size > seq_len:
        raise LayoutError(f"world_size={world_size} exceeds seq_len={seq_len}; every rank needs at least one token")
    return tuple(r * seq_len // world_size for r in range(world_size + 1))


@dataclass(frozen=True)
class RankPlan:
    """One rank's share of the work (forward pass; backward moves the same bytes back)."""

    rank: int
    q_range: tuple[int, int]
    needs: tuple[int, ...]        # key shards this rank's queries attend to
    bytes_sent: int
    bytes_recv: int
    dense_bytes_sent: int
    dense_bytes_recv: int
    blocks_computed: int


@dataclass(frozen=True)
class DistributedPlan:
    """A distribution plan (ring mode: ``need[i, j]``: query shard i needs keys of shard j, namely the
    global key range ``key_range[i, j] = (lo, hi)``; ``pair_bytes[i, j]``: bytes of those rows)."""

    pattern: object
    mode: str
    seq_len: int
    world_size: int
    bounds: tuple[int, ...]
    need: np.ndarray
    ranks: tuple[RankPlan, ...]
    block: int
    shard_bytes: tuple[int, ...]
    key_range: np.ndarray
    pair_bytes: np.ndarray

    @property
    def total_bytes(self) -> int:
        return sum(r.bytes_sent for r in self.ranks)

    @property
    def dense_total_bytes(self) -> int:
        return sum(r.dense_bytes_sent for r in self.ranks)

    def sends(self, rank: int) -> list[tuple[int, int]]:
        """``(step, destination)`` of each key/value shard this rank sends, in ring order."""
        P = self.world_size
        return [(s, (rank + s) % P) for s in range(1, P) if self.need[(rank + s) % P, rank]]

    def recvs(self, rank: int) -> list[tuple[int, int]]:
        """``(step, source)`` of each key/value shard this rank receives, in ring order."""
        P = self.world_size
        return [(s, (rank - s) % P) for s in range(1, P) if self.need[rank, (rank - s) % P]]


def dense_plan(plan: DistributedPlan) -> DistributedPlan:
    """The same sharding with a dense ring: every rank receives every other shard whole.

    Used as the baseline whose bytes the sparsity-aware plan is measured against.
    """
    P, b = plan.world_size, np.asarray(plan.bounds)
    key_range = np.stack(np.broadcast_arrays(b[None, :-1], b[None, 1:]), axis=-1).repeat(P, axis=0)  # [P, P, 2]
    pair_bytes = np.broadcast_to(np.asarray(plan.shard_bytes)[None, :], (P, P)).copy()
    ranks = tuple(dataclasses.replace(r, needs=tuple(range(P)), bytes_sent=r.dense_bytes_sent,
                                      bytes_recv=r.dense_bytes_recv) for r in plan.ranks)
    return dataclasses.replace(plan, need=np.ones((P, P), dtype=bool), key_range=key_range,
                               pair_bytes=pair_bytes, ranks=ranks)


def _shard_of(bounds: np.ndarray, idx: np.ndarray) -> np.ndarray:
    return np.searchsorted(bounds, idx, side="right") - 1


def _refine_straddling(grp, g, b_arr, lo, hi, which, q0, q1, k0, k1) -> None:
    """Widen key ranges for blocks that straddle shard boundaries, evaluating only undecided pieces."""
    import torch

    for i in which:
        r, c = int(grp.rows[i]), int(grp.cols[i])
        for qi in {int(q0[i]), int(q1[i])}:
            for kj in {int(k0[i]), int(k1[i])}:
                qa, qb = max(g.q_lo(r), b_arr[qi]), min(g.q_hi(r) + 1, b_arr[qi + 1])
                ka, kb = max(g.k_lo(c), b_arr[kj]), min(g.k_hi(c) + 1, b_arr[kj + 1])
                if lo[qi, kj] <= ka and hi[qi, kj] >= kb:
                    continue  # already covered
                q = torch.arange(qa, qb)[:, None]  # [bm', 1]
                k = torch.arange(ka, kb)[None, :]  # [1, bn']
                if bool(grp.pattern.evaluate(0, 0, q, k, g.q_len, g.kv_len).any()):
                    lo[qi, kj] = min(lo[qi, kj], ka)
                    hi[qi, kj] = max(hi[qi, kj], kb)


def plan_attention(pattern, seq_len: int, world_size: int, mode: str = "ring", *, batch: int = 1,
                   heads: int = 1, kv_heads: int | None = None, head_dim: int = 64, elem_bytes: int = 4,
                   block: int | None = None, gather: bool = False) -> DistributedPlan:
    """Plan distributed attention of ``pattern`` over ``world_size`` ranks without running it.

    Args:
        pattern: a mask pattern (other families raise :class:`UnsupportedError`).
        seq_len: total sequence length L (need not be divisible by ``world_size``).
        world_size: number of ranks P.
        mode: ``"ring"`` (sequence-parallel) or ``"heads"`` (head-parallel).
        batch, heads, kv_heads, head_dim, elem_bytes: tensor sizes for byte counts.
        block: layout block size used to decide shard needs (default: keeps <= ~2048 blocks per
            side, at least 64 and at most the smallest shard); coarser blocks may over-approximate
            needs, never miss one.
        gather: head mode only: whether the output heads are all-gathered.

    Returns:
        A :class:`DistributedPlan` with per-rank bytes sent/received and blocks computed.
    """
    from ..layout import build_layout

    require_mask_family(pattern, "distributed attention planning")
    if mode not in MODES:
        raise UnsupportedError(f"mode={mode!r} is not supported; choose one of {MODES}")
    bounds = shard_bounds(seq_len, world_size)
    P, L = world_size, seq_len
    kvh = heads if kv_heads is None else kv_heads
    min_shard = min(b - a for a, b in zip(bounds, bounds[1:]))
    if block is None:
        block = max(64, -(-L // 2048))
        # prefer a block size that divides every shard boundary: then no block straddles two shards
        gcd = int(np.gcd.reduce(np.asarray(bounds[1:], dtype=np.int64)))
        aligned = [d for d in range(min(block, gcd), 0, -1) if gcd % d == 0 and d * 4 >= block]
        if aligned:
            block = aligned[0]
    block = max(1, min(int(block), min_shard))
    layout = build_layout(pattern, L, L, block, block, batch=batch, heads=heads)
    g = layout.geom
    b_arr = np.asarray(bounds)
    lo = np.full((P, P), L, dtype=np.int64)
    hi = np.zeros((P, P), dtype=np.int64)
    for grp in layout.groups:
        rows, cols = grp.rows, grp.cols
        if len(rows) == 0:
            continue
        q0, q1 = _shard_of(b_arr, g.q_lo(rows)), _shard_of(b_arr, g.q_hi(rows))
        k0, k1 = _shard_of(b_arr, g.k_lo(cols)), _shard_of(b_arr, g.k_hi(cols))
        # block <= smallest shard, so a block spans at most two shards per side
        whole = (q0 == q1) & (k0 == k1)
        np.minimum.at(lo, (q0[whole], k0[whole]), g.k_lo(cols[whole]))
        np.maximum.at(hi, (q0[whole], k0[whole]), g.k_hi(cols[whole]) + 1)
        _refine_straddling(grp, g, b_arr, lo, hi, np.flatnonzero(~whole), q0, q1, k0, k1)
    need = hi > lo
    lo, hi = np.where(need, lo, 0), np.where(need, hi, 0)
    row_bytes = batch * kvh * 2 * head_dim * elem_bytes  # one key + value row, all heads
    pair_bytes = (hi - lo) * row_bytes
    sizes = np.diff(b_arr)
    shard_bytes = tuple(int(batch * kvh * n * 2 * head_dim * elem_bytes) for n in sizes)
    gi = layout.group_index
    ranks = []
    if mode == "ring":
        # blocks computed by rank r: layout blocks whose query block starts in r's shard
        blocks = np.zeros(P, dtype=np.int64)
        for idx in gi.reshape(-1):
            grp = layout.groups[idx]
            blocks += np.bincount(_shard_of(b_arr, g.q_lo(grp.rows)), minlength=P)[:P]
        if gi.size < batch * heads:  # pattern shared over batch/heads: count every (b, h)
            blocks *= (batch * heads) // gi.size
        for r in range(P):
            sent = int(sum(pair_bytes[i, r] for i in range(P) if i != r))
            recv = int(sum(pair_bytes[r, j] for j in range(P) if j != r))
            dense = shard_bytes[r] * (P - 1)
            dense_recv = sum(shard_bytes[j] for j in range(P) if j != r)
            ranks.append(RankPlan(r, (bounds[r], bounds[r + 1]), tuple(np.flatnonzero(need[r]).tolist()),
                                  sent, recv, dense, dense_recv, int(blocks[r])))
    else:
        if heads < P:
            raise LayoutError(f"head-parallel mode needs heads >= world_size, got heads={heads}, world_size={P}")
        hb = shard_bounds(heads, P)
        for r in range(P):
            blocks = sum(layout.group_for(b, h).num_blocks for b in range(batch) for h in range(hb[r], hb[r + 1]))
            out_bytes = batch * -(-heads // P) * L * head_dim * elem_bytes  # padded equal chunks
            sent = out_bytes * (P - 1) if gather else 0
            ranks.append(RankPlan(r, (0, L), tuple(range(P)), sent, sent, sent, sent, int(blocks)))
        need = np.ones((P, P), dtype=bool)
    key_range = np.stack([lo, hi], axis=-1)  # [P, P, 2]
    return DistributedPlan(pattern, mode, L, P, bounds, need, tuple(ranks), block, shard_bytes, key_range,
                           pair_bytes)


def format_plan(plan: DistributedPlan) -> str:
    """A human-readable table of the plan (what ``attnc plan`` prints)."""
    lines = [f"pattern {plan.pattern!r}  L={plan.seq_len}  world_size={plan.world_size}  mode={plan.mode}  "
             f"(need block {plan.block})",
             f"{'rank':>4} {'queries':>23} {'key shards needed':>24} {'sent':>12} {'recv':>12} "
             f"{'dense sent':>12} {'blocks':>10}"]
    for r in plan.ranks:
        needs = ",".join(map(str, r.needs)) if len(r.needs) <= 8 else f"{len(r.needs)} shards"
        lines.append(f"{r.rank:>4} {f'[{r.q_range[0]}, {r.q_range[1]})':>23} {needs:>24} {_fmt(r.bytes_sent):>12} "
                     f"{_fmt(r.bytes_recv):>12} {_fmt(r.dense_bytes_sent):>12} {r.blocks_computed:>10}")
    tot, dense = plan.total_bytes, plan.dense_total_bytes
    ratio = f"{dense / tot:.2f}x fewer" if tot else "no communication"
    lines.append(f"total forward bytes {_fmt(tot)} vs dense ring {_fmt(dense)} ({ratio}); "
                 "backward moves the same again")
    return "\n".join(lines)


def _fmt(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
