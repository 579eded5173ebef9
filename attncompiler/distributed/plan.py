"""Sparsity-aware distribution plans: sharding, ring routes, bytes moved, blocks computed per rank.

The plan is computed from the pattern's block layout only (no tensors, no processes), so
``attnc plan`` can print it for any L and world size. Sequence-parallel ("ring") mode:

* the sequence is split by a :class:`~attncompiler.distributed.sharding.Sharding`
  (contiguous, zigzag or striped); ``sharding="auto"`` picks the one whose busiest rank
  computes the fewest layout blocks, preferring contiguous (fewest bytes) unless another cuts
  the busiest rank's work by more than 10%;
* ``need[i, j]``: rank i's queries attend to keys held by rank j, namely the *local* key rows
  ``key_pieces[i][j]`` of rank j (a few disjoint intervals; ``key_range[i, j]`` is their hull);
* the bidirectional ring routes (:mod:`~attncompiler.distributed.routes`) carry each shard
  only as far, and only the rows, that some rank ahead still needs;
* "dense" query rows (block rows attending to at least half of the keys, e.g. global query
  tokens) are, when that moves fewer bytes by this plan's own count, left out of the needs:
  their owner sends those few query rows to every rank holding keys they attend to, each
  computes a partial (out, lse) on its local keys and sends it back for an lse merge
  (backward: the owner sends out, d(out) and lse; the ranks send back partial dq);
* ``bytes_sent``/``bytes_recv`` are exactly what the ring hands to torch.distributed in the
  forward pass, ``backward_bytes_sent``/``backward_bytes_recv`` in the backward pass.

Head-parallel ("heads") mode needs no key exchange; only the optional output gather moves bytes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from ..errors import LayoutError, UnsupportedError
from .needs import chunk_blocks, chunk_needs, chunk_of, dense_block_rows, dense_chunk_needs, dense_row_intervals
from .pieces import clip, coarsen, hull, length, merge
from .routes import SIGN, dense_routes, hop_hulls, route_bytes, sparse_routes
from .sharding import DEFAULT_STRIPES, KINDS, Sharding, make_sharding, shard_bounds

MODES = ("ring", "heads")
SHARDINGS = KINDS + ("auto",)
AUTO_GAIN = 0.9  # leave contiguous only if the busiest rank's blocks drop below this fraction
DENSE_MAX_SHARE = 1 / 8  # by default, weigh the dense-row exchange only when its candidate rows are this few


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
    """One rank's share of the work and the bytes it hands to torch.distributed, per pass."""

    rank: int
    segments: tuple[tuple[int, int], ...]  # global query/key ranges held, in local order
    needs: tuple[int, ...]        # ranks whose keys this rank's queries attend to
    bytes_sent: int
    bytes_recv: int
    dense_bytes_sent: int
    dense_bytes_recv: int
    blocks_computed: int
    backward_bytes_sent: int = 0
    backward_bytes_recv: int = 0

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
    """A distribution plan. Ring mode: ``need`` [P, P], ``key_pieces[i][j]`` (hull ``key_range``
    [P, P, 2]) in the key owner's local rows, ``pair_bytes[i, j]`` the bytes of those rows, ``hops``
    [P, 2] and ``hop_pieces[o][d][t]`` (hull ``hop_range`` [P, 2, P, 2]) the ring routes (direction 0
    forward, 1 backward). ``dense_rows[o]``: ``(global_lo, global_hi, local_lo)`` query intervals of
    rank o served by the dense-row exchange; ``dense_need[o, j]``: they attend to keys of rank j."""

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
    key_pieces: tuple = ()
    hop_pieces: tuple = ()
    dense_rows: tuple = ()
    dense_need: np.ndarray | None = None
    q_row_bytes: int = 0      # one query (or dq) row, all heads
    part_row_bytes: int = 0   # forward: one partial output row and its lse
    grad_row_bytes: int = 0   # backward: one row of out, d(out) and lse

    @property
    def total_bytes(self) -> int:
        """Bytes sent in the forward pass, all ranks."""
        return sum(r.bytes_sent for r in self.ranks)

    @property
    def total_bytes_fwd_bwd(self) -> int:
        """Bytes sent in the forward and backward passes, all ranks."""
        return sum(r.bytes_sent + r.backward_bytes_sent for r in self.ranks)

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
        """``(origin, pieces)``: the rows of shard ``origin`` that ``rank`` sends at ``step`` in direction ``d``."""
        o = (rank - SIGN[d] * (step - 1)) % self.world_size
        if self.hops[o, d] < step:
            return None
        return o, self.hop_pieces[o][d][step]

    def recv(self, rank: int, step: int, d: int):
        """``(origin, pieces)``: the rows of shard ``origin`` that ``rank`` receives at ``step`` in direction ``d``."""
        o = (rank - SIGN[d] * step) % self.world_size
        if self.hops[o, d] < step:
            return None
        return o, self.hop_pieces[o][d][step]


def dense_plan(plan: DistributedPlan) -> DistributedPlan:
    """The dense ring on the same sharding: every rank needs every shard whole, which travels P-1 hops.

    The baseline whose bytes the sparsity-aware plan is measured against (no dense-row exchange;
    the sub-problems that are empty under the pattern are still skipped).
    """
    P = plan.world_size
    sizes = [plan.sharding.local_len(r) for r in range(P)]
    hops, hop_pieces = dense_routes(sizes)
    whole = tuple(tuple(((0, n),) for n in sizes) for _ in range(P))
    ranks = tuple(dataclasses.replace(r, bytes_sent=r.dense_bytes_sent, bytes_recv=r.dense_bytes_recv,
                                      backward_bytes_sent=r.dense_bytes_recv, backward_bytes_recv=r.dense_bytes_sent)
                  for r in plan.ranks)
    key_range = np.zeros((P, P, 2), dtype=np.int64)
    key_range[..., 1] = np.asarray(sizes)[None, :]
    return dataclasses.replace(plan, hops=hops, hop_pieces=hop_pieces, hop_range=hop_hulls(hops, hop_pieces),
                               ranks=ranks, need=np.ones((P, P), dtype=bool), key_pieces=whole, key_range=key_range,
                               pair_bytes=key_range[..., 1] * plan.row_bytes, dense_rows=((),) * P,
                               dense_need=np.zeros((P, P), dtype=bool))


def _default_block(L: int, bounds_list) -> int:
    """A layout block of about L/2048 (>= 64) that divides every chunk boundary if possible."""
    block = max(64, -(-L // 2048))
    gcd = int(np.gcd.reduce(np.concatenate([np.asarray(b[1:], dtype=np.int64) for b in bounds_list])))
    aligned = [d for d in range(min(block, gcd), 0, -1) if gcd % d == 0 and d * 4 >= block]
    return aligned[0] if aligned else block


def _rank_needs(sharding: Sharding, fine: np.ndarray, needs: dict):
    """Aggregate fine-chunk needs (global rows) into rank needs (pieces in local rows of the key owner)."""
    P = sharding.world_size
    cb = np.asarray(sharding.chunk_bounds)
    coarse = chunk_of(cb, fine[:-1])  # coarse chunk of each fine chunk
    owner = np.asarray(sharding.chunk_owner)[coarse]
    shift = sharding.chunk_local_start()[coarse] - cb[coarse]  # global -> local row, per fine chunk
    acc: dict = {}
    for (a, b), ps in needs.items():
        acc.setdefault((int(owner[a]), int(owner[b])), []).extend((lo + shift[b], hi + shift[b]) for lo, hi in ps)
    key_pieces = [[() for _ in range(P)] for _ in range(P)]
    need = np.zeros((P, P), dtype=bool)
    key_range = np.zeros((P, P, 2), dtype=np.int64)
    for (i, j), ivs in acc.items():
        ps = coarsen(merge(ivs))
        if ps:
            key_pieces[i][j], need[i, j], key_range[i, j] = ps, True, hull(ps)
    return need, key_range, tuple(tuple(row) for row in key_pieces), owner


def plan_attention(pattern, seq_len: int, world_size: int, mode: str = "ring", *, batch: int = 1,
                   heads: int = 1, kv_heads: int | None = None, head_dim: int = 64, elem_bytes: int = 4,
                   block: int | None = None, gather: bool = False, sharding: str = "contiguous",
                   stripes: int = DEFAULT_STRIPES, value_dim: int | None = None,
                   dense_rows: bool | None = None) -> DistributedPlan:
    """Plan distributed attention of ``pattern`` over ``world_size`` ranks without running it.

    Args:
        pattern: a mask pattern (other families raise :class:`UnsupportedError`).
        seq_len: total sequence length L (need not be divisible by ``world_size``).
        world_size: number of ranks P.
        mode: ``"ring"`` (sequence-parallel) or ``"heads"`` (head-parallel).
        batch, heads, kv_heads, head_dim, elem_bytes: tensor sizes for byte counts (``head_dim``: of
            queries and keys; ``value_dim``: of values, default ``head_dim``).
        block: layout block size used to decide needs (default: about L/2048, at least 64, at most
            the smallest chunk); coarser blocks may over-approximate needs, never miss one.
        gather: head mode only: whether the output heads are all-gathered.
        sharding: ring mode: "contiguous", "zigzag", "striped" or "auto" (see the module doc).
        stripes: chunks per rank of the striped sharding.
        dense_rows: serve query rows that attend to at least half of the keys by the dense-row
            exchange (module doc): None (default) when that moves fewer bytes (forward + backward)
            and such rows are at most 1/8 of the sequence, True always when there are such rows,
            False never.

    Returns:
        A :class:`DistributedPlan` with per-rank bytes sent/received and blocks computed.
    """
    from ..layout.block_layout import build_layout

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
    dv = head_dim if value_dim is None else value_dim
    row_bytes = batch * kvh * (head_dim + dv) * elem_bytes  # one key + value row, all kv heads
    if mode == "heads":
        return _heads_plan(pattern, layout, cands["contiguous"], block, heads, batch, head_dim, elem_bytes,
                           gather, row_bytes)
    stat = max(elem_bytes, 4)  # lse is float32 (float64 for float64 inputs)
    sizes = dict(row=row_bytes, q=batch * heads * head_dim * elem_bytes, part=batch * heads * (dv * elem_bytes + stat),
                 grad=batch * heads * (2 * dv * elem_bytes + stat))
    variants = [(chunk_needs(layout, fine), chunk_blocks(layout, fine, batch, heads), ())]
    cand = dense_block_rows(layout) if dense_rows is not False else None
    if cand is not None and not dense_rows and int(cand.sum()) * block > DENSE_MAX_SHARE * L:
        cand = None  # many wide rows (causal): the ring wins, and comparing would double the plan's time
    if cand is not None and cand.any():
        variants.append((chunk_needs(layout, fine, cand), chunk_blocks(layout, fine, batch, heads, cand),
                         (dense_row_intervals(layout, cand), dense_chunk_needs(layout, fine, cand))))
        if dense_rows:
            variants = variants[1:]
    plans = {}
    for k, s in cands.items():
        options = [_ring_plan(pattern, s, fine, needs, blocks, dense, block, sizes)
                   for needs, blocks, dense in variants]
        plans[k] = min(options, key=lambda p: p.total_bytes_fwd_bwd)  # ties: no dense rows
    summaries = tuple(ShardingSummary(k, tuple(r.blocks_computed for r in p.ranks), p.total_bytes)
                      for k, p in plans.items())
    best = plans[kinds[0]]
    if sharding == "auto":
        worst = {s.kind: max(s.blocks) for s in summaries}
        bal = [p for k, p in plans.items() if k != "contiguous" and worst[k] < AUTO_GAIN * worst["contiguous"]]
        if bal:
            best = min(bal, key=lambda p: (max(r.blocks_computed for r in p.ranks), p.total_bytes))
    return dataclasses.replace(best, alternatives=summaries)


def _dense_rows(sharding: Sharding, fine: np.ndarray, owner: np.ndarray, dense):
    """Per rank ``(global_lo, global_hi, local_lo)`` dense query intervals and ``dense_need`` [P, P]."""
    P = sharding.world_size
    need = np.zeros((P, P), dtype=bool)
    if not dense:
        return ((),) * P, need
    intervals, chunk_need = dense
    rows = tuple(tuple((a, b, lq0 + a - g0) for g0, g1, lq0 in sharding.segments(r) for a, b in clip(intervals, g0, g1))
                 for r in range(P))
    qi, kj = np.nonzero(chunk_need)
    need[owner[qi], owner[kj]] = True
    need &= np.array([bool(r) for r in rows])[:, None]
    return rows, need


def _ring_plan(pattern, sharding, fine, needs, fine_blocks, dense, block, sizes) -> DistributedPlan:
    P, row_bytes = sharding.world_size, sizes["row"]
    need, key_range, key_pieces, owner = _rank_needs(sharding, fine, needs)
    lens = [sharding.local_len(r) for r in range(P)]
    pair_bytes = np.array([[length(p) for p in row] for row in key_pieces], dtype=np.int64).reshape(P, P) * row_bytes
    hops, hop_pieces = sparse_routes(need, key_pieces, lens)
    sent, recv = route_bytes(hops, hop_pieces, row_bytes)
    bsent, brecv = recv.copy(), sent.copy()  # the backward retraces the ring
    dense_rows, dense_need = _dense_rows(sharding, fine, owner, dense)
    for o, j in zip(*np.nonzero(dense_need)):
        if o == j:
            continue  # the owner's own keys: no exchange
        n = sum(b - a for a, b, _ in dense_rows[o])
        sent[o] += n * sizes["q"]         # queries out
        recv[j] += n * sizes["q"]
        sent[j] += n * sizes["part"]      # partial out + lse back
        recv[o] += n * sizes["part"]
        bsent[o] += n * sizes["grad"]     # out, d(out), lse out
        brecv[j] += n * sizes["grad"]
        bsent[j] += n * sizes["q"]        # partial dq back
        brecv[o] += n * sizes["q"]
    dsent, drecv = route_bytes(*dense_routes(lens), row_bytes)
    blocks = np.bincount(owner, weights=fine_blocks, minlength=P).astype(np.int64)
    ranks = tuple(RankPlan(r, tuple((a, b) for a, b, _ in sharding.segments(r)),
                           tuple(np.flatnonzero(need[r] | dense_need[r]).tolist()), int(sent[r]), int(recv[r]),
                           int(dsent[r]), int(drecv[r]), int(blocks[r]), int(bsent[r]), int(brecv[r]))
                  for r in range(P))
    return DistributedPlan(pattern, "ring", sharding.seq_len, P, sharding, need, ranks, block,
                           tuple(n * row_bytes for n in lens), key_range, pair_bytes, row_bytes, hops,
                           hop_hulls(hops, hop_pieces), key_pieces=key_pieces, hop_pieces=hop_pieces,
                           dense_rows=dense_rows, dense_need=dense_need, q_row_bytes=sizes["q"],
                           part_row_bytes=sizes["part"], grad_row_bytes=sizes["grad"])


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
    bwd = sum(r.backward_bytes_sent for r in plan.ranks)
    n_dense = sum(b - a for rows in plan.dense_rows for a, b, _ in rows)
    lines.append(f"total forward bytes {_fmt(tot)} vs dense ring {_fmt(dense)} ({ratio}); "
                 f"backward {_fmt(bwd)}; ring steps {plan.steps}; "
                 f"blocks imbalance (max/mean) {plan.imbalance:.2f}"
                 + (f"; {n_dense} dense query rows sent to the key owners" if n_dense else ""))
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
