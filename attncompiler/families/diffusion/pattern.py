"""Attention diffusion (Diffuser, Feng et al. AAAI 2023, arXiv 2210.11794) as a pattern family.

``diffuse(base, hops=K, alpha=a)`` keeps the sparse attention graph of a mask pattern but lets
information travel K hops inside one layer. With P the row-softmax of ``scale * q . k`` over the
base pattern's allowed pairs (rows with no key give a zero row):

* personalized PageRank (``"ppr"``): ``Z_0 = V``, ``Z_{k+1} = (1 - a) P Z_k + a V``, output ``Z_K``;
* heat kernel (``"heat"``): ``sum_{k=0..K} w_k P^k V`` with ``w_k = e^{-t} t^k / k!`` renormalized
  to sum to 1.

Both are the recurrence ``z_{j+1} = beta_j P z_j + gamma_j V`` from ``z_0 = V`` (the heat kernel in
Horner form). With a ``score_mod`` ``fn`` (``ac.compile(p, score_mod=fn)``, torch backend), P is the
row-softmax of ``fn(scale q_i . k_j, b, h, i, j)`` over the allowed pairs, and every hop uses that P
(no sinks: P stays row-stochastic). The recurrence is what the lowering emits: one
:class:`SparseProbs` stage computing P once over the base layout (stored block-sparse, O(nnz)
memory) and K :class:`DiffusionHop` stages
(block-sparse SpMM plus axpby). The alternative schedule recomputes P in every hop by reusing
:class:`~attncompiler.program.stages.BlockSparseAttention` (``softmax(q k^T) z`` is masked attention with
``z`` as values), trading K score computations for no stored P: :func:`recompute_hops`.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import numpy as np
from dataclasses import dataclass

from ...dsl.pattern import Pattern, check_int, require_mask
from ...errors import InputError, PatternError

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
