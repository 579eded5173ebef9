"""Attention similarity of adjacent layers and reuse plans proposed from it.

Reuse Transformers (Bhojanapalli et al. 2021) measure how similar two attention maps are as
1 - the mean total-variation distance between their rows, and reuse a head where the best
matching head of the previous layer is similar enough. Maps are computed blockwise from each
layer's effective Q/K (``O(block_rows * L)`` memory per head), never as whole L x L matrices.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import InputError, UnsupportedError
from ...dsl.pattern import Family, Pattern
from .plan import ReusePlan

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
