"""``analyze``: everything the analysis knows about a pattern at one length, as a frozen report."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, fields, is_dataclass

import numpy as np

from ..errors import LayoutError, UnsupportedError
from ..dsl.pattern import Pattern
from .edge_reach import ScoreModReach, score_mod_reach
from .cost import BlockCost, SymbolicCost, block_cost, symbolic_cost
from .expansion import expansion
from .graph import AttentionGraph, attention_graph, layer_operator
from .progress import Progress
from .quotient import Quotient, from_graph
from .reach import causality_witness, reach

# level="auto" answers in seconds: the exact token graph (twin-compressed) while it is small,
# else the block quotient (hops as lower bounds, reach as upper bounds when blocks are partial).
# Always the token graph up to this length:
TOKEN_ALWAYS_MAX = 1024
# Beyond it, mask patterns whose token graph has at most TOKEN_EDGES_MAX edges (estimated from
# the block layout) up to TOKEN_LEVEL_MAX tokens, and only while the twin quotient keeps at most
# QUOTIENT_EDGES_MAX edges; other families (dense one-layer operators) take the block quotient.
TOKEN_LEVEL_MAX = 8192
TOKEN_EDGES_MAX = 4e6
QUOTIENT_EDGES_MAX = 3e5
# Block quotients are kept to at most this many blocks (larger L get larger blocks).
MAX_BLOCKS = 16384


@dataclass(frozen=True)
class CostReport:
    """Cost of one layer, per head.

    Attributes:
        allowed_pairs: exact allowed (query, key) pairs (mean over heads).
        flops: forward FLOPs ``4 * allowed_pairs * head_dim``.
        head_dim: D used for FLOPs and bytes.
        symbolic: closed form in L (catalogue patterns), else None.
        block: what a block-sparse kernel pays at the analysis block size (mask family).
    """

    allowed_pairs: float
    flops: float
    head_dim: int
    symbolic: SymbolicCost | None
    block: BlockCost | None

    @property
    def asymptotic(self) -> str:
        """Growth class of the allowed pairs in L ("?" when no closed form is known)."""
        return self.symbolic.asymptotic if self.symbolic else "?"


@dataclass(frozen=True)
class AnalysisReport:
    """What a pattern can and cannot do at one sequence length (see :func:`analyze`).

    ``hops_to_full`` is None when some legal pair is never reached (``never_witness`` names
    one as ``(key, query)``); ``exact`` is False when figures come from a block quotient with
    partial blocks (hops are then lower bounds, reach fractions upper bounds). ``score_mod`` is
    the effect of ``analyze(..., score_mod=)`` on reach (None when no score_mod was given): for
    ALiBi the distance past which each head's bias masks effectively and ``hops_to_full`` of
    that effectively-masked graph; other score_mods carry the reason they are not analyzed.
    """

    pattern: str
    family: str
    seq_len: int
    level: str
    block: int
    causal: bool
    density: float
    hops_to_full: int | None
    never_witness: tuple[int, int] | None
    diameter: int | None
    reach_fraction: tuple[float, ...]
    causality_ok: bool | None
    causality_witness: tuple[int, int] | None
    spectral_gap: float
    slem: float
    avg_degree: float
    ramanujan_bound: float | None
    ramanujan_ratio: float | None
    conductance_bounds: tuple[float, float]
    edge_expansion_bounds: tuple[float, float]
    vertex_expansion: float | None
    components: int
    cost: CostReport
    exact: bool
    graph: str
    notes: tuple[str, ...] = ()
    seconds: float = 0.0
    score_mod: ScoreModReach | None = None

    def to_dict(self) -> dict:
        """A JSON-ready dict (sympy expressions as strings, infinities as None)."""
        return _plain(self)

    def to_json(self, **kw) -> str:
        """The report as JSON."""
        return json.dumps(self.to_dict(), **({"indent": 2} | kw))

    def __str__(self) -> str:
        rows = [("pattern", self.pattern), ("seq_len", f"{self.seq_len:,}"),
                ("graph", self.graph + ("" if self.exact else " (bounds, not exact)")),
                ("causal", str(self.causal)), ("density", f"{self.density:.6g}"),
                ("hops_to_full", _hops(self)), ("diameter", "disconnected" if self.diameter is None else _bound(self, self.diameter)),
                ("reach after 1.. layers", " ".join(f"{x:.3f}" for x in self.reach_fraction))]
        if self.causality_ok is not None:
            rows.append(("causality", "ok" if self.causality_ok else
                         f"LEAK: key {self.causality_witness[0]} reaches query {self.causality_witness[1]}"))
        rows += [("spectral_gap", f"{self.spectral_gap:.6g}"), ("slem", f"{self.slem:.6g}"),
                 ("avg_degree", f"{self.avg_degree:.6g}"),
                 ("ramanujan bound / ratio", f"{_num(self.ramanujan_bound)} / {_num(self.ramanujan_ratio)}"),
                 ("conductance (Cheeger)", f"[{self.conductance_bounds[0]:.4g}, {self.conductance_bounds[1]:.4g}]"),
                 ("edge expansion", f"[{self.edge_expansion_bounds[0]:.4g}, {self.edge_expansion_bounds[1]:.4g}]"),
                 ("vertex expansion (sampled)", _num(self.vertex_expansion)), ("components", str(self.components)),
                 ("allowed pairs / head", f"{self.cost.allowed_pairs:,.0f}"),
                 (f"FLOPs / head (D={self.cost.head_dim})", f"{self.cost.flops:.4g}")]
        s = self.cost.symbolic
        if s is not None:
            rows += [("cost class", s.asymptotic + (f" ({s.scaled})" if s.scaled else "")),
                     ("pairs(L)" + ("" if s.exact else " (upper bound)"), str(s.pairs)),
                     ("row max(L)", str(s.row_max))]
        b = self.cost.block
        if b is not None:
            rows += [(f"blocks visited (block {b.block})", f"{b.blocks_visited:,.0f} ({b.full_blocks:,.0f} full, "
                      f"{b.partial_blocks:,.0f} partial)"),
                     ("wasted pairs in partial blocks", f"{b.wasted_pairs:,.0f}"),
                     ("blocks per row max/mean", f"{b.max_blocks_per_row} / {b.mean_blocks_per_row:.2f} "
                      f"(balance {b.load_balance:.2f})")]
        if self.score_mod is not None:
            rows.append((f"score_mod {self.score_mod.score_mod}", self.score_mod.summary()))
        rows += [("note", n) for n in self.notes]
        rows.append(("time", f"{self.seconds:.2f} s"))
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _hops(r: AnalysisReport) -> str:
    if r.hops_to_full is not None:
        return _bound(r, r.hops_to_full)
    if r.never_witness:
        return f"never (key {r.never_witness[0]} never reaches query {r.never_witness[1]})"
    return "never"


def _bound(r: AnalysisReport, value) -> str:
    """A hop count or diameter: ``>= v`` from a block quotient with partial blocks (its paths
    over-approximate the token graph's, so distances are lower bounds; "never" stays exact)."""
    return str(value) if r.exact else f">={value}"


def _num(x) -> str:
    return "-" if x is None else f"{x:.4g}"


def _plain(x):
    import sympy

    if is_dataclass(x):
        out = {f.name: _plain(getattr(x, f.name)) for f in fields(x)}
        if isinstance(x, SymbolicCost):
            out = x.to_dict()
        if isinstance(x, CostReport):
            out["asymptotic"] = x.asymptotic
        return out
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, sympy.Basic):
        return str(x)
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return None if not math.isfinite(float(x)) else float(x)
    return x


def _choose_block(L: int, block: int | None) -> int:
    if block is not None:
        if isinstance(block, bool) or not isinstance(block, (int, np.integer)) or block <= 0:
            raise LayoutError(f"block={block!r} must be a positive integer")
        return int(block)
    b = 64
    while -(-L // b) > MAX_BLOCKS:
        b *= 2
    return b


def _auto_level(pattern: Pattern, L: int, block: int, heads: int | None) -> str:
    """``"token"`` when the exact token graph is cheap enough to answer in seconds, else ``"block"``
    (see TOKEN_ALWAYS_MAX, TOKEN_LEVEL_MAX and TOKEN_EDGES_MAX)."""
    if L <= TOKEN_ALWAYS_MAX:
        return "token"
    if L > TOKEN_LEVEL_MAX or pattern.family != "mask":
        return "block"
    from .mask_graph import group_layouts, head_patterns, union_layout

    grps = group_layouts(head_patterns(pattern, heads), L, block)
    return "token" if union_layout(grps).num_blocks * block * block <= TOKEN_EDGES_MAX else "block"


def _too_large(q: Quotient, L: int) -> bool:
    """An auto-chosen token quotient that would take more than seconds to analyze."""
    return L > TOKEN_ALWAYS_MAX and q.adj.nnz > QUOTIENT_EDGES_MAX


def _build(pattern: Pattern, L: int, level: str, block: int, heads: int | None) -> AttentionGraph:
    opts = {"level": level, "block": block}
    if heads is not None:
        opts["heads"] = heads
    try:
        return attention_graph(pattern, L, **opts)
    except TypeError:  # a family builder without level/block options: its own default graph
        return attention_graph(pattern, L)


def analyze(pattern: Pattern, seq_len: int, *, layers: int | None = None, block: int | None = None,
            level: str = "auto", causal: bool | None = None, heads: int | None = None, head_dim: int = 64,
            progress: bool = False, score_mod=None) -> AnalysisReport:
    """Analyze what ``pattern`` can and cannot do at ``seq_len``.

    Args:
        pattern: any pattern whose family registered a graph builder.
        seq_len: L.
        layers: profile the receptive field for exactly this many layers (default: until full
            reach, at most 8; ``hops_to_full`` is exact either way).
        block: block size of layouts and block quotients (default 64, larger past 1M tokens).
        level: ``"token"``, ``"block"`` or ``"auto"`` (token graph up to L = 8192, and up to
            65536 while it has at most 2e7 edges; block quotient beyond).
        causal: treat the pattern as causal (legal pairs ``key <= query``) and check that no
            path leaks a later key to an earlier query; default: whether the graph is causal.
        heads: heads to analyze for opaque per-head masks (the layer is their union).
        head_dim: D for FLOPs and bytes.
        progress: print a progress line on stderr.
        score_mod: a score_mod the pattern runs with. For ``ac.alibi(slopes)`` the report's
            ``score_mod`` field gives per head the distance past which the bias is below -20
            (weights under 2e-9 next to a key at distance 0: effectively masked) and
            ``hops_to_full`` of ``pattern`` with those edges removed; any other score_mod is
            reported as not analyzed, with the reason. The other figures are the mask's.

    Returns:
        A frozen :class:`AnalysisReport`; ``str(report)`` is a table, ``report.to_json()`` JSON.
    """
    t0 = time.perf_counter()
    if isinstance(seq_len, bool) or not isinstance(seq_len, (int, np.integer)) or seq_len <= 0:
        raise LayoutError(f"seq_len={seq_len!r} must be a positive integer")
    if layers is not None and (isinstance(layers, bool) or not isinstance(layers, (int, np.integer)) or layers < 1):
        raise UnsupportedError(f"layers={layers!r} must be a positive integer")
    if level not in ("auto", "token", "block"):
        raise UnsupportedError(f"level={level!r} must be 'auto', 'token' or 'block'")
    L = int(seq_len)
    blk = _choose_block(L, block)
    lvl = _auto_level(pattern, L, blk, heads) if level == "auto" else level
    prog = Progress(progress)
    graph, q, is_causal, leak = _graph_and_quotient(pattern, L, lvl, blk, heads, causal, prog)
    if level == "auto" and graph.block == 1 and _too_large(q, L):
        graph, q, is_causal, leak = _graph_and_quotient(pattern, L, "block", blk, heads, causal, prog)
    lvl = "token" if graph.block == 1 else "block"
    r = reach(q, causal=is_causal, clean=leak is None, layers=layers, progress=prog)
    prog.update("spectrum")
    e = expansion(q)
    prog.update("cost")
    bc = None
    if pattern.family == "mask":
        bc = block_cost(pattern, L, blk, head_dim=head_dim, heads=heads, graph=graph)
        allowed = bc.allowed_pairs
    else:
        allowed = float(layer_operator(graph).nnz) if graph.block == 1 else float(graph.adj.sum())
    sym = symbolic_cost(pattern)
    cost = CostReport(allowed, 4.0 * allowed * head_dim, head_dim, sym, bc)
    notes = list(graph.notes)
    if level == "auto":
        notes.append(_level_note(lvl, q))
    if "not converged" in e.method:
        notes.append(e.method)
    if q.n < q.length and graph.block == 1:
        notes.append(f"{q.label} (exact)")
    if sym is None and pattern.family == "mask":
        notes.append("no closed-form cost: the pattern is not a catalogue entry")
    smr = None
    if score_mod is not None:
        prog.update("score_mod reach")
        smr = score_mod_reach(pattern, L, score_mod, level=lvl, block=blk, heads=heads, causal_graph=is_causal,
                              pattern_causal=graph.causal)
        if smr.analyzed:
            notes.append("score_mod reach assumes comparable raw scores: a key is dropped when its bias alone is "
                         f"below -{smr.threshold:g}")
    prog.done()
    return AnalysisReport(
        pattern=repr(pattern), family=pattern.family, seq_len=L, level=lvl, block=graph.block, causal=is_causal,
        density=allowed / (L * L), hops_to_full=r.hops_to_full, never_witness=r.never_witness,
        diameter=r.diameter, reach_fraction=r.reach_fraction,
        causality_ok=(leak is None) if is_causal else None, causality_witness=leak,
        spectral_gap=e.spectral_gap, slem=e.slem, avg_degree=e.avg_degree, ramanujan_bound=e.ramanujan_bound,
        ramanujan_ratio=e.ramanujan_ratio, conductance_bounds=e.conductance_bounds,
        edge_expansion_bounds=e.edge_expansion_bounds, vertex_expansion=e.vertex_expansion,
        components=e.components, cost=cost, exact=q.exact, graph=q.label, notes=tuple(notes),
        seconds=time.perf_counter() - t0, score_mod=smr)


def _graph_and_quotient(pattern: Pattern, L: int, level: str, block: int, heads: int | None,
                        causal: bool | None, prog: Progress):
    """``(graph, quotient, is_causal, leak)`` at one level."""
    prog.update(f"building {level} graph")
    graph = _build(pattern, L, level, block, heads)
    is_causal = graph.causal if causal is None else bool(causal)
    leak = None
    if is_causal:
        prog.update("causality check")
        leak = None if (graph.causal and graph.block > 1) else causality_witness(graph)
    prog.update("quotient")
    return graph, from_graph(graph, compress=not is_causal), is_causal, leak


def _level_note(level: str, q: Quotient) -> str:
    """Which level ``level="auto"`` chose, and what that means for the figures."""
    if level == "token":
        return "level auto -> token graph: exact"
    how = "exact: every non-empty block is full" if q.exact else "level='token' (--level token) gives exact values, slower"
    return f"level auto -> block quotient: the token graph is too large to answer in seconds ({how})"


def compare_table(reports: list[AnalysisReport], names: list[str] | None = None) -> str:
    """Several reports side by side: density, hops_to_full, gap, cost class.

    ``names`` label the rows (default: each pattern's repr, shortened).
    """
    head = ("pattern", "density", "hops_to_full", "diameter", "spectral_gap", "ramanujan", "cost class", "level")
    rows = [head]
    names = names or [r.pattern if len(r.pattern) <= 48 else r.pattern[:45] + "..." for r in reports]
    for name, r in zip(names, reports):
        rows.append((name, f"{r.density:.4g}",
                     "never" if r.hops_to_full is None else _bound(r, r.hops_to_full),
                     "-" if r.diameter is None else _bound(r, r.diameter),
                     f"{r.spectral_gap:.4g}" + ("" if r.exact else "~"),
                     _num(r.ramanujan_ratio) + ("" if r.exact else "~"), r.cost.asymptotic,
                     "token" if r.level == "token" else f"block {r.block}" + ("" if r.exact else " (bounds)")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    if not all(r.exact for r in reports):
        lines.append(">=: a lower bound and ~: an estimate (block quotient with partial blocks); "
                     "--level token gives exact values, slower")
    return "\n".join(lines)
