"""The joint softmax of one Combiner factorization as a mask over ``[keys ; padding ; summary slots]``.

The summaries sit after the tokens in *slots*. Shared slots hold each summary once, in id
order; that is compact, but a block of queries whose summaries lie far apart in id order
(Combiner-Logsparse reads one summary per dyadic level; causal Combiner-Axial-Vertical one
prefix per column) touches one nearly empty key block per summary. Packed slots give every
block of ``block_m`` query rows a private, contiguous copy of the summaries it reads, padded
to whole ``block_n`` key blocks: a few dense key blocks per query block instead of many sparse
ones, at the price of duplicated summary rows. :func:`slot_plan` picks, per length, whichever
needs fewer key blocks, so every variant gets the cheaper arrangement.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from ...dsl.score_mod import ScoreMod, captured_tensors, check_result
from ...ir import expr as E
from .pattern import Combiner, span_table
from ...errors import LayoutError
from ...ir.expr import Expr
from ...dsl.pattern import Pattern


@dataclass(frozen=True, eq=False)
class SlotPlan:
    """Which summary each slot of the joint key axis holds, at one length.

    Attributes:
        summary: ``[n_slots]`` summary id held by each slot (-1: padding, never visible).
        group: ``[n_slots]`` the query group (token-order row // ``block_m``) allowed to read
            the slot; -1: every query (shared slots).
        pair_slot: the slot of each (query, summary) pair of the span table, in table order.
        packed: whether slots are private per query group (else shared, in summary-id order).
    """

    summary: np.ndarray
    group: np.ndarray
    pair_slot: np.ndarray
    packed: bool

    @property
    def num_slots(self) -> int:
        return len(self.summary)


@dataclass(frozen=True)
class JointMask(Pattern):
    """Mask of one factorization's joint softmax over the concatenated key axis.

    Key positions ``kv < L`` are the tokens (visible iff in ``D_q``); ``L <= kv < offset`` is
    padding that aligns the summaries to whole key blocks (never visible); ``kv = offset + j``
    is slot ``j`` of :func:`slot_plan` (visible iff its summary is in ``R_q`` and the query may
    read the slot). Without ``pack`` slot ``j`` is summary ``j``. Token rows and columns are in
    the factorization's :meth:`~Combiner.token_order` (column-major for
    Combiner-Axial-Vertical). ``offset`` is ``L`` rounded up to ``align``, so summary blocks
    never share a key block with tokens. The predicate is an index expression (rendered into
    kernels like any mask; the slot tables are runtime data, so kernels do not depend on L);
    the block layout is built analytically from the direct pattern's layout and the span
    table, never by evaluating L x (L + S) elements.

    Attributes:
        factorization: a single Combiner factorization.
        align: the summaries start at ``L`` rounded up to this.
        pack: ``(block_m, block_n)`` of the schedule the slots are arranged for (shared or
            packed, whichever needs fewer blocks; the slot count is a multiple of block_n), or
            None: one shared slot per summary.
    """

    factorization: Combiner
    align: int
    pack: tuple[int, int] | None = None

    def offset(self, L: int) -> int:
        return -(-L // self.align) * self.align

    def kv_len(self, L: int) -> int:
        """Length of the concatenated key axis at ``L`` tokens."""
        return self.offset(L) + slot_plan(self, L).num_slots

    def validate(self, q_len, kv_len):
        if kv_len != self.kv_len(q_len):
            raise LayoutError(f"the joint key axis of {self.factorization!r} at L={q_len} has "
                              f"{self.kv_len(q_len)} positions, got kv_len={kv_len}")

    def predicate(self, q_len, kv_len):
        return _joint_expr(self, int(q_len), int(kv_len))

    def layout(self, q_len, kv_len=None, block_m=64, block_n=None, *, batch=1, heads=1):
        kv_len = self.kv_len(q_len) if kv_len is None else kv_len
        return _joint_layout(self, int(q_len), int(kv_len), int(block_m), int(block_m if block_n is None else block_n))

    def __repr__(self) -> str:
        pack = "" if self.pack is None else f", pack={self.pack}"
        return f"combiner_joint_mask({self.factorization!r}, align={self.align}{pack})"


@functools.lru_cache(maxsize=64)
def _joint_expr(joint: JointMask, L: int, kv_len: int) -> Expr:
    joint.validate(L, kv_len)
    f = joint.factorization
    # L and the summary offset are read from a runtime table, not baked in as constants, so a
    # kernel rendered from this predicate does not depend on the sequence length.
    lengths = E.Buffer("combiner_lengths", np.array([L, joint.offset(L)], dtype=np.int64))
    n_tok, off = E.Load(lengths, E.Const(0), 0), E.Load(lengths, E.Const(1), 0)
    direct = f.ordered_direct(L).predicate(L, L)
    order = f.token_order(L)
    q = E.Q if order is None else E.Load(E.Buffer("token_order", order), E.Q, 0)
    table = span_table(f, L)
    if joint.pack is None:
        summaries = f.summary_relation(table, q, E.KV - off)
    else:  # the same expression for shared and packed slots: one kernel at every length
        plan = slot_plan(joint, L)
        slot = E.KV - off
        s = E.Load(E.Buffer("slot_summary", plan.summary), slot, -1)
        grp = E.Load(E.Buffer("slot_group", plan.group), slot, -1)
        summaries = (s >= 0) & ((grp < 0) | grp.eq(E.Q // joint.pack[0])) & f.summary_relation(table, q, s)
    return ((E.KV < n_tok) & direct) | ((E.KV >= off) & summaries)


@functools.lru_cache(maxsize=64)
def _joint_layout(joint: JointMask, L: int, kv_len: int, bm: int, bn: int):
    from ...layout.block_sets import FULL, PARTIAL, BlockSet, Geometry
    from ...layout.block_layout import BlockLayout, to_blocks2d

    joint.validate(L, kv_len)
    off = joint.offset(L)
    if off % bn:
        raise LayoutError(f"block_n={bn} must divide the summary alignment {joint.align} of {joint!r}; "
                          "compile with this schedule (ac.compile(..., schedule=...)) so lowering aligns to it")
    g = Geometry(L, kv_len, bm, bn)
    d = joint.factorization.ordered_direct(L).layout(L, L, bm, bn).groups[0]
    kind_d = np.where(d.full, FULL, PARTIAL)
    if L % bn:  # the last token block now also spans padding keys: never full
        kind_d = np.where(d.cols == L // bn, PARTIAL, kind_d)
    rows = _pair_rows(joint.factorization, L)
    key, counts = np.unique((rows // bm) * g.nkb + (off + slot_plan(joint, L).pair_slot) // bn, return_counts=True)
    r, c = key // g.nkb, key % g.nkb
    cap = (g.q_hi(r) - g.q_lo(r) + 1) * (g.k_hi(c) - g.k_lo(c) + 1)
    kind_s = np.where(counts == cap, FULL, PARTIAL)
    bs = BlockSet.make(g, np.concatenate([d.rows, r]), np.concatenate([d.cols, c]), np.concatenate([kind_d, kind_s]))
    return BlockLayout(joint, g, (to_blocks2d(bs, joint),), np.zeros((1, 1), dtype=np.int64))


def _pair_rows(f: Combiner, L: int) -> np.ndarray:
    """The joint-attention row (token order) of each (query, summary) pair of the span table."""
    t = span_table(f, L)
    order = f.token_order(L)
    return t.pair_q if order is None else np.argsort(order)[t.pair_q]


@functools.lru_cache(maxsize=64)
def slot_plan(joint: JointMask, L: int) -> SlotPlan:
    """The summary slots of ``joint`` at ``L`` tokens: shared or packed, whichever needs fewer
    key blocks of ``joint.pack`` (shared on a tie: fewer slots to gather)."""
    t = span_table(joint.factorization, L)
    S = t.num_summaries
    if joint.pack is None:
        return SlotPlan(np.arange(S, dtype=np.int64), np.full(S, -1, dtype=np.int64), t.pair_s, False)
    bm, bn = joint.pack
    rows = _pair_rows(joint.factorization, L)
    # Packed: the distinct (query group, summary) pairs, each group padded to whole key blocks.
    uniq, pair_inv = np.unique((rows // bm) * max(S, 1) + t.pair_s, return_inverse=True)
    grp, summ = uniq // max(S, 1), uniq % max(S, 1)
    _, start, count = np.unique(grp, return_index=True, return_counts=True)
    padded = -(-count // bn) * bn
    shared_blocks = len(np.unique((rows // bm) * (S // bn + 1) + t.pair_s // bn))
    if padded.sum() // bn >= shared_blocks:
        n = -(-S // bn) * bn  # whole key blocks: the attention never pads k/v itself
        summary = np.concatenate([np.arange(S, dtype=np.int64), np.full(n - S, -1, dtype=np.int64)])
        return SlotPlan(summary, np.full(n, -1, dtype=np.int64), t.pair_s, False)
    first = np.concatenate([[0], np.cumsum(padded)[:-1]])  # each group's first slot
    slot = np.repeat(first - start, count) + np.arange(len(uniq))
    summary = np.full(int(padded.sum()), -1, dtype=np.int64)
    group = np.full(int(padded.sum()), -1, dtype=np.int64)
    summary[slot], group[slot] = summ, grp
    return SlotPlan(summary, group, slot[pair_inv.reshape(-1)], True)


class JointScoreMod(ScoreMod):
    """A user score_mod on one factorization's joint key axis at ``L`` tokens.

    Token columns (``kv < L``) get ``fn(score, b, h, pos(q), pos(kv))`` with the real positions
    (``pos`` undoes :meth:`Combiner.token_order`); padding and summary columns keep their score
    (a summary ``k_S`` pools several keys: it has no position).
    """

    def __init__(self, fn, joint: JointMask, L: int):
        self.fn, self.L = fn, L
        order = joint.factorization.token_order(L)
        self.order = None if order is None else torch.from_numpy(np.ascontiguousarray(order))
        self.finite = bool(getattr(fn, "finite", False))

    def __call__(self, score, b, h, q_idx, kv_idx):
        token = kv_idx < self.L
        kv = kv_idx.clamp_max(self.L - 1)
        q = q_idx.clamp_max(self.L - 1)
        if self.order is not None:
            if self.order.device != kv.device:
                self.order = self.order.to(kv.device)
            q, kv = self.order[q], self.order[kv]
        out = check_result(self.fn, self.fn(score, b, h, q, kv), score)
        return torch.where(token, out, score)

    def tensors(self):
        return captured_tensors(self.fn)

    def check(self, batch, heads, q_end, kv_len):
        if isinstance(self.fn, ScoreMod):
            self.fn.check(batch, heads, self.L, self.L)

    def __repr__(self) -> str:
        return f"{self.fn!r} on the token columns"


def joint_score_mod(fn, joint: JointMask, L: int) -> JointScoreMod:
    """``fn`` applied to the direct (token-to-token) scores of ``joint``'s softmax at ``L`` tokens,
    at the tokens' real positions; the summary scores stay unmodified (see :class:`JointScoreMod`)."""
    return JointScoreMod(fn, joint, L)
