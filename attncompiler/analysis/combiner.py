"""Combiner analysis: the attention graph with summary nodes, partition plans and their
checker, hops to full attention, and the symbolic cost.

Graph: token nodes ``0 .. L-1``, then one SUMMARY node per span summary (per factorization for
mixtures). Edges: key -> query (ATTEND) for the direct sets, member token -> summary (WRITE)
and summary -> query (READ) for the summarized spans. A token -> summary -> token path is one
layer (see :mod:`attncompiler.analysis.graph`), so Combiner's claim "every query reaches every
legal key in one layer" is ``hops_to_full == 1``.

Partition plan: for each query its direct keys and the spans it reads. The checker verifies
that they are disjoint and cover exactly the legal keys (all keys; ``[0, i]`` when causal) and
otherwise returns a witness (query, key, what went wrong). Plans can be written by hand.
"""

from __future__ import annotations

import functools
import operator
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import sympy

from ..families.combiner.pattern import FAMILY, Combiner, CombinerFixed, CombinerLogsparse, span_table
from ..errors import PatternError, UnsupportedError
from .graph import ATTEND, READ, SUMMARY, TOKEN, WRITE, AttentionGraph, register_graph_builder
from .mask_graph import block_adjacency, token_adjacency


@dataclass(frozen=True, eq=False)
class PartitionPlan:
    """Who reads what in one factorization at ``num_tokens`` tokens.

    Attributes:
        direct_q, direct_k: direct pairs (query ``direct_q[n]`` attends to key ``direct_k[n]``).
        span_ptr, span_idx: CSR of the tokens each span summarizes.
        read_q, read_s: query ``read_q[n]`` reads the summary of span ``read_s[n]``.
        causal: legal keys of query i are ``[0, i]`` (else all keys).
    """

    num_tokens: int
    direct_q: np.ndarray
    direct_k: np.ndarray
    span_ptr: np.ndarray
    span_idx: np.ndarray
    read_q: np.ndarray
    read_s: np.ndarray
    causal: bool = False

    @staticmethod
    def from_lists(num_tokens: int, direct: list[list[int]], spans: list[list[int]], reads: list[list[int]],
                   causal: bool = False) -> PartitionPlan:
        """A plan from Python lists: ``direct[i]`` keys, ``spans[s]`` members, ``reads[i]`` span ids."""
        dq = np.repeat(np.arange(num_tokens), [len(d) for d in direct])
        rq = np.repeat(np.arange(num_tokens), [len(r) for r in reads])
        ptr = np.concatenate([[0], np.cumsum([len(s) for s in spans])]).astype(np.int64)
        flat = (lambda xs: np.asarray([x for row in xs for x in row], dtype=np.int64))
        return PartitionPlan(num_tokens, dq, flat(direct), ptr, flat(spans), rq, flat(reads), causal)


@dataclass(frozen=True)
class PartitionCheck:
    """Result of :func:`check_partition`; ``witness`` says why a plan fails (None if it holds)."""

    ok: bool
    witness: str | None = None
    query: int | None = None
    key: int | None = None

    def __bool__(self) -> bool:
        return self.ok


def plan_for(pattern: Combiner, L: int) -> PartitionPlan:
    """The partition plan a single Combiner factorization uses at ``L`` tokens."""
    if len(pattern.factorizations()) != 1:
        raise PatternError(f"plan_for needs a single factorization; {pattern!r} is a mixture "
                           "(check each of pattern.factorizations())")
    table = span_table(pattern, L)
    direct = token_adjacency(pattern.direct(), L).tocoo()
    ptr, idx = table.members_csr
    return PartitionPlan(L, direct.row.astype(np.int64), direct.col.astype(np.int64), ptr, idx,
                         table.pair_q, table.pair_s, pattern.autoregressive)


def check_partition(plan: PartitionPlan) -> PartitionCheck:
    """Check that every query's direct keys and summarized spans are disjoint and cover exactly
    its legal keys; the witness names the first query and key that break it."""
    L = plan.num_tokens
    sizes = np.diff(plan.span_ptr)[plan.read_s]
    q = np.concatenate([plan.direct_q, np.repeat(plan.read_q, sizes)])
    starts = np.repeat(plan.span_ptr[plan.read_s], sizes)
    offs = np.arange(len(starts)) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    k = np.concatenate([plan.direct_k, plan.span_idx[starts + offs]])
    via = np.concatenate([np.full(len(plan.direct_q), -1), np.repeat(plan.read_s, sizes)])
    if len(k) and (k.min() < 0 or k.max() >= L):
        n = int(np.flatnonzero((k < 0) | (k >= L))[0])
        return PartitionCheck(False, f"query {q[n]} reaches key {k[n]} outside [0, {L})", int(q[n]), int(k[n]))
    if plan.causal and (k > q).any():
        n = int(np.flatnonzero(k > q)[0])
        src = "directly" if via[n] < 0 else f"through span {via[n]}"
        return PartitionCheck(False, f"query {q[n]} sees future key {k[n]} {src}", int(q[n]), int(k[n]))
    code = q * L + k
    order = np.argsort(code, kind="stable")
    code, via = code[order], via[order]
    dup = np.flatnonzero(code[1:] == code[:-1])
    if len(dup):
        n = int(dup[0])
        qi, kj = divmod(int(code[n]), L)
        names = ["its direct set" if x < 0 else f"span {x}" for x in (via[n], via[n + 1])]
        return PartitionCheck(False, f"query {qi} reaches key {kj} twice ({names[0]} and {names[1]})", qi, kj)
    counts = np.bincount(code // L, minlength=L)
    legal = np.arange(1, L + 1) if plan.causal else np.full(L, L)
    short = np.flatnonzero(counts != legal)
    if len(short):
        qi = int(short[0])
        seen = code[(code // L) == qi] % L
        missing = np.setdiff1d(np.arange(qi + 1 if plan.causal else L), seen)
        kj = int(missing[0])
        return PartitionCheck(False, f"query {qi} never reaches key {kj} (neither directly nor through a span)",
                              qi, kj)
    return PartitionCheck(True)


@dataclass(frozen=True)
class HopsReport:
    """Layers until every query has reached every legal key (None: never), with a witness."""

    hops: int | None
    witness: str | None = None


def hops_to_full(pattern_or_plan: Combiner | PartitionPlan, L: int | None = None, max_layers: int = 64) -> HopsReport:
    """Layers needed for full attention. Combiner factorizations give 1 by construction; a
    plan that fails its partition check gets the check's witness and, at small L, the exact
    number of layers (residual connections keep what earlier layers reached)."""
    if isinstance(pattern_or_plan, Combiner):
        reports = [hops_to_full(plan_for(f, L), max_layers=max_layers) for f in pattern_or_plan.factorizations()]
        return max(reports, key=lambda r: float("inf") if r.hops is None else r.hops)
    plan = pattern_or_plan
    check = check_partition(plan)
    if check.ok:
        return HopsReport(1)
    n = plan.num_tokens
    sizes = np.diff(plan.span_ptr)[plan.read_s]
    members = plan.span_idx[np.repeat(plan.span_ptr[plan.read_s], sizes)
                            + np.arange(sizes.sum()) - np.repeat(np.cumsum(sizes) - sizes, sizes)]
    rows = np.concatenate([plan.direct_q, np.repeat(plan.read_q, sizes), np.arange(n)])
    cols = np.concatenate([plan.direct_k, members, np.arange(n)])
    ok = (cols >= 0) & (cols < n)
    step = sp.csr_matrix((np.ones(int(ok.sum()), dtype=bool), (rows[ok], cols[ok])), shape=(n, n))
    legal = np.tril(np.ones((n, n), dtype=bool)) if plan.causal else np.ones((n, n), dtype=bool)
    reach = step.copy()
    for layer in range(1, max_layers + 1):
        dense = reach.toarray()
        if (dense >= legal).all():
            return HopsReport(layer, check.witness)
        nxt = (step @ reach).astype(bool)
        if nxt.nnz == reach.nnz:
            return HopsReport(None, check.witness)
        reach = nxt
    return HopsReport(None, check.witness)


# ---------------------------------------------------------------------------------------------
# Attention graph
# ---------------------------------------------------------------------------------------------

def count_pairs(a: np.ndarray, b: np.ndarray, na: int, nb: int, off_a: int, off_b: int,
                limit: int = 1 << 26) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct pairs ``(off_a + a, off_b + b)`` (a < na, b < nb) with their multiplicities as
    float64 weights, row-major; one ``bincount`` instead of a sort. Past ``limit`` cells of
    ``na x nb`` the pairs come back unmerged with weight 1 (the CSR constructor sums them)."""
    a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    if na * nb > limit or len(a) <= na * nb:
        return off_a + a, off_b + b, np.ones(len(a))
    counts = np.bincount(a * nb + b, minlength=na * nb)
    cell = np.flatnonzero(counts)
    return off_a + cell // nb, off_b + cell % nb, counts[cell].astype(np.float64)


@register_graph_builder(FAMILY)
def combiner_graph(pattern: Combiner, seq_len: int, *, level: str = "token", block: int = 64,
                   **_options) -> AttentionGraph:
    """Tokens plus one SUMMARY node per span summary (per factorization for mixtures).

    At ``level="block"`` token nodes are blocks of ``block`` tokens and edge weights count the
    token-level edges they merge (summary nodes stay individual).
    """
    if level not in ("token", "block"):
        raise UnsupportedError(f"level={level!r} must be 'token' or 'block'")
    L = int(seq_len)
    unit = 1 if level == "token" else int(block)
    T = -(-L // unit)
    rows, cols = [], []
    base = T
    weights = []
    if unit > 1:  # the direct parts' block quotient counts their distinct token edges per block pair
        # (a mixture's factorizations may share direct edges: their union, not their sum)
        direct = functools.reduce(operator.or_, [f.direct() for f in pattern.factorizations()])
        w = block_adjacency(direct, L, unit)[0].tocoo()
        rows.append(w.row.astype(np.int64)); cols.append(w.col.astype(np.int64)); weights.append(w.data.astype(np.float64))
    for f in pattern.factorizations():
        if unit == 1:
            plan = plan_for(f, L)
            span_ptr, span_idx, read_q, read_s = plan.span_ptr, plan.span_idx, plan.read_q, plan.read_s
            direct_q, direct_k, direct_w = plan.direct_q, plan.direct_k, np.ones(len(plan.direct_q))
        else:  # direct edges were counted above, from the block quotient (only partial blocks evaluated)
            table = span_table(f, L)
            span_ptr, span_idx = table.members_csr
            read_q, read_s = table.pair_q, table.pair_s
            direct_q = direct_k = np.zeros(0, dtype=np.int64)
            direct_w = np.zeros(0)
        nS = len(span_ptr) - 1
        sizes = np.diff(span_ptr)
        write = (base + np.repeat(np.arange(nS), sizes), span_idx // unit, np.ones(len(span_idx)))
        read = (read_q // unit, base + read_s, np.ones(len(read_q)))
        if unit > 1:  # merge the block level's many duplicate pairs now, not in the CSR constructor
            write = count_pairs(write[0] - base, write[1], nS, T, base, 0)
            read = count_pairs(read[0], read_s, T, nS, 0, base)
        rows += [direct_q // unit, write[0], read[0]]
        cols += [direct_k // unit, write[1], read[1]]
        weights += [np.asarray(direct_w, dtype=np.float64), write[2], read[2]]
        base += nS
    # Duplicates are merged by the CSR constructor (weights summed: token edges per block pair).
    # An edge's kind follows from its end points (token -> token: ATTEND, token -> summary:
    # WRITE, summary -> token: READ), so no per-edge sort is needed.
    r, c = np.concatenate(rows), np.concatenate(cols)
    adj = sp.csr_matrix((np.concatenate(weights), (r, c)), shape=(base, base))
    adj.sum_duplicates()
    adj.sort_indices()
    if unit == 1:
        adj.data[:] = 1.0
    er = np.repeat(np.arange(base), np.diff(adj.indptr))
    kd = np.where(er >= T, WRITE, np.where(adj.indices >= T, READ, ATTEND)).astype(np.int8)
    ek = sp.csr_matrix((kd, adj.indices.copy(), adj.indptr.copy()), shape=(base, base))
    node_kind = np.concatenate([np.full(T, TOKEN, np.int8), np.full(base - T, SUMMARY, np.int8)])
    causal = all(f.autoregressive for f in pattern.factorizations())
    notes = ("token -> summary -> query paths are one layer (a summary is computed and read in the same layer)",)
    return AttentionGraph(pattern, T, node_kind, adj, ek, causal, unit, notes, seq_len=L,
                          exact=(unit == 1))


# ---------------------------------------------------------------------------------------------
# Symbolic cost
# ---------------------------------------------------------------------------------------------

L_SYM, D_SYM = sympy.symbols("L D", positive=True)


def combiner_cost(pattern: Combiner, *, balanced: bool = True) -> sympy.Expr:
    """Multiply-adds of one head (scores and values, ``2 D`` per attended pair), as a sympy
    expression in ``L`` and ``D``.

    With ``balanced`` the span / grid width is the paper's choice ``sqrt(L)``; otherwise the
    pattern's own numbers are used (a fixed span makes the summary term grow as ``L^2 / span``).
    """
    L = L_SYM
    total = sympy.Integer(0)
    for f in pattern.factorizations():
        half = sympy.Rational(1, 2) if f.autoregressive else 1
        if isinstance(f, CombinerLogsparse):
            pairs = L + half * L * sympy.log(L, 2)  # itself + one span per bit of i
            build = L * sympy.log(L, 2)  # every level pools and attends over all L tokens
        else:
            if isinstance(f, CombinerFixed):
                w, variant = f.span, "horizontal"
            else:
                w, variant = f.cols, f.variant
            w = sympy.sqrt(L) if balanced else sympy.Integer(w)
            rows = L / w
            if variant == "horizontal":  # own span + one summary per other span
                pairs, build = half * L * (w + rows), L
            elif variant == "vertical":  # own column + one (prefix) summary per other column
                pairs = half * L * rows + L * w
                build = L * rows / 2 if f.autoregressive else L
            else:  # rowmajor: raster window + prefix (and suffix) summaries per column
                pairs = L * (w if f.autoregressive else 2 * w) + L * w * (1 if f.autoregressive else 2)
                build = L * rows / 2 * (1 if f.autoregressive else 2)
        total += 2 * D_SYM * (pairs + 2 * build)
    return sympy.expand(total)


def cost_order(pattern: Combiner) -> sympy.Expr:
    """``g`` in the asymptotic cost ``O(g)`` at the balanced span: ``L**(3/2)`` for
    Combiner-Fixed and -Axial, ``L*log(L)`` for Combiner-Logsparse (a plain expression, since
    sympy's ``Order`` at infinity rewrites ``log(L)`` as ``log(1/L)``)."""
    cost = combiner_cost(pattern).subs(D_SYM, 1)
    L = L_SYM
    for g in (L, L * sympy.log(L), L ** sympy.Rational(3, 2), L ** 2, L ** 3):  # the tightest that bounds it
        if sympy.limit(cost / g, L, sympy.oo).is_finite:
            return g
    return cost
