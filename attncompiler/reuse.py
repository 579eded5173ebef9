"""Cross-layer attention reuse (Reuse Transformers, Bhojanapalli et al. 2021, arXiv 2110.06821).

A reused head ``h`` of layer ``l`` computes ``softmax(scale * Q_src K_src^T) V_l``: the map of
head ``src`` of layer ``l - 1`` applied to layer ``l``'s own values. In the compiler this is a
cross-layer edge and a common-subexpression decision. The lowering keeps, per layer, the
*effective* Q and K of every head (``[B, H, L, D]``, O(L D), never an L x L map): a reused head's
effective Q/K is its source head's, so chains of reuse resolve to the layer that last computed
its own projections. Reused heads skip their Q/K projections; their scores are recomputed by the
compiled attention from the kept Q/K (the same program, layout and kernel as the source head).

This module holds the plan (:class:`ReusePlan`), the lowering helpers used by
:mod:`attncompiler.nn`, and the cost model (:func:`reuse_savings`). The similarity analysis that
proposes plans is in the second half (:func:`attention_similarity`, :func:`suggest_reuse`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from .errors import InputError, PatternError, UnsupportedError
from .pattern import Family, Pattern

ALL = "all"


@dataclass(frozen=True)
class LayerReuse:
    """Reused heads of one layer: head ``heads[i]`` takes the map of head ``sources[i]`` of the
    previous layer."""

    layer: int
    heads: tuple[int, ...]
    sources: tuple[int, ...]


@dataclass(frozen=True)
class ReusePlan:
    """Which heads of which layers reuse the previous layer's attention.

    Build it with :meth:`ReusePlan.build` from ``{layer: heads}``; ``heads`` is ``"all"``, a
    count ``P`` (the first P heads, as in the paper), a sequence of head indices (each reusing the
    same head of the previous layer) or a mapping ``{head: source_head}``.
    """

    num_layers: int
    num_heads: int
    layers: tuple[LayerReuse, ...] = ()

    @staticmethod
    def build(spec: Mapping[int, Any] | ReusePlan | None, num_layers: int, num_heads: int) -> ReusePlan:
        """Normalize and validate a reuse specification.

        Raises:
            PatternError: layer 0 or an out-of-range layer/head, a head listed twice, a bad value.
        """
        if isinstance(spec, ReusePlan):
            if (spec.num_layers, spec.num_heads) != (num_layers, num_heads):
                raise PatternError(f"plan for {spec.num_layers} layers x {spec.num_heads} heads used with a "
                                   f"model of {num_layers} layers x {num_heads} heads")
            return spec
        if spec is None:
            return ReusePlan(num_layers, num_heads)
        if not isinstance(spec, Mapping):
            raise PatternError(f"reuse={spec!r} must be a mapping {{layer: heads}}, e.g. {{1: 'all', 3: [0, 1]}}")
        out = []
        for layer in sorted(spec, key=lambda x: (not isinstance(x, int), x if isinstance(x, int) else 0)):
            if isinstance(layer, bool) or not isinstance(layer, int) or not 1 <= layer < num_layers:
                raise PatternError(f"reuse layer {layer!r} must be an integer in [1, {num_layers - 1}] "
                                   "(layer 0 has no previous layer to reuse)")
            mapping = _head_mapping(spec[layer], layer, num_heads)
            if mapping:
                heads = tuple(sorted(mapping))
                out.append(LayerReuse(layer, heads, tuple(mapping[h] for h in heads)))
        return ReusePlan(num_layers, num_heads, tuple(out))

    def sources(self, layer: int) -> dict[int, int]:
        """``{head: source head in layer - 1}`` for the reused heads of ``layer`` (empty if none)."""
        for lr in self.layers:
            if lr.layer == layer:
                return dict(zip(lr.heads, lr.sources))
        return {}

    @property
    def reused_heads(self) -> int:
        """Total number of reused (layer, head) pairs."""
        return sum(len(lr.heads) for lr in self.layers)

    def to_spec(self) -> dict[int, dict[int, int]]:
        """A plain ``{layer: {head: source}}`` dict (what :meth:`build` accepts; JSON-friendly)."""
        return {lr.layer: dict(zip(lr.heads, lr.sources)) for lr in self.layers}

    def __str__(self) -> str:
        if not self.layers:
            return f"ReusePlan({self.num_layers} layers x {self.num_heads} heads: no reuse)"
        parts = []
        for lr in self.layers:
            if lr.heads == lr.sources:
                hs = "all" if len(lr.heads) == self.num_heads else list(lr.heads)
            else:
                hs = dict(zip(lr.heads, lr.sources))
            parts.append(f"{lr.layer}: {hs}")
        return (f"ReusePlan({self.num_layers} layers x {self.num_heads} heads, "
                f"{self.reused_heads} heads reused: {{{', '.join(parts)}}})")


def _head_mapping(value: Any, layer: int, num_heads: int) -> dict[int, int]:
    def check(h, what):
        if isinstance(h, bool) or not isinstance(h, int) or not 0 <= h < num_heads:
            raise PatternError(f"reuse[{layer}]: {what} {h!r} must be a head index in [0, {num_heads - 1}]")
        return int(h)

    if isinstance(value, str):
        if value != ALL:
            raise PatternError(f"reuse[{layer}]={value!r}: the only string accepted is 'all'")
        return {h: h for h in range(num_heads)}
    if isinstance(value, int) and not isinstance(value, bool):
        if not 0 <= value <= num_heads:
            raise PatternError(f"reuse[{layer}]={value}: a head count must be in [0, {num_heads}]")
        return {h: h for h in range(value)}
    if isinstance(value, Mapping):
        return {check(h, "head"): check(s, "source head") for h, s in value.items()}
    if isinstance(value, Sequence):
        heads = [check(h, "head") for h in value]
        if len(set(heads)) != len(heads):
            raise PatternError(f"reuse[{layer}]={list(value)} lists a head twice")
        return {h: h for h in heads}
    raise PatternError(f"reuse[{layer}]={value!r} must be 'all', a head count, a list of heads or "
                       "a {head: source_head} mapping")


# ---------------------------------------------------------------------------------------------
# Lowering: where each head's attention map comes from
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HeadSource:
    """The layer and head whose projections and attention module compute a head's map."""

    layer: int
    head: int


class ReusePatternMode:
    """What to do when a reused layer's pattern differs from the layer it reuses."""

    SAME = "same"          # error (default): a reused map must be computed with one pattern
    PREVIOUS = "previous"  # allowed: reused heads keep the reused layer's pattern


def resolve_sources(plan: ReusePlan, patterns: Sequence[Pattern], mode: str = ReusePatternMode.SAME
                    ) -> tuple[tuple[HeadSource, ...], ...]:
    """For every layer and head, the (layer, head) that really computes its attention map.

    Chains resolve: if head 0 of layer 2 reuses layer 1 which reuses layer 0, its source is
    (0, 0). The source layer's attention module (and therefore its pattern) computes the map.

    Raises:
        PatternError: a reused layer's pattern differs from the reused layer's and ``mode`` is
            ``"same"``; or a head reuses a differently-patterned head of a per-head pattern.
    """
    if mode not in (ReusePatternMode.SAME, ReusePatternMode.PREVIOUS):
        raise PatternError(f"reuse_pattern={mode!r} must be 'same' or 'previous'")
    H = plan.num_heads
    table: list[tuple[HeadSource, ...]] = []
    for layer in range(plan.num_layers):
        src = plan.sources(layer)
        row = []
        for h in range(H):
            if h not in src:
                row.append(HeadSource(layer, h))
                continue
            s = src[h]
            if mode == ReusePatternMode.SAME:
                _check_same_pattern(patterns, layer, h, s)
            row.append(table[layer - 1][s])
        table.append(tuple(row))
    return tuple(table)


def _check_same_pattern(patterns: Sequence[Pattern], layer: int, h: int, s: int) -> None:
    cur, prev = patterns[layer], patterns[layer - 1]
    if cur != prev:
        raise PatternError(
            f"layer {layer} reuses head {s} of layer {layer - 1}, but the layers' patterns differ: "
            f"layer {layer - 1} uses {prev!r}, layer {layer} uses {cur!r}. A reused head repeats the "
            f"previous layer's attention map, which is computed with the previous layer's pattern. "
            f"Give both layers the same pattern, or pass reuse_pattern='previous' to accept that the "
            f"reused heads of layer {layer} attend with {prev!r}")
    if cur.family == Family.MASK and cur.head_period != 1 and cur.specialize(0, h) != cur.specialize(0, s):
        raise PatternError(
            f"layer {layer} head {h} reuses head {s} of layer {layer - 1}, but the per-head pattern "
            f"{cur!r} gives them different masks ({cur.specialize(0, s)!r} vs {cur.specialize(0, h)!r}); "
            f"reuse the same head index or pass reuse_pattern='previous'")


def select_heads(t: torch.Tensor, heads: Sequence[int]) -> torch.Tensor:
    """``t[:, heads]`` for ``t [B, H, L, D]``: a view when the heads are a contiguous range."""
    heads = list(heads)
    if heads == list(range(heads[0], heads[-1] + 1)):
        return t[:, heads[0]:heads[-1] + 1]  # [B, len(heads), L, D]
    return t.index_select(1, torch.tensor(heads, device=t.device))


def merge_heads(parts: Sequence[tuple[Sequence[int], torch.Tensor]], num_heads: int) -> torch.Tensor:
    """Assemble ``[B, H, L, D]`` from ``(head indices, [B, len, L, D])`` parts covering every head
    once (differentiable: one concatenation and one index_select)."""
    if len(parts) == 1:
        heads, t = parts[0]
        if list(heads) == list(range(num_heads)):
            return t
    order = [h for heads, _ in parts for h in heads]
    cat = torch.cat([t for _, t in parts], dim=1)  # [B, H, L, D] in `order`
    inverse = torch.empty(num_heads, dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(num_heads)
    return cat.index_select(1, inverse.to(cat.device))


# ---------------------------------------------------------------------------------------------
# Cost model
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LayerSavings:
    """FLOPs and activation bytes of one layer, and what its reused heads save."""

    layer: int
    pattern: str
    reused: int
    flops: int
    score_flops: int
    flops_saved: int
    score_flops_saved: int
    activation_bytes: int
    activation_bytes_saved: int


@dataclass(frozen=True)
class ReuseSavings:
    """Per-layer and whole-stack savings of a reuse plan (see :func:`reuse_savings`).

    ``score_flops`` counts QK^T and PV over the non-empty blocks the kernels compute. This
    lowering recomputes a reused head's scores from the kept Q/K, so it saves the Q/K
    projections and their activations; ``score_flops_saved`` is what the paper's stored-map
    variant would save in addition (reported for comparison, not realized here).
    """

    seq_len: int
    batch: int
    layers: tuple[LayerSavings, ...]

    @property
    def flops(self) -> int:
        return sum(r.flops for r in self.layers)

    @property
    def flops_saved(self) -> int:
        return sum(r.flops_saved for r in self.layers)

    @property
    def score_flops(self) -> int:
        return sum(r.score_flops for r in self.layers)

    @property
    def score_flops_saved(self) -> int:
        return sum(r.score_flops_saved for r in self.layers)

    @property
    def activation_bytes(self) -> int:
        return sum(r.activation_bytes for r in self.layers)

    @property
    def activation_bytes_saved(self) -> int:
        return sum(r.activation_bytes_saved for r in self.layers)

    def __str__(self) -> str:
        head = (f"{'layer':>5} {'reused':>6} {'GFLOP':>9} {'saved':>8} {'score GFLOP':>11} "
                f"{'(stored-map)':>12} {'act MB':>8} {'saved':>7}  pattern")
        lines = [f"reuse savings at seq_len={self.seq_len}, batch={self.batch} "
                 "(realized: Q/K projections and activations; stored-map column: paper variant)", head]
        for r in self.layers:
            lines.append(f"{r.layer:>5} {r.reused:>6} {r.flops / 1e9:>9.2f} {r.flops_saved / 1e9:>8.2f} "
                         f"{r.score_flops / 1e9:>11.2f} {r.score_flops_saved / 1e9:>12.2f} "
                         f"{r.activation_bytes / 2**20:>8.1f} {r.activation_bytes_saved / 2**20:>7.1f}  {r.pattern}")
        f = self.flops_saved / max(self.flops, 1)
        a = self.activation_bytes_saved / max(self.activation_bytes, 1)
        s = self.score_flops_saved / max(self.score_flops, 1)
        lines.append(f"stack: {self.flops / 1e9:.2f} GFLOP, saved {self.flops_saved / 1e9:.2f} ({f:.1%}); "
                     f"activations {self.activation_bytes / 2**20:.1f} MB, saved {a:.1%}; "
                     f"attention-score FLOPs saved 0 here, {s:.1%} with stored maps")
        return "\n".join(lines)


def computed_pairs(pattern: Pattern, seq_len: int, heads: int, block: int = 64) -> list[int]:
    """Per head, the (q, k) pairs a block-sparse kernel computes (non-empty blocks x block area);
    L * L for families without a block layout."""
    if pattern.family != Family.MASK:
        return [seq_len * seq_len] * heads
    layout = pattern.layout(seq_len, seq_len, block, block, heads=heads)
    return [layout.group_for(0, h).num_blocks * block * block for h in range(heads)]


def reuse_savings(model, seq_len: int, batch: int = 1, *, plan: ReusePlan | Mapping | None = None,
                  dtype_bytes: int = 4, block: int = 64) -> ReuseSavings:
    """FLOPs and activation memory of a :class:`~attncompiler.nn.TransformerStack` and what a
    reuse plan saves, per layer and for the stack.

    Args:
        model: a ``TransformerStack`` (anything with ``d_model``, ``num_heads``, ``patterns``,
            ``mlp_hidden`` and ``plan``).
        seq_len: sequence length L.
        batch: batch size B.
        plan: a plan to evaluate instead of the model's own.
        dtype_bytes: bytes per activation element.
        block: block size used to count computed score pairs.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len <= 0:
        raise InputError(f"seq_len={seq_len!r} must be a positive integer")
    E, H = model.d_model, model.num_heads
    D = E // H
    plan = model.plan if plan is None else ReusePlan.build(plan, len(model.patterns), H)
    B, L = batch, seq_len
    proj = 2 * B * L * E * D  # one head's share of one projection
    rows = []
    for layer, pattern in enumerate(model.patterns):
        reused = len(plan.sources(layer))
        pairs = computed_pairs(pattern, L, H, block)
        score = sum(2 * B * p * D * 2 for p in pairs)  # QK^T and PV
        saved_score = sum(2 * B * pairs[h] * D for h in plan.sources(layer))  # QK^T of reused heads
        mlp = 2 * 2 * B * L * E * model.mlp_hidden
        flops = 4 * H * proj + score + mlp
        acts = dtype_bytes * B * L * (4 * E + 2 * model.mlp_hidden)  # q, k, v, attention out; MLP
        rows.append(LayerSavings(layer, repr(pattern), reused, flops, score, 2 * reused * proj, saved_score,
                                 acts, dtype_bytes * 2 * reused * B * L * D))
    return ReuseSavings(L, B, tuple(rows))


# ---------------------------------------------------------------------------------------------
# Similarity analysis
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class LayerAttention:
    """What one layer attended with: effective ``q, k [B, H, L, D]``, the scale, and per head
    the pattern (and the head index it is evaluated at) that masks its map."""

    q: torch.Tensor
    k: torch.Tensor
    scale: float
    head_patterns: tuple[tuple[Pattern, int], ...]


@dataclass(frozen=True)
class PairSimilarity:
    """Similarity of layer ``layer`` to layer ``layer - 1``: for each head of ``layer``, the best
    matching head of ``layer - 1`` and its similarity (1 - mean total-variation distance)."""

    layer: int
    best: tuple[float, ...]
    best_head: tuple[int, ...]
    matrix: tuple[tuple[float, ...], ...]  # [head of layer, head of layer - 1]

    @property
    def mean(self) -> float:
        return sum(self.best) / len(self.best)


@dataclass(frozen=True)
class SimilarityReport:
    """Adjacent-layer attention similarity of a model on given inputs."""

    num_layers: int
    num_heads: int
    pairs: tuple[PairSimilarity, ...]

    def __str__(self) -> str:
        H = self.num_heads
        lines = ["attention similarity of adjacent layers (best-matching head, 1 - mean TV distance)",
                 f"{'layers':>8} {'mean':>6}  " + " ".join(f"h{h:<5}" for h in range(H))]
        for p in self.pairs:
            cells = " ".join(f"{s:.3f}{'' if j == h else '*'}".ljust(6) for h, (s, j) in
                             enumerate(zip(p.best, p.best_head)))
            lines.append(f"{p.layer - 1:>3}->{p.layer:<4} {p.mean:>6.3f}  {cells}")
        lines.append("(* best match is a different head of the previous layer)")
        return "\n".join(lines)


def _probabilities(la: LayerAttention, rows: slice, L: int) -> torch.Tensor:
    """Attention probabilities of query rows ``rows`` for all heads: ``[B, H, R, L]`` (float64;
    rows with no visible key are zero)."""
    q = la.q[:, :, rows].double()  # [B, H, R, D]
    s = torch.matmul(q, la.k.double().transpose(-1, -2)) * la.scale  # [B, H, R, L]
    q_idx = torch.arange(rows.start, rows.stop)[:, None]
    k_idx = torch.arange(L)[None, :]
    B = q.shape[0]
    masks = []
    for h, (pattern, eval_h) in enumerate(la.head_patterns):
        if pattern.family != Family.MASK:
            raise UnsupportedError(f"attention_similarity needs mask patterns; head {h} uses the "
                                   f"{pattern.family} pattern {pattern!r}")
        per_b = [pattern.specialize(b, eval_h).evaluate(b, eval_h, q_idx, k_idx, L, L)
                 for b in range(B if pattern.batch_dependent else 1)]
        masks.append(torch.stack(per_b))  # [Bm, R, L]
    mask = torch.stack(masks, dim=1)  # [Bm, H, R, L]
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.nan_to_num(p, nan=0.0)  # all-masked rows: zeros


def map_similarity(a: LayerAttention, b: LayerAttention, *, block_rows: int | None = None) -> torch.Tensor:
    """``[H_b, H_a]`` similarity 1 - mean_rows TV(P_b[i, row], P_a[j, row]), computed over query
    blocks of ``block_rows`` rows so memory stays O(block_rows * L) per head."""
    B, Ha, L, _ = a.q.shape
    Hb = b.q.shape[1]
    if block_rows is None:
        block_rows = max(1, (1 << 22) // max(1, B * max(Ha, Hb) * L))
    tv = torch.zeros(Hb, Ha, dtype=torch.float64)
    for r0 in range(0, L, block_rows):
        rows = slice(r0, min(L, r0 + block_rows))
        pa = _probabilities(a, rows, L)  # [B, Ha, R, L]
        pb = _probabilities(b, rows, L)  # [B, Hb, R, L]
        for i in range(Hb):
            tv[i] += 0.5 * (pb[:, i:i + 1] - pa).abs().sum(dim=-1).sum(dim=(0, 2))  # [Ha]
    return 1.0 - tv / (B * L)


def attention_similarity(model, inputs: torch.Tensor, *, block_rows: int | None = None) -> SimilarityReport:
    """Per pair of adjacent layers, the best-matching-head attention similarity (the paper's
    measure: 1 - mean total-variation distance between attention rows).

    Args:
        model: a ``TransformerStack`` (or any module with ``attention_inputs(inputs)`` returning
            a list of :class:`LayerAttention`).
        inputs: the model's input, e.g. ``[B, L, d_model]`` for a stack.
        block_rows: query rows per block (default: about 4M probabilities per block).
    """
    if not hasattr(model, "attention_inputs"):
        raise InputError(f"attention_similarity needs a model built with attncompiler.nn, got {type(model).__name__}")
    with torch.no_grad():
        layers = model.attention_inputs(inputs)
    pairs = []
    for l in range(1, len(layers)):
        m = map_similarity(layers[l - 1], layers[l], block_rows=block_rows)
        best, arg = m.max(dim=1)
        pairs.append(PairSimilarity(l, tuple(best.tolist()), tuple(arg.tolist()),
                                    tuple(tuple(r) for r in m.tolist())))
    H = layers[0].q.shape[1] if layers else 0
    return SimilarityReport(len(layers), H, tuple(pairs))


def suggest_reuse(report: SimilarityReport, threshold: float = 0.9, *, same_head: bool = False,
                  max_layers: int | None = None) -> ReusePlan:
    """Propose a plan: every head whose best similarity to the previous layer is at least
    ``threshold`` reuses that best-matching head (or, with ``same_head``, reuses its own index
    when that similarity passes). ``max_layers`` keeps only the most similar layers.
    """
    if not 0.0 <= threshold <= 1.0:
        raise InputError(f"threshold={threshold!r} must be in [0, 1]")
    chosen = {}
    for p in report.pairs:
        if same_head:
            m = {h: h for h in range(report.num_heads) if p.matrix[h][h] >= threshold}
        else:
            m = {h: j for h, (s, j) in enumerate(zip(p.best, p.best_head)) if s >= threshold}
        if m:
            chosen[p.layer] = m
    if max_layers is not None and len(chosen) > max_layers:
        by_mean = sorted(chosen, key=lambda l: -report.pairs[l - 1].mean)[:max_layers]
        chosen = {l: chosen[l] for l in by_mean}
    return ReusePlan.build(chosen, report.num_layers, report.num_heads)
