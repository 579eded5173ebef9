"""Cost of a pattern: symbolic (sympy, in L) and at a concrete block size (what kernels pay).

Symbolic costs are registered per family with :func:`register_cost`; the mask family
recognizes every catalogue pattern (:data:`attncompiler.patterns.CATALOGUE`) by rebuilding it
from the parameters found in the pattern tree and comparing structurally, then returns the
closed form of its allowed pairs (formulas in :mod:`.cost_formulas`). FLOPs are ``4 * pairs
* D`` (QK^T and PV, forward); bytes moved assume a flash-style kernel that reads Q and writes
O once and reads the K/V rows of each allowed pair once per query block of ``B_M`` rows.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import numpy as np
import sympy as sp_

from ..errors import PatternError
from ..dsl.pattern import Pattern
from .graph import AttentionGraph
from .symbols import BM, BYTES, D, L


CLASSES = (("O(1)", sp_.Integer(1)), ("O(L)", L), ("O(L log L)", L * sp_.log(L)),
           ("O(L sqrt L)", L ** sp_.Rational(3, 2)), ("O(L^2)", L ** 2))


def asymptotic_class(expr: sp_.Expr) -> str:
    """The smallest of O(1), O(L), O(L log L), O(L sqrt L), O(L^2) bounding ``expr`` as L -> oo."""
    lead = sp_.Order(expr, (L, sp_.oo)).expr  # the dominant term; limits on it are cheap
    for name, f in CLASSES:
        lim = sp_.limit(lead / f, L, sp_.oo)
        if lim.is_finite:
            return name
    return "more than O(L^2)"


@dataclass(frozen=True)
class SymbolicCost:
    """Closed-form cost of one catalogue pattern, per head.

    Attributes:
        name: catalogue entry (``attnc list``) the pattern was recognized as.
        params: the entry's parameters.
        pairs: allowed (query, key) pairs as a sympy expression in ``L`` and parameter
            symbols (mean over heads for per-head patterns).
        row_max: the largest number of keys one query sees.
        values: parameter symbol -> value for this pattern.
        asymptotic: growth class of ``pairs`` with the parameters held fixed.
        scaled: growth class when the paper ties a parameter to L (e.g. stride ~ sqrt(L)).
        exact: False when ``pairs`` is an upper bound (random blocks may overlap others).
        assumptions: conditions on L under which ``pairs`` is exact (or a bound).
        per_head: per-head pair expressions for per-head patterns.
    """

    name: str
    params: tuple[tuple[str, object], ...]
    pairs: sp_.Expr
    row_max: sp_.Expr
    values: tuple[tuple[sp_.Symbol, object], ...]
    asymptotic: str
    scaled: str | None
    exact: bool
    assumptions: str
    per_head: tuple[sp_.Expr, ...] = ()

    @property
    def flops(self) -> sp_.Expr:
        """Forward FLOPs per head: ``4 * pairs * D``."""
        return 4 * self.pairs * D

    @property
    def bytes_moved(self) -> sp_.Expr:
        """Bytes per head: Q read and O written once, K/V of allowed pairs once per query block."""
        return BYTES * D * (2 * L + 2 * self.pairs / BM)

    def at(self, seq_len: int, head_dim: int = 64, elem_bytes: int = 2, block_m: int = 64) -> dict[str, float]:
        """The expressions evaluated at concrete sizes."""
        subs = dict(self.values) | {L: seq_len, D: head_dim, BYTES: elem_bytes, BM: block_m}
        return {k: float(sp_.N(getattr(self, k).subs(subs)))
                for k in ("pairs", "row_max", "flops", "bytes_moved")}

    def to_dict(self) -> dict:
        return {"name": self.name, "params": {k: _jsonable(v) for k, v in self.params},
                "pairs": str(self.pairs), "row_max": str(self.row_max), "flops": str(self.flops),
                "bytes_moved": str(self.bytes_moved),
                "values": {str(k): _jsonable(v) for k, v in self.values},
                "asymptotic": self.asymptotic, "scaled": self.scaled, "exact": self.exact,
                "assumptions": self.assumptions, "per_head": [str(e) for e in self.per_head]}


def _jsonable(v):
    if isinstance(v, (tuple, list, range)):
        return [int(x) for x in v]
    return v


_COSTS: dict[str, Callable[[Pattern], SymbolicCost | None]] = {}


def register_cost(family: str):
    """Register ``fn(pattern) -> SymbolicCost | None`` giving the closed-form cost of a family."""

    def deco(fn):
        _COSTS[family] = fn
        return fn

    return deco


def symbolic_cost(pattern: Pattern) -> SymbolicCost | None:
    """The closed-form cost of ``pattern`` if its family registered one and it is recognized."""
    fn = _COSTS.get(pattern.family)
    return fn(pattern) if fn is not None else None


# ---------------------------------------------------------------------------------------------
# Block-level cost (what the kernel pays at a concrete block size)
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BlockCost:
    """Block-sparse cost at one block size, per head (means over heads, maxima for balance).

    Attributes:
        block: block size (square blocks).
        blocks_visited: non-empty (query block, key block) pairs the kernel visits.
        full_blocks, partial_blocks: of which full (no mask evaluated) / partial.
        allowed_pairs: exact allowed pairs.
        computed_pairs: pairs the kernel computes (whole visited blocks).
        wasted_pairs: masked-out pairs inside partial blocks.
        max_blocks_per_row, mean_blocks_per_row: load balance across query blocks.
        kernel_flops: ``4 * computed_pairs * D``; ``useful_flops``: ``4 * allowed_pairs * D``.
        kernel_bytes: Q, O once, K/V once per visited block (``e`` bytes per element).
    """

    block: int
    blocks_visited: float
    full_blocks: float
    partial_blocks: float
    allowed_pairs: float
    computed_pairs: float
    wasted_pairs: float
    max_blocks_per_row: int
    mean_blocks_per_row: float
    kernel_flops: float
    useful_flops: float
    kernel_bytes: float

    @property
    def load_balance(self) -> float:
        """``max / mean`` blocks per query-block row (1 = perfectly balanced)."""
        return self.max_blocks_per_row / self.mean_blocks_per_row if self.mean_blocks_per_row else 1.0


def _weights_cost(adj, sizes: np.ndarray) -> tuple:
    coo = adj.tocoo()
    area = sizes[coo.row] * sizes[coo.col]
    full = coo.data >= area
    per_row = np.diff(adj.indptr)
    return (len(coo.data), int(full.sum()), float(coo.data.sum()), float(area.sum()),
            float((area - coo.data)[~full].sum()), int(per_row.max(initial=0)), float(per_row.mean()))


def block_cost(pattern: Pattern, seq_len: int, block: int, *, head_dim: int = 64, elem_bytes: int = 2,
               heads: int | None = None, graph: AttentionGraph | None = None) -> BlockCost:
    """Exact block-level cost of a mask pattern; reuses ``graph``'s weights when it is the
    single-head block graph at this block size."""
    from .mask_graph import block_adjacency, head_patterns

    pats = head_patterns(pattern, heads)
    rows = []
    if graph is not None and graph.block == block and len(pats) == 1 and not graph.num_aux:
        rows.append(_weights_cost(graph.adj, graph.node_sizes()))
    else:
        for p in pats:
            adj, _, _ = block_adjacency(p, seq_len, block)
            nb = adj.shape[0]
            sizes = np.minimum(block, seq_len - block * np.arange(nb))
            rows.append(_weights_cost(adj, sizes))
    a = np.array(rows, dtype=np.float64)  # [heads, 7]
    visited, full, allowed, computed, wasted, mx, mean = a.mean(axis=0)
    return BlockCost(block, visited, full, visited - full, allowed, computed, wasted, int(a[:, 5].max()), mean,
                     4.0 * computed * head_dim, 4.0 * allowed * head_dim,
                     float(elem_bytes * head_dim * (2 * seq_len + 2 * block * visited)))


# ---------------------------------------------------------------------------------------------
# Mask family: recognize catalogue patterns
# ---------------------------------------------------------------------------------------------

def _walk(p: Pattern):
    yield p
    for c in p.children():
        yield from _walk(c)


def _candidates(p: Pattern):
    """(catalogue name, params) pairs that could have built ``p``, from the numbers in its tree."""
    from .. import dsl as P

    nodes = list(_walk(p))
    of = lambda cls: [n for n in nodes if isinstance(n, cls)]  # noqa: E731
    bools = (False, True)
    for n in of(P.SlidingWindow):
        for c in bools:
            yield "sliding_window", {"window": n.window, "causal": c}
        for m in bools:
            yield "strided", {"stride": n.window, "merged": m}
    yield "causal", {}
    for n in of(P.PrefixLM):
        yield "prefix_lm", {"prefix": n.prefix}
    for n in of(P.Document):
        yield "document", {"lengths": n.lengths}
    globals_ = of(P.GlobalTokens)
    for n in of(P.BlockWindow):
        g_opts = [len(t.indices) // n.block for t in globals_] or [0]
        r_opts = [(t.count, t.seed) for t in of(P.RandomBlocks) if t.block == n.block] or [(0, 0)]
        for g in g_opts:
            for r, seed in r_opts:
                for c in bools:
                    yield "bigbird", {"block": n.block, "window_blocks": 2 * n.window + 1, "global_blocks": g,
                                      "random_blocks": r, "seed": seed, "causal": c}
    for n in of(P.SlidingWindow) + of(P.DilatedWindow):
        dil = getattr(n, "dilation", 1)
        for gi in [t.indices for t in globals_] or [()]:
            for c in bools:
                yield "longformer", {"window": n.window, "dilation": dil, "global_indices": gi, "causal": c}
    for n in of(P.BlockLocal):
        for c in bools:
            yield "axial", {"cols": n.block, "causal": c}
        for mk in of(P.Mask):
            if mk.expr is None:
                continue
            import torch

            hits = mk.evaluate(0, 0, torch.tensor(10 * n.block), torch.arange(n.block), 10 * n.block + 1,
                               10 * n.block + 1)
            for m in bools:
                yield "fixed", {"stride": n.block, "summary": int(hits.sum()), "merged": m}
    local = [n.window for n in of(P.SlidingWindow)] or [0]
    for w in local:
        yield "logsparse", {"local": w}


@functools.lru_cache(maxsize=256)
def _recognize(p: Pattern) -> tuple[str, tuple] | None:
    from ..patterns import CATALOGUE

    for name, params in _candidates(p):
        try:
            built = CATALOGUE[name](**params)
        except (PatternError, TypeError, ValueError):
            continue
        if built == p:
            return name, tuple(params.items())
    return None


@register_cost("mask")
def mask_cost(pattern: Pattern) -> SymbolicCost | None:
    """Closed-form cost of a mask pattern that equals a catalogue entry (None otherwise)."""
    try:
        hit = _recognize(pattern)
    except TypeError:  # unhashable parameters somewhere in an opaque mask
        return None
    if hit is None:
        return None
    from .cost_formulas import FORMULAS

    name, params = hit
    return _build_cost(name, params, FORMULAS[name])


@functools.lru_cache(maxsize=256)
def _build_cost(name: str, params: tuple, formula) -> SymbolicCost | None:
    f = formula(**dict(params))
    if f is None:
        return None
    pairs = sp_.sympify(f["pairs"])
    asym_expr = sp_.sympify(f.get("asym", pairs))
    values = tuple(f.get("values", {}).items())
    scaled = None
    if "scale" in f:  # the paper's choice, e.g. stride = sqrt(L)
        sym = f["scale"]
        scaled = f"{asymptotic_class(asym_expr.subs(sym, sp_.sqrt(L)).subs(dict(values)))} with {sym} ~ sqrt(L)"
    growth = asymptotic_class(asym_expr.subs(dict(values)))
    return SymbolicCost(name, params, pairs, sp_.sympify(f["row_max"]), values, growth, scaled,
                        f.get("exact", True), f.get("assumptions", ""), tuple(f.get("per_head", ())))
