"""Combiner factorized-attention patterns (Ren et al., NeurIPS 2021, arXiv 2107.05768).

Each transforms a sparse pattern into full attention at the same cost: a query attends
directly to the sparse pattern's keys and, through one span summary per other region, to
everything else, under one joint softmax (the paper's sec. 3, "direct expectation" plus
"local expectation"). Written with the public DSL only.
"""

from __future__ import annotations

from attncompiler.dsl.pattern import Pattern
from attncompiler.families.combiner.pattern import combiner_axial as _axial
from attncompiler.families.combiner.pattern import combiner_fixed as _fixed
from attncompiler.families.combiner.pattern import combiner_logsparse as _logsparse
from attncompiler.families.combiner.pattern import combiner_mixture as _mixture


def combiner_fixed(span: int = 64, causal: bool = False, pool: str = "max") -> Pattern:
    """Combiner-Fixed (Ren et al. 2021, sec. 4, Fig. 1D): Sparse Transformer's fixed pattern
    made full: direct attention inside the own span, one max-pooled summary per other span.

    Args:
        span: tokens per span; ``sqrt(L)`` gives O(L sqrt L) cost. Default 64.
        causal: own span up to the query, summaries of the earlier spans only. Default False.
        pool: span pooling, ``"max"`` (the paper) or ``"mean"``. Default "max".
    """
    return _fixed(span, causal=causal, pool=pool)


def combiner_logsparse(causal: bool = False, pool: str = "max") -> Pattern:
    """Combiner-Logsparse (Ren et al. 2021, sec. 4, Fig. 1E): LogSparse made full: each query
    attends to itself and to one summary per dyadic span of the binary decomposition of its
    prefix (and, bidirectionally, its suffix): O(L log L).

    Args:
        causal: prefix spans only. Default False.
        pool: ``"max"`` or ``"mean"``. Default "max".
    """
    return _logsparse(causal=causal, pool=pool)


def combiner_axial(cols: int = 64, variant: str = "vertical", causal: bool = False, pool: str = "max") -> Pattern:
    """Combiner-Axial (Ren et al. 2021, sec. 4, Fig. 1F): axial attention on a row-major grid
    made full; variants ``"vertical"`` (own column direct, other columns summarized),
    ``"horizontal"`` (own row direct, other rows summarized) and ``"rowmajor"`` (the previous
    ``cols - 1`` raster positions direct, the rest of every column summarized). Causal partial
    columns are prefix (running-max) summaries.

    Args:
        cols: grid width (``L / cols`` rows); ``sqrt(L)`` gives O(L sqrt L). Default 64.
        variant: ``"vertical"``, ``"horizontal"`` or ``"rowmajor"``. Default "vertical".
        causal: autoregressive. Default False.
        pool: ``"max"`` or ``"mean"``. Default "max".
    """
    return _axial(cols, variant=variant, causal=causal, pool=pool)


def combiner_mixture(cols: int = 64, causal: bool = False) -> Pattern:
    """Combiner-Mixture (Ren et al. 2021, sec. 4): the average of M = 2 factorizations'
    outputs, here Combiner-Axial-Vertical and -Horizontal on the same grid.

    Args:
        cols: grid width shared by both factorizations. Default 64.
        causal: autoregressive. Default False.
    """
    return _mixture(_axial(cols, causal=causal), _axial(cols, variant="horizontal", causal=causal))
