"""What a score_mod does to a pattern's reach: effectively masked edges of distance-decaying biases.

ALiBi adds ``slope[h] * (kv_idx - q_idx)`` to every score: past a head's distance
``Alibi.reach(threshold)`` the bias is below ``-threshold`` (weights under ``exp(-20)`` = 2e-9
for the default 20, next to a key at distance 0), so those edges are effectively masked. The
effectively-masked graph of head ``h`` is ``pattern & (q - k < reach[h])`` (a negative slope
decays towards later keys instead: ``k - q < reach``); its ``hops_to_full``
stands next to the mask's own in :class:`~attncompiler.analysis.report.AnalysisReport`.
Other score_mods are not analyzed: :func:`score_mod_reach` says so, with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..dsl.pattern import Pattern, causal
from ..dsl.primitives import sliding_window
from ..dsl.score_mod import Alibi
from .graph import attention_graph
from .quotient import from_graph
from .reach import causality_witness, reach

# A bias below -THRESHOLD gives weights under exp(-THRESHOLD) relative to an unbiased key.
THRESHOLD = 20.0


@dataclass(frozen=True)
class ScoreModReach:
    """The reach of a pattern under a score_mod's effective mask.

    Attributes:
        score_mod: the score_mod's repr.
        reason: why it was not analyzed (None when it was).
        threshold: a bias below ``-threshold`` counts as masked.
        distance: per head, the smallest distance ``|q - k|`` whose bias is below ``-threshold``
            (None: a zero slope, the bias never decays).
        side: per head, where the bias decays: ``"past"`` (keys before the query, a positive
            slope), ``"future"`` (a negative slope) or None.
        hops_per_head: per head, ``hops_to_full`` of the pattern without the keys at or past
            ``distance`` on ``side`` (None: never).
        hops_to_full: the worst head's (None when some head never reaches every legal pair).
        exact: False when the hops come from a block quotient (lower bounds).
    """

    score_mod: str
    reason: str | None
    threshold: float = THRESHOLD
    distance: tuple[int | None, ...] | None = None
    side: tuple[str | None, ...] | None = None
    hops_per_head: tuple[int | None, ...] | None = None
    hops_to_full: int | None = None
    exact: bool = True

    @property
    def analyzed(self) -> bool:
        """Whether the score_mod's effect on reach was computed."""
        return self.reason is None

    def summary(self) -> str:
        """One line for the report table."""
        if not self.analyzed:
            return f"not analyzed: {self.reason}"
        ge = "" if self.exact else ">="

        def fmt(v, never):
            return never if v is None else f"{ge}{v}"

        worst = fmt(self.hops_to_full, "never")
        dist = " ".join("-" if d is None else (f"+{d}" if sd == "future" else str(d))
                        for d, sd in zip(self.distance, self.side))
        hops = " ".join(fmt(h, "never") for h in self.hops_per_head)
        return (f"hops_to_full {worst} (worst head); masked from distance per head [{dist}] "
                f"(bias < -{self.threshold:g}; +: later keys); hops per head [{hops}]")


def effective_pattern(pattern: Pattern, distance: int | None, pattern_causal: bool = False,
                      future: bool = False) -> Pattern:
    """``pattern`` without its keys at distance ``>= distance`` on the side where the bias
    decays: past keys (``q - k``, a positive ALiBi slope) or, with ``future``, later keys
    (``k - q``, a negative slope); the other side keeps its keys. ``distance=None`` leaves the
    pattern unchanged. ``pattern_causal``: the pattern has no key after its query."""
    if distance is None or (future and pattern_causal):
        return pattern
    near = sliding_window(distance - 1)
    if pattern_causal:
        return pattern & near
    return pattern & (near | (causal() if future else ~causal()))


def score_mod_reach(pattern: Pattern, seq_len: int, score_mod, *, level: str, block: int, heads: int | None,
                    causal_graph: bool, pattern_causal: bool, threshold: float = THRESHOLD) -> ScoreModReach:
    """The effect of ``score_mod`` on the reach of ``pattern`` at ``seq_len`` (see module doc).

    ``level``, ``block`` and ``heads`` build the graphs as :func:`~.report.analyze` did;
    ``causal_graph``: legal pairs are ``key <= query``; ``pattern_causal``: the pattern itself
    has no key after its query.
    """
    name = repr(score_mod)
    if not isinstance(score_mod, Alibi):
        return ScoreModReach(name, "only distance-decaying biases (ac.alibi) are analyzed; the graph above is the "
                                   "mask's, without this score_mod's weights", threshold)
    if pattern.family != "mask":
        return ScoreModReach(name, f"ALiBi reach is analyzed for mask patterns, not the {pattern.family} family",
                             threshold)
    slopes = score_mod.slopes.detach().double().cpu()
    # Alibi.reach of |slope|: a negative slope decays towards later keys instead
    reach_abs = Alibi(slopes.abs()).reach(threshold)
    distance = tuple(d if s != 0 else None for d, s in zip(reach_abs, slopes.tolist()))
    side = tuple(None if s == 0 else ("future" if s < 0 else "past") for s in slopes.tolist())
    hops: dict[tuple, int | None] = {}
    exact = True
    for d, sd in zip(distance, side):
        if (d, sd) in hops:
            continue
        opts = {"level": level, "block": block} | ({} if heads is None else {"heads": heads})
        eff = effective_pattern(pattern, d, pattern_causal, future=sd == "future")
        graph = attention_graph(eff, seq_len, **opts)
        leak = causality_witness(graph) if causal_graph and graph.block == 1 else None
        q = from_graph(graph, compress=not causal_graph)
        r = reach(q, causal=causal_graph, clean=leak is None)
        hops[d, sd] = r.hops_to_full
        exact = exact and q.exact
    per_head = tuple(hops[key] for key in zip(distance, side))
    worst = None if any(h is None for h in per_head) else max(per_head)
    return ScoreModReach(name, None, threshold, distance, side, per_head, worst, exact)
