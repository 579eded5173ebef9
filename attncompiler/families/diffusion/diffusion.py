"""Attention diffusion (Diffuser, Feng et al. AAAI 2023, arXiv 2210.11794) as a pattern family.

``diffuse(base, hops=K, alpha=a)`` keeps the sparse attention graph of a mask pattern but lets
information travel K hops inside one layer. With P the row-softmax of ``scale * q . k`` over the
base pattern's allowed pairs (rows with no key give a zero row):

* personalized PageRank (``"ppr"``): ``Z_0 = V``, ``Z_{k+1} = (1 - a) P Z_k + a V``, output ``Z_K``;
* heat kernel (``"heat"``): ``sum_{k=0..K} w_k P^k V`` with ``w_k = e^{-t} t^k / k!`` renormalized
  to sum to 1.

Both are the recurrence ``z_{j+1} = beta_j P z_j + gamma_j V`` from ``z_0 = V`` (the heat kernel in
Horner form), which is what the lowering emits: one :class:`SparseProbs` stage computing P once
over the base layout (stored block-sparse, O(nnz) memory) and K :class:`DiffusionHop` stages
(block-sparse SpMM plus axpby). The alternative schedule recomputes P in every hop by reusing
:class:`~attncompiler.program.stages.BlockSparseAttention` (``softmax(q k^T) z`` is masked attention with
``z`` as values), trading K score computations for no stored P: :func:`recompute_hops`.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from ...errors import InputError, PatternError
from ...program.head_slices import choose_head_block, run_by_head_slices
from ...program.inputs import check_qkv, default_scale
from ...dsl.primitives import GlobalTokens, global_tokens
from ...dsl.pattern import Intersection, Pattern, Union, check_int, require_mask, intersection, union
from ...program.stages import BlockSparseAttention, Program, Stage, register_lowering
from ...program.reference import dense_masks, register_reference
from ...program.schedule import Schedule

DIFFUSION = "diffusion"


class Kernel(str, enum.Enum):
    """The diffusion kernel: personalized PageRank or heat kernel."""

    PPR = "ppr"
    HEAT = "heat"


# ---------------------------------------------------------------------------------------------
# Pattern node
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Diffusion(Pattern):
    """K-hop attention diffusion over the graph of a mask pattern ``base``."""

    base: Pattern
    hops: int
    alpha: float
    kernel: Kernel
    t: float

    family = DIFFUSION

    def children(self):
        return (self.base,)

    def _rebuild(self, children):
        return dataclasses.replace(self, base=children[0])

    def causal(self) -> Pattern:
        """The same diffusion whose every hop stays on the causal base graph."""
        return dataclasses.replace(self, base=self.base.causal())

    def validate(self, q_len: int, kv_len: int) -> None:
        if q_len != kv_len:
            raise InputError(f"diffusion needs as many queries as keys (z_k is both), got q_len={q_len}, "
                             f"kv_len={kv_len}; hops multiply P [L, L] by [L, D] values")
        self.base.validate(q_len, kv_len)

    def weights(self) -> tuple[float, ...]:
        """``c_0 .. c_K``: the output is ``sum_k c_k P^k V`` (they sum to 1)."""
        K, a = self.hops, self.alpha
        if self.kernel is Kernel.PPR:
            return tuple(a * (1 - a) ** k for k in range(K)) + ((1 - a) ** K,)
        # e^{-t} t^k / k! in log space (t^k and k! overflow floats within MAX_HOPS), scaled by its max.
        logs = [k * math.log(self.t) - math.lgamma(k + 1) for k in range(K + 1)]
        top = max(logs)
        w = [math.exp(x - top) for x in logs]
        total = sum(w)
        return tuple(x / total for x in w)

    def hop_coefficients(self) -> tuple[tuple[float, float], ...]:
        """``(beta_j, gamma_j)`` for j = 0..K-1 of ``z_{j+1} = beta_j P z_j + gamma_j V``, ``z_0 = V``."""
        K = self.hops
        if self.kernel is Kernel.PPR:
            return tuple((1 - self.alpha, self.alpha) for _ in range(K))
        w = self.weights()  # Horner: sum_k w_k P^k V = w_0 V + P(w_1 V + P(... + P(w_K V)))
        return tuple(((w[K] if j == 0 else 1.0), w[K - 1 - j]) for j in range(K))

    def __repr__(self) -> str:
        if self.kernel is Kernel.PPR:
            return f"ac.diffuse({self.base!r}, hops={self.hops}, alpha={self.alpha!r})"
        return f"ac.diffuse({self.base!r}, hops={self.hops}, kernel=\"heat\", t={self.t!r})"


MAX_HOPS = 4096
"""The most diffusion hops a pattern may ask for (each hop is a program stage)."""


def diffuse(base: Pattern, hops: int = 5, alpha: float = 0.1, kernel: str | Kernel = "ppr",
            t: float = 1.0) -> Pattern:
    """Multi-hop attention diffusion over a sparse mask pattern (Diffuser, arXiv 2210.11794, sec. 3).

    Args:
        base: the mask pattern whose allowed (query, key) pairs are the edges of one hop.
        hops: K, the number of diffusion hops (0 returns V), at most :data:`MAX_HOPS`. Default 5,
            as in the paper's code.
        alpha: teleport probability of personalized PageRank, in [0, 1]. Default 0.1.
        kernel: ``"ppr"`` (personalized PageRank) or ``"heat"`` (heat kernel). Default ``"ppr"``.
        t: heat-kernel time (``kernel="heat"`` only), > 0. Default 1.0.

    Raises:
        PatternError: ``base`` is not a mask pattern, or a parameter is out of range.
    """
    if not isinstance(base, Pattern):
        raise PatternError(f"diffuse() needs a mask pattern as base, got {type(base).__name__} {base!r}")
    require_mask(base, "diffuse")
    hops = check_int("hops", hops, 0, MAX_HOPS)
    try:
        kernel = Kernel(kernel)
    except ValueError:
        raise PatternError(f"kernel={kernel!r} must be one of {[k.value for k in Kernel]}") from None
    for name, val in (("alpha", alpha), ("t", t)):
        if isinstance(val, bool) or not isinstance(val, (int, float, np.floating)) or not math.isfinite(val):
            raise PatternError(f"{name}={val!r} must be a finite number")
    if not 0.0 <= alpha <= 1.0:
        raise PatternError(f"alpha={alpha!r} must be in [0, 1] (the PageRank teleport probability)")
    if kernel is Kernel.HEAT and t <= 0:
        raise PatternError(f"t={t!r} must be > 0 for the heat kernel")
    if kernel is Kernel.HEAT:  # alpha does not enter the heat kernel: normalize so equal patterns compare equal
        alpha = 0.1
    else:
        t = 1.0
    return Diffusion(base, hops, float(alpha), kernel, float(t))


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
    """``probs = rowsoftmax(scale * q k^T)`` over the base layout, kept block-sparse.

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


@register_lowering(DIFFUSION)
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


# ---------------------------------------------------------------------------------------------
# Reference (float64, dense): the equations as written
# ---------------------------------------------------------------------------------------------

def expand_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, Hkv, L, X]`` -> ``[B, heads, L, X]`` (GQA: query heads sharing a key/value head)."""
    G = heads // t.shape[1]
    return t if G == 1 else t.repeat_interleave(G, dim=1)


def dense_probs(base: Pattern, q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """``P [B, H, L, L]``: row-softmax of ``scale q k^T`` over the base pattern (empty rows zero)."""
    B, H, L, _ = q.shape
    mask = dense_masks(base, B, H, L, k.shape[2], q.device)
    s = torch.matmul(q, expand_heads(k, H).transpose(-1, -2)) * scale  # [B, H, L, L]
    s = s.masked_fill(~mask, float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    e = torch.exp(s - m)  # exp(-inf) = 0 off the pattern
    den = e.sum(dim=-1, keepdim=True)
    return e / torch.where(den == 0, torch.ones_like(den), den)


@register_reference(DIFFUSION)
def _diffusion_reference(pattern: Diffusion, q, k, v, scale):
    L = q.shape[2]
    pattern.validate(L, k.shape[2])
    P = dense_probs(pattern.base, q, k, scale)  # [B, H, L, L]
    V = expand_heads(v, q.shape[1])  # [B, H, L, Dv]
    if pattern.kernel is Kernel.PPR:
        z = V
        for _ in range(pattern.hops):
            z = (1 - pattern.alpha) * (P @ z) + pattern.alpha * V
        return z, None
    out, pk = torch.zeros_like(V), V
    for k_, w in enumerate(pattern.weights()):  # sum_k w_k P^k V
        if k_:
            pk = P @ pk
        out = out + w * pk
    return out, None


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
