"""Diffusion program stages and lowering: P once over the base layout, then K hops; the
recompute-hops pass (P recomputed in every hop) and the default block size.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from ...dsl.pattern import Intersection, Pattern, Union, intersection, union
from ...dsl.primitives import GlobalTokens, global_tokens
from ...program.schedule import Schedule
from ...program.stages import BlockSparseAttention, Program, Stage
from .pattern import DIFFUSION, Diffusion

# ---------------------------------------------------------------------------------------------
# Program stages and lowering
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GlobalSplit:
    """A base graph ``(rest | global_tokens(G)) & within`` cut into its thin and sparse parts.

    Global tokens make whole query rows and key columns dense; in a block layout they drag
    whole blocks into every row, which the block-sparse stages would compute and store for a
    handful of true pairs. Split apart, the rows ``q in G`` are one dense ``[|G|, L]`` product,
    the columns ``k in G`` one thin ``[L, |G|]`` product, and only ``light`` (the pairs with
    neither end global) goes through the block layout. P's row-softmax still spans all parts.

    Attributes:
        light: ``rest & within & ~global_tokens(G)``: the pairs with neither end in ``G``.
        tokens: the global token positions ``G``, sorted.
        within: the mask every global pair must also satisfy (e.g. ``causal()``), or None.
    """

    light: Pattern
    tokens: tuple[int, ...]
    within: Pattern | None


# Splitting pays while the dense rows and columns stay thin next to the block-sparse part.
_MAX_SPLIT_TOKENS = 256


@functools.lru_cache(maxsize=256)
def split_global_tokens(base: Pattern) -> GlobalSplit | None:
    """Schedule decision: the :class:`GlobalSplit` of ``base``, or None when it has no global
    tokens at the top (``a | global_tokens(G)`` or ``(a | global_tokens(G)) & m``), depends on
    the batch or head, or has more than 256 global tokens."""
    within: Pattern | None = None
    node = base
    if isinstance(base, Intersection):
        unions = [p for p in base.parts if isinstance(p, Union) and any(isinstance(x, GlobalTokens) for x in p.parts)]
        if len(unions) != 1:
            return None
        node = unions[0]
        others = [p for p in base.parts if p is not node]
        within = intersection(*others) if others else None
    if not isinstance(node, Union) or base.head_period != 1 or base.batch_dependent:
        return None
    if any(isinstance(p, GlobalTokens) and p.clip for p in node.parts):
        return None  # which tokens exist depends on the length; the unsplit path handles them
    tokens = sorted({i for p in node.parts if isinstance(p, GlobalTokens) for i in p.indices})
    rest = [p for p in node.parts if not isinstance(p, GlobalTokens)]
    if not tokens or not rest or len(tokens) > _MAX_SPLIT_TOKENS:
        return None
    light = union(*rest) & ~global_tokens(tokens)
    if within is not None:
        light = light & within
    return GlobalSplit(light, tuple(tokens), within)


@dataclass(frozen=True)
class SparseProbs(Stage):
    """``probs = rowsoftmax(scale * q k^T)`` over the base layout, kept block-sparse (with the
    call's score_mod, ``rowsoftmax(score_mod(scale * q k^T, b, h, i, j))``).

    Shapes: q ``[B, H, L, D]``, k ``[B, Hkv, L, D]`` -> probs: one ``[R, BM, W]`` tile per
    chunk of query blocks (O(nnz) memory; empty rows are zero). With ``split_globals`` (a
    schedule choice, see :func:`split_global_tokens`) the global rows and columns are thin
    dense parts and only the remaining pairs use the block layout.
    """

    inputs: tuple[str, ...] = ("q", "k")
    outputs: tuple[str, ...] = ("probs",)
    pattern: Pattern | None = None
    schedule: Schedule = Schedule()
    split_globals: bool = False

    def describe(self) -> str:
        split = "; global rows/columns apart" if self.split_globals else ""
        return f"SparseProbs({self.pattern!r}{split}) with {self.schedule}"


@dataclass(frozen=True)
class DiffusionHop(Stage):
    """``z_out = beta * (probs @ z) + gamma * v``: block-sparse SpMM plus axpby.

    Shapes: z ``[B, H or Hkv, L, Dv]``, v ``[B, Hkv, L, Dv]`` -> z_out ``[B, H, L, Dv]``.
    """

    inputs: tuple[str, ...] = ("probs", "v", "v")
    outputs: tuple[str, ...] = ("out",)
    pattern: Pattern | None = None
    schedule: Schedule = Schedule()
    beta: float = 1.0
    gamma: float = 0.0

    def describe(self) -> str:
        return f"DiffusionHop(beta={self.beta:.6g}, gamma={self.gamma:.6g})"


@dataclass(frozen=True)
class ExpandHeads(Stage):
    """Repeat key/value heads to the query head count (GQA), so hops can use them as values."""

    inputs: tuple[str, ...] = ("k", "v")
    outputs: tuple[str, ...] = ("k_h", "v_h")


@dataclass(frozen=True)
class Axpby(Stage):
    """``z_out = beta * x + gamma * y`` (element-wise; the recompute schedule's hop update)."""

    inputs: tuple[str, ...] = ("x", "y")
    outputs: tuple[str, ...] = ("out",)
    beta: float = 1.0
    gamma: float = 0.0

    def describe(self) -> str:
        return f"Axpby(beta={self.beta:.6g}, gamma={self.gamma:.6g})"


@dataclass(frozen=True)
class PassThrough(Stage):
    """``out = v`` with heads expanded: zero hops leave the values unchanged."""

    inputs: tuple[str, ...] = ("q", "v")
    outputs: tuple[str, ...] = ("out",)


def _hop_names(K: int, j: int) -> str:
    return "out" if j == K - 1 else f"z{j + 1}"


def lower_diffusion(pattern: Diffusion, schedule: Schedule) -> Program:
    """P once over the base layout (stored), then K hops of SpMM + axpby."""
    K = pattern.hops
    if K == 0:
        return Program(pattern, (PassThrough(),))
    split = split_global_tokens(pattern.base) is not None
    stages: list[Stage] = [SparseProbs(pattern=pattern.base, schedule=schedule, split_globals=split)]
    z = "v"
    for j, (beta, gamma) in enumerate(pattern.hop_coefficients()):
        out = _hop_names(K, j)
        stages.append(DiffusionHop(inputs=("probs", z, "v"), outputs=(out,), pattern=pattern.base,
                                   schedule=schedule, beta=beta, gamma=gamma))
        z = out
    return Program(pattern, tuple(stages))


def recompute_hops(program: Program) -> Program:
    """Schedule rewrite: recompute P in every hop with fused block-sparse attention.

    ``P z = softmax(scale q k^T) z`` is masked attention with ``z`` as values, so each hop is a
    :class:`BlockSparseAttention` stage (flash-style, nothing L x L or nnz-sized is stored)
    followed by an :class:`Axpby`. Costs K score computations instead of one; wins where the
    stored P does not fit or the attention kernel is much faster than SpMM (GPUs).
    """
    pattern = program.pattern
    if not isinstance(pattern, Diffusion) or pattern.hops == 0:
        return program
    sched = next(s.schedule for s in program.stages if isinstance(s, SparseProbs))
    K = pattern.hops
    stages: list[Stage] = [ExpandHeads()]
    z = "v_h"
    for j, (beta, gamma) in enumerate(pattern.hop_coefficients()):
        out = _hop_names(K, j)
        stages.append(BlockSparseAttention(inputs=("q", "k_h", z), outputs=(f"pz{j + 1}", f"lse_hop{j + 1}"),
                                           pattern=pattern.base, schedule=sched))
        stages.append(Axpby(inputs=(f"pz{j + 1}", "v_h"), outputs=(out,), beta=beta, gamma=gamma))
        z = out
    return Program(pattern, tuple(stages))


_BLOCK_CANDIDATES = (32, 64, 128)
_BLOCK_OVERHEAD = 2048


def choose_block(pattern: Diffusion, seq_len: int) -> int:
    """Schedule decision: the layout block size storing the fewest elements of P (plus a
    per-block overhead), among 32, 64 and 128, counted on the layout the stages use (the light
    part when global tokens are split apart). Stored P and every hop scale with it."""
    split = split_global_tokens(pattern.base)
    base = split.light if split is not None else pattern.base
    best, best_cost = _BLOCK_CANDIDATES[0], None
    for b in _BLOCK_CANDIDATES:
        if b > max(16, seq_len):
            break
        lay = base.layout(seq_len, seq_len, b, b)
        cost = sum(g.num_blocks for g in lay.groups) * (b * b + _BLOCK_OVERHEAD)
        if best_cost is None or cost < best_cost:
            best, best_cost = b, cost
    return best


LOWERINGS = {DIFFUSION: lower_diffusion}  # read by program.stages.lower
