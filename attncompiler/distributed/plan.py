"""Sparsity-aware distribution plans: sharding, ring routes, bytes moved, blocks computed per rank.

The plan is computed from the pattern's block layout only (no tensors, no processes), so
``attnc plan`` can print it for any L and world size. Sequence-parallel ("ring") mode:

* the sequence is split by a :class:`~attncompiler.distributed.sharding.Sharding`
  (contiguous, zigzag or striped); ``sharding="auto"`` picks the one whose busiest rank
  computes the fewest layout blocks, preferring contiguous (fewest bytes) unless another cuts
  the busiest rank's work by more than 10%;
* ``need[i, j]``: rank i's queries attend to keys held by rank j, namely the *local* key rows
  ``key_range[i, j] = (lo, hi)`` of rank j;
* the bidirectional ring routes (:mod:`~attncompiler.distributed.routes`) carry each shard
  only as far, and only the rows, that some rank ahead still needs; ``bytes_sent`` is exactly
  what the ring hands to torch.distributed in the forward pass (backward: ``bytes_recv``).

Head-parallel ("heads") mode needs no key exchange; only the optional output gather moves bytes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from ..errors import LayoutError, UnsupportedError
from .needs import chunk_blocks, chunk_needs, chunk_of
from .routes import SIGN, dense_routes, route_bytes, sparse_routes
from .sharding import DEFAULT_STRIPES, KINDS, Sharding, make_sharding, shard_bounds

MODES = ("ring", "heads")
SHARDINGS = KINDS + ("auto",)
AUTO_GAIN = 0.9  # leave contiguous only if the busiest rank's blocks drop below this fraction


def require_mask_family(pattern, what: str = "distributed attention") -> None:
    """Raise :class:`UnsupportedError` for structural families (Combiner, Diffuser, ABC, ...)."""
    fam = str(getattr(pattern, "family", "mask"))
    if fam.lower().split(".")[-1] != "mask":
        raise UnsupportedError(
            f"{what} supports mask patterns only, got a {fam!r} pattern {pattern!r}; distributing it would "
            f"need a per-shard lowering of the {fam} family (its summaries/state exchanged between ranks), "
            "which is not implemented")


@dataclass(frozen=True)
class RankPlan:
    """One rank's share of the work (forward pass; backward sends ``bytes_recv`` back)."""

    rank: int
    segments: tuple[tuple[int, int], ...]  # global query/key ranges held, in local order
    needs: tuple[int, ...]        # ranks whose keys this rank's queries attend to
    bytes_sent: int
    bytes_recv: int
    dense_bytes_sent: int
    dense_bytes_recv: int
    blocks_computed: int

    @property
    def q_range(self) -> tuple[int, int]:
        """First and last global position held (the shard itself when sharding is contiguous)."""
        return self.segments[0][0], self.segments[-1][1]


@dataclass(frozen=True)
class ShardingSummary:
    """Load balance and bytes of one sharding candidate (what ``auto`` chose from)."""

    kind: str
    blocks: tuple[int, ...]
    total_bytes: int

    @property
    def imbalance(self) -> float:
        """Busiest rank's blocks over the mean (1.0: perfectly balanced)."""
        mean = sum(self.blocks) / len(self.blocks)
        return max(self.blocks) / mean if mean else 1.0


@dataclass(frozen=True)
class DistributedPlan:
    """A distribution plan. Ring mode: ``need``/``key_range`` [P, P(, 2)] in the key owner's local
    rows, ``pair_bytes[i, j]`` the bytes of those rows, ``hops`` [P, 2] and ``hop_range`` [P, 2, P, 2]
    the ring routes (direction 0 forward, 1 backward)."""

    pattern: object
    mode: str
    seq_len: int
    world_size: int
    sharding: Sharding
    need: np.ndarray
    ranks: tuple[RankPlan, ...]
    block: int
    shard_bytes: tuple[int, ...]
    key_range: np.ndarray
    pair_bytes: np.ndarray
    row_bytes: int
    hops: np.ndarray
    hop_range: np.ndarray
    alternatives: tuple[ShardingSummary, ...] = ()

    @property
    def total_bytes(self) -> int:
        return sum(r.bytes_sent for r in self.ranks)

    @property
    def dense_total_bytes(self) -> int:
        return sum(r.dense_bytes_sent for r in self.ranks)

    @property
    def imbalance(self) -> float:
        """Busiest rank's computed blocks over the mean."""
        return ShardingSummary(self.sharding.kind, tuple(r.blocks_computed for r in self.ranks), 0).imbalance

    @property
    def steps(self) -> int:
        """Ring steps (the longest route in either direction)."""
        return int(self.hops.max()) if self.hops.size else 0

    def send(self, rank: int, step: int, d: int):
        """``(origin, lo, hi)``: the rows of shard ``origin`` that ``rank`` sends at ``step`` in direction ``d``."""
        o = (rank - SIGN[d] * (step - 1)) % self.world_size
        if self.hops[o, d] < step:
            return None
        return o, int(self.hop_range[o, d, step, 0]), int(self.hop_range[o, d, step, 1])

    def recv(self, rank: int, step: int, d: int):
        """``(origin, lo, hi)``: the rows of shard ``origin`` that ``rank`` receives at ``step`` in direction ``d``."""
        o = (rank - SIGN[d] * step) % self.world_size
        if self.hops[o, d] < step:
            return None
        return o, int(self.hop_range[o, d, step, 0]), int(self.hop_range[o, d, step, 1])


def dense_plan(plan: DistributedPlan) -> DistributedPlan:
    """The same sharding and computation with the dense ring's routes (every shard whole, P-1 hops).

    The baseline whose bytes the sparsity-aware plan is measured against.
    """
    sizes = [plan.sharding.local_len(r) for r in range(plan.world_size)]
    hops, hop_range = dense_routes(sizes)
    ranks = tuple(dataclasses.replace(r, bytes_sent=r.dense_bytes_sent, bytes_recv=r.dense_bytes_recv)
                  for r in plan.ranks)
    return dataclasses.replace(plan, hops=hops, hop_range=hop_range, ranks=ranks)


def _default_block(L: int, bounds_list) -> int:
    """A layout block of about L/2048 (>= 64) that divides every chunk boundary if possible."""
    block = max(64, -(-L // 2048))
    gcd = int(np.gcd.reduce(np.concatenate([np.asarray(b[1:], dtype=np.int64) for b in bounds_list])))
    aligned = [d for d in range(min(block, gcd), 0, -1) if gcd % d == 0 and d * 4 >= block]
    return aligned[0] if aligned else block


def _rank_needs(sharding: Sharding, fine: np.ndarray, lo: np.ndarray, hi: np.ndarray):
    """Aggregate fine-chunk needs (global rows) into rank needs (local rows of the key owner)."""
    P = sharding.world_size
    cb = np.asarray(sharding.chunk_bounds)
    coarse = chunk_of(cb, fine[:-1])  # coarse chunk of each fine chunk
    owner = np.asarray(sharding.chunk_owner)[coarse]
    shift = sharding.chunk_local_start()[coarse] - cb[coarse]  # global -> local row, per fine chunk
    qi, kj = np.nonzero(hi > lo)
    rlo = np.full((P, P), np.iinfo(np.int64).max, dtype=np.int64)
    rhi = np.zeros((P, P), dtype=np.int64)
    np.minimum.at(rlo, (owner[qi], owner[kj]), lo[qi, kj] + shift[kj])
    np.maximum.at(rhi, (owner[qi], owner[kj]), hi[qi, kj] + shift[kj])
    need = rhi > 0
    key_range = np.stack([np.where(need, rlo, 0), np.where(need, rhi, 0)], axis=-1)  # [P, P, 2]
    return need, key_range, owner


def plan_attention(pattern, seq_len: int, world_size: int, mode: str = "ring", *, batch: int = 1,
                   heads: int = 1, kv_heads: int | None = None, head_dim: int = 64, elem_bytes: int = 4,
                   block: int | None = None, gather: bool = False, sharding: str = "contiguous",
                   stripes: int = DEFAULT_STRIPES) -> DistributedPlan:
    """Plan distributed attention of ``pattern`` over ``world_size`` ranks without running it.

    Args:
        pattern: a mask pattern (other families raise :class:`UnsupportedError`).
        seq_len: total sequence length L (need not be divisible by ``world_size``).
        world_size: number of ranks P.
        mode: ``"ring"`` (sequence-parallel) or ``"heads"`` (head-parallel).
        batch, heads, kv_heads, head_dim, elem_bytes: tensor sizes for byte counts.
        block: layout block size used to decide needs (default: about L/2048, at least 64, at most
            the smallest chunk); coarser blocks may over-approximate needs, never miss one.
        gather: head mode only: whether the output heads are all-gathered.
        sharding: ring mode: "contiguous", "zigzag", "striped" or "auto" (see the module doc).
        stripes: chunks per rank of the striped sharding.

    Returns:
        A :class:`DistributedPlan` with per-rank bytes sent/received and blocks computed.
    """
    from ..layout import build_layout

    require_mask_family(pattern, "distributed attention planning")
    if mode not in MODES:
        raise UnsupportedError(f"mode={mode!r} is not supported; choose one of {MODES}")
    if sharding not in SHARDINGS:
        raise LayoutError(f"sharding={sharding!r} is not one of {SHARDINGS}")
    P, L = world_size, seq_len
    shard_bounds(L, P)  # validates
    kinds = [sharding] if sharding != "auto" else [k for k in KINDS if k != "striped" or P * stripes <= L]
    if mode == "heads":
        kinds = ["contiguous"]
    cands = {k: make_sharding(k, L, P, stripes=stripes) for k in kinds}
    # one fine chunk grid refining every candidate's chunks: shard_bounds(L, n*m)[m*i] == shard_bounds(L, n)[i]
    n_fine = int(np.lcm.reduce([len(s.chunk_owner) for s in cands.values()]))
    fine = np.asarray(shard_bounds(L, n_fine)) if n_fine <= L else None
    if fine is None:
        raise LayoutError(f"L={L} is too short for sharding={sharding!r} over {P} ranks")
    if block is None:
        block = _default_block(L, [fine])
    block = max(1, min(int(block), int(np.diff(fine).min())))
    layout = build_layout(pattern, L, L, block, block, batch=batch, heads=heads)
    kvh = heads if kv_heads is None else kv_heads
    row_bytes = batch * kvh * 2 * head_dim * elem_bytes  # one key + value row, all kv heads
    if mode == "heads":
        return _heads_plan(pattern, layout, cands["contiguous"], block, heads, batch, head_dim, elem_bytes,
                           gather, row_bytes)
    lo, hi = chunk_needs(layout, fine)
    fine_blocks = chunk_blocks(layout, fine, batch, heads)
    plans = {k: _ring_plan(pattern, s, fine, lo, hi, fine_blocks, block, row_bytes) for k, s in cands.items()}
    summaries = tuple(ShardingSummary(k, tuple(r.blocks_computed for r in p.ranks), p.total_bytes)
                      for k, p in plans.items())
    best = plans[kinds[0]]
    if sharding == "auto":
        worst = {s.kind: max(s.blocks) for s in summaries}
        bal = [p for k, p in plans.items() if k != "contiguous" and worst[k] < AUTO_GAIN * worst["contiguous"]]
        if bal:
            best = min(bal, key=lambda p: (max(r.blocks_computed for r in p.ranks), p.total_bytes))
    return dataclasses.replace(best, alternatives=summaries)


def _ring_plan(pattern, sharding, fine, lo, hi, fine_blocks, block, row_bytes) -> DistributedPlan:
    P = sharding.world_size
    need, key_range, owner = _rank_needs(sharding, fine, lo, hi)
    sizes = [sharding.local_len(r) for r in range(P)]
    pair_bytes = (key_range[..., 1] - key_range[..., 0]) * row_bytes
    hops, hop_range = sparse_routes(need, key_range, sizes)
    sent, recv = route_bytes(hops, hop_range, row_bytes)
    dsent, drecv = route_bytes(*dense_routes(sizes), row_bytes)
    blocks = np.bincount(owner, weights=fine_blocks, minlength=P).astype(np.int64)
    ranks = tuple(RankPlan(r, tuple((a, b) for a, b, _ in sharding.segments(r)),
                           tuple(np.flatnonzero(need[r]).tolist()), int(sent[r]), int(recv[r]), int(dsent[r]),
                           int(drecv[r]), int(blocks[r])) for r in range(P))
    return DistributedPlan(pattern, "ring", sharding.seq_len, P, sharding, need, ranks, block,
                           tuple(n * row_bytes for n in sizes), key_range, pair_bytes, row_bytes, hops, hop_range)


def _heads_plan(pattern, layout, sharding, block, heads, batch, head_dim, elem_bytes, gather, row_bytes):
    P, L = sharding.world_size, sharding.seq_len
    if heads < P:
        raise LayoutError(f"head-parallel mode needs heads >= world_size, got heads={heads}, world_size={P}")
    hb = shard_bounds(heads, P)
    ranks = []
    for r in range(P):
        blocks = sum(layout.group_for(b, h).num_blocks for b in range(batch) for h in range(hb[r], hb[r + 1]))
        out_bytes = batch * -(-heads // P) * L * head_dim * elem_bytes  # padded equal chunks
        sent = out_bytes * (P - 1) if gather else 0
        ranks.append(RankPlan(r, ((0, L),), tuple(range(P)), sent, sent, sent, sent, int(blocks)))
    need = np.ones((P, P), dtype=bool)
    zeros = np.zeros((P, P, 2), dtype=np.int64)
    return DistributedPlan(pattern, "heads", L, P, sharding, need, tuple(ranks), block, (0,) * P, zeros,
                           np.zeros((P, P), dtype=np.int64), row_bytes, np.zeros((P, 2), dtype=np.int64),
                           np.zeros((P, 2, P, 2), dtype=np.int64))


def format_plan(plan: DistributedPlan) -> str:
    """A human-readable table of the plan (what ``attnc plan`` prints)."""
    lines = [f"pattern {plan.pattern!r}  L={plan.seq_len}  world_size={plan.world_size}  mode={plan.mode}  "
             f"sharding={plan.sharding.kind}  (need block {plan.block})",
             f"{'rank':>4} {'tokens':>23} {'key shards needed':>24} {'sent':>12} {'recv':>12} "
             f"{'dense sent':>12} {'blocks':>10}"]
    for r in plan.ranks:
        needs = ",".join(map(str, r.needs)) if len(r.needs) <= 8 else f"{len(r.needs)} shards"
        segs = " ".join(f"[{a}, {b})" for a, b in r.segments) if len(r.segments) <= 2 else \
            f"{len(r.segments)} chunks from {r.segments[0][0]}"
        lines.append(f"{r.rank:>4} {segs:>23} {needs:>24} {_fmt(r.bytes_sent):>12} "
                     f"{_fmt(r.bytes_recv):>12} {_fmt(r.dense_bytes_sent):>12} {r.blocks_computed:>10}")
    tot, dense = plan.total_bytes, plan.dense_total_bytes
    ratio = f"{dense / tot:.2f}x fewer" if tot else "no communication"
    lines.append(f"total forward bytes {_fmt(tot)} vs dense ring {_fmt(dense)} ({ratio}); "
                 f"backward moves the same again; ring steps {plan.steps}; "
                 f"blocks imbalance (max/mean) {plan.imbalance:.2f}")
    for s in plan.alternatives if len(plan.alternatives) > 1 else ():
        lines.append(f"  sharding {s.kind:<10} imbalance {s.imbalance:.2f}  busiest rank {max(s.blocks)} blocks  "
                     f"bytes {_fmt(s.total_bytes)}" + ("  <- chosen" if s.kind == plan.sharding.kind else ""))
    return "\n".join(lines)


def _fmt(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
