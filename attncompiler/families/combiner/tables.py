"""Combiner span tables: which summaries one factorization has at one length and who reads them.

A :class:`SpanTable` lists the summaries (span groups of equal-length lines, whole or prefix)
and the relation ``S in R_q`` as sorted (query, summary) pairs; the variants in
:mod:`attncompiler.families.combiner.pattern` build them with :class:`Builder`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)
class SpanGroup:
    """Summaries pooled over lines of equal length.

    ``members[l]`` lists line ``l``'s token positions in pooling order. A whole group has one
    summary per line; a prefix group has one per prefix of every line (``t = 0 .. length-1``,
    summary ``t * lines + l`` pools ``members[l, :t+1]``), computed with a running max/sum,
    which is how causal partial columns and rows are summarized without seeing the future.
    Prefix ids are t-major because the queries of one grid row read the same ``t`` of every
    column: their summaries then fill a few contiguous key blocks, not one block per column.
    """

    members: np.ndarray  # [lines, length]
    prefix: bool

    @property
    def num_summaries(self) -> int:
        return int(self.members.size if self.prefix else self.members.shape[0])


@dataclass(frozen=True, eq=False)
class SpanTable:
    """All summaries of a factorization at ``num_tokens`` tokens and who reads them.

    Attributes:
        groups: summaries in order (summary ids count up through the groups).
        meta: per-summary integer arrays the summary relation's predicate reads.
        pair_q, pair_s: the relation ``S in R_q`` as sorted (query, summary) pairs.
    """

    num_tokens: int
    groups: tuple[SpanGroup, ...]
    meta: dict
    pair_q: np.ndarray
    pair_s: np.ndarray

    @property
    def num_summaries(self) -> int:
        return sum(g.num_summaries for g in self.groups)

    @functools.cached_property
    def members_csr(self) -> tuple[np.ndarray, np.ndarray]:
        """``(ptr [nS+1], idx)``: the token positions each summary pools."""
        parts, sizes = [], []
        for g in self.groups:
            lines, n = g.members.shape
            if g.prefix:
                for t in range(n):
                    parts.extend(g.members[:, :t + 1])
                    sizes.extend([t + 1] * lines)
            else:
                parts.extend(g.members)
                sizes.extend([n] * lines)
        ptr = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        idx = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
        return ptr, idx


class Builder:
    """Collects span groups and per-summary metadata in summary-id order."""

    def __init__(self, L: int):
        self.L, self.groups, self.meta, self.count = L, [], {}, 0

    def add(self, members: np.ndarray, prefix: bool, **meta: np.ndarray) -> int:
        """Append a group (meta in summary order); returns the group's first summary id."""
        members = np.asarray(members, dtype=np.int64)
        if members.size == 0:
            return self.count
        g = SpanGroup(members, prefix)
        self.groups.append(g)
        first = self.count
        for k, v in meta.items():
            self.meta.setdefault(k, []).append(np.broadcast_to(np.asarray(v, np.int64), (g.num_summaries,)))
        self.count += g.num_summaries
        return first

    def table(self, q: np.ndarray, s: np.ndarray) -> SpanTable:
        """The finished table; ``(q, s)`` pairs are sorted by query, then summary."""
        q, s = np.asarray(q), np.asarray(s)
        if not is_sorted_pairs(q, s):  # np.nonzero already yields them sorted: skip the O(n log n) sort
            order = np.lexsort((s, q))
            q, s = q[order], s[order]
        meta = {k: np.concatenate(v) for k, v in self.meta.items()}
        return SpanTable(self.L, tuple(self.groups), meta, q, s)


def is_sorted_pairs(q: np.ndarray, s: np.ndarray) -> bool:
    """Whether ``(q, s)`` pairs are in lexicographic order (query first); one O(n) pass."""
    if len(q) < 2:
        return True
    dq = np.diff(q)
    return bool((dq >= 0).all() and ((dq > 0) | (np.diff(s) >= 0)).all())
