"""Cross-layer attention reuse (Reuse Transformers, Bhojanapalli et al. 2021, arXiv 2110.06821).

A reused head ``h`` of layer ``l`` computes ``softmax(scale * Q_src K_src^T) V_l``: the map of
head ``src`` of layer ``l - 1`` applied to layer ``l``'s own values. In the compiler this is a
cross-layer edge and a common-subexpression decision; how the edge is lowered is a schedule
choice (:class:`ReuseSchedule`):

* ``stored_probs`` (the paper's variant; default where the torch backend runs the source
  layer): the source layer's attention also returns its probabilities P over its block layout
  (O(non-empty blocks x block area), never L x L) and a reused head computes only ``P @ V_l``:
  no Q/K projections, no QK^T, no softmax. Gradients from every use of P meet in the source
  layer's softmax backward.
* ``recompute``: the lowering keeps, per layer, the *effective* Q and K of every head
  (``[B, H, L, D]``, O(L D)): a reused head's effective Q/K is its source head's, so chains of
  reuse resolve to the layer that last computed its own projections, and its scores are
  recomputed by the compiled attention (same program, layout and kernel as the source head).
  Reused heads still skip their Q/K projections. Used by the Triton backend, by per-head or
  per-batch patterns and by the similarity analysis (which needs the effective Q/K).

This module holds the plan (:class:`ReusePlan`), the lowering helpers used by
:mod:`attncompiler.nn`, and the cost model (:func:`reuse_savings`). The similarity analysis that
proposes plans is in :mod:`attncompiler.families.reuse.similarity` (re-exported here).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from ...errors import InputError, PatternError
from ...dsl.pattern import Family, Pattern

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


class ReuseSchedule:
    """How reused heads get their map (see the module docstring)."""

    AUTO = "auto"                  # stored_probs where every source layer supports it, else recompute
    STORED_PROBS = "stored_probs"  # source layers keep P over their layout; reused heads compute P @ V
    RECOMPUTE = "recompute"        # reused heads recompute scores from the kept Q/K

    ALL = (AUTO, STORED_PROBS, RECOMPUTE)


def stored_heads(table: Sequence[Sequence[HeadSource]]) -> tuple[tuple[tuple[int, ...], int], ...]:
    """Per layer, ``(heads, last layer)``: its own heads whose map a later layer reuses (their
    probabilities must be kept) and the last layer that reads them (-1 when none).

    ``table`` is :func:`resolve_sources`' result (chains already resolved to the computing layer).
    """
    keep: list[set[int]] = [set() for _ in table]
    last = [-1] * len(table)
    for layer, row in enumerate(table):
        for s in row:
            if s.layer != layer:
                keep[s.layer].add(s.head)
                last[s.layer] = max(last[s.layer], layer)
    return tuple((tuple(sorted(k)), l) for k, l in zip(keep, last))


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
    """FLOPs and activation bytes of one layer, and what its reused heads save.

    ``score_flops_saved`` is the QK^T of the reused heads (what the stored-probabilities
    schedule skips); ``probs_bytes`` is the memory that schedule keeps for this layer's
    probabilities reused by later layers (one value per computed (q, k) pair and stored head).
    """

    layer: int
    pattern: str
    reused: int
    flops: int
    score_flops: int
    flops_saved: int
    score_flops_saved: int
    activation_bytes: int
    activation_bytes_saved: int
    probs_bytes: int = 0


@dataclass(frozen=True)
class ReuseSavings:
    """Per-layer and whole-stack savings of a reuse plan under a schedule (see :func:`reuse_savings`).

    ``score_flops`` counts QK^T and PV over the non-empty blocks the kernels compute.
    Both schedules save the reused heads' Q/K projections and their activations;
    ``stored_probs`` also saves their QK^T (and softmax) and counts it in ``flops_saved``,
    while ``recompute`` does not (``score_flops_saved`` is then what stored maps would save).
    """

    seq_len: int
    batch: int
    layers: tuple[LayerSavings, ...]
    schedule: str = ReuseSchedule.RECOMPUTE

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
    def realized_score_flops_saved(self) -> int:
        """Attention-score FLOPs this schedule really skips."""
        return self.score_flops_saved if self.schedule == ReuseSchedule.STORED_PROBS else 0

    @property
    def activation_bytes(self) -> int:
        return sum(r.activation_bytes for r in self.layers)

    @property
    def activation_bytes_saved(self) -> int:
        return sum(r.activation_bytes_saved for r in self.layers)

    @property
    def probs_bytes(self) -> int:
        return sum(r.probs_bytes for r in self.layers)

    def __str__(self) -> str:
        head = (f"{'layer':>5} {'reused':>6} {'GFLOP':>9} {'saved':>8} {'score GFLOP':>11} "
                f"{'QK^T saved':>10} {'act MB':>8} {'saved':>7} {'P kept MB':>9}  pattern")
        lines = [f"reuse savings at seq_len={self.seq_len}, batch={self.batch}, schedule={self.schedule}", head]
        for r in self.layers:
            lines.append(f"{r.layer:>5} {r.reused:>6} {r.flops / 1e9:>9.2f} {r.flops_saved / 1e9:>8.2f} "
                         f"{r.score_flops / 1e9:>11.2f} {r.score_flops_saved / 1e9:>10.2f} "
                         f"{r.activation_bytes / 2**20:>8.1f} {r.activation_bytes_saved / 2**20:>7.1f} "
                         f"{r.probs_bytes / 2**20:>9.1f}  {r.pattern}")
        f = self.flops_saved / max(self.flops, 1)
        a = self.activation_bytes_saved / max(self.activation_bytes, 1)
        s = self.score_flops_saved / max(self.score_flops, 1)
        realized = (f"attention-score FLOPs saved {s:.1%}; probabilities kept {self.probs_bytes / 2**20:.1f} MB"
                    if self.schedule == ReuseSchedule.STORED_PROBS else
                    f"attention-score FLOPs saved 0 (recomputed), {s:.1%} with stored_probs")
        lines.append(f"stack: {self.flops / 1e9:.2f} GFLOP, saved {self.flops_saved / 1e9:.2f} ({f:.1%}); "
                     f"Q/K activations saved {a:.1%} of {self.activation_bytes / 2**20:.1f} MB; {realized}")
        return "\n".join(lines)


def computed_pairs(pattern: Pattern, seq_len: int, heads: int, block: int = 64) -> list[int]:
    """Per head, the (q, k) pairs a block-sparse kernel computes (non-empty blocks x block area);
    L * L for families without a block layout."""
    if pattern.family != Family.MASK:
        return [seq_len * seq_len] * heads
    layout = pattern.layout(seq_len, seq_len, block, block, heads=heads)
    return [layout.group_for(0, h).num_blocks * block * block for h in range(heads)]


def reuse_savings(model, seq_len: int, batch: int = 1, *, plan: ReusePlan | Mapping | None = None,
                  schedule: str | None = None, dtype_bytes: int = 4, block: int = 64) -> ReuseSavings:
    """FLOPs and activation memory of a :class:`~attncompiler.nn.TransformerStack` and what a
    reuse plan saves, per layer and for the stack.

    Args:
        model: a ``TransformerStack`` (anything with ``d_model``, ``num_heads``, ``patterns``,
            ``mlp_hidden`` and ``plan``).
        seq_len: sequence length L.
        batch: batch size B.
        plan: a plan to evaluate instead of the model's own.
        schedule: ``"stored_probs"`` or ``"recompute"``; default: what the model runs on CPU
            (``model.resolved_reuse_schedule()``), else ``"recompute"``.
        dtype_bytes: bytes per activation element.
        block: block size used to count computed score pairs.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len <= 0:
        raise InputError(f"seq_len={seq_len!r} must be a positive integer")
    if schedule is None:
        resolve = getattr(model, "resolved_reuse_schedule", None)
        schedule = resolve() if resolve is not None else ReuseSchedule.RECOMPUTE
    if schedule not in (ReuseSchedule.STORED_PROBS, ReuseSchedule.RECOMPUTE):
        raise InputError(f"schedule={schedule!r} must be 'stored_probs' or 'recompute'")
    stored = schedule == ReuseSchedule.STORED_PROBS
    E, H = model.d_model, model.num_heads
    D = E // H
    plan = model.plan if plan is None else ReusePlan.build(plan, len(model.patterns), H)
    keep = stored_heads(resolve_sources(plan, model.patterns, ReusePatternMode.PREVIOUS)) if stored else None
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
        probs = dtype_bytes * B * sum(pairs[h] for h in keep[layer][0]) if stored else 0
        rows.append(LayerSavings(layer, repr(pattern), reused, flops, score,
                                 2 * reused * proj + (saved_score if stored else 0), saved_score,
                                 acts, dtype_bytes * 2 * reused * B * L * D, probs))
    return ReuseSavings(L, B, tuple(rows), schedule)

