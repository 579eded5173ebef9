"""Analysis of attention diffusion: K-hop reach, the diffused spectrum, symbolic cost.

A diffusion layer outputs ``sum_k c_k P^k V`` (:meth:`Diffusion.weights`), so key ``j``
influences query ``i`` in one layer iff some walk ``j -> i`` of length ``k`` in the base graph
has ``c_k > 0``. For ``0 < alpha < 1`` (and the heat kernel) every ``c_k`` is positive, so a
layer reaches exactly the pairs at base-graph distance ``<= K``: **every pair interacts in one
layer iff K >= the base graph's diameter**. ``alpha = 0`` keeps only walks of exactly K steps;
``alpha = 1`` (or K = 0) returns V.

Spectrum: with the uniform-attention P (q = k = 0, the base graph's random walk
``D^-1 A``) and eigenvalues ``mu`` of P, the diffused operator has eigenvalues
``f(mu) = sum_k c_k mu^k``; as K -> oo this is ``alpha / (1 - (1 - alpha) mu)`` for PPR and
``exp(t (mu - 1))`` for the heat kernel. The spectral gap ``1 - max_{i>=2} |lambda_i|`` grows
with K: diffusion mixes faster than one attention step.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import sympy

from ..families.diffusion.pattern import DIFFUSION, Diffusion, Kernel
from ..families.diffusion.program import split_global_tokens
from ..errors import UnsupportedError
from .graph import AttentionGraph, attention_graph, register_graph_builder

# Dense eigenvalue problems and boolean closures are O(L^2)..O(L^3): keep them small.
MAX_DENSE_L = 2048


def hop_support(pattern: Diffusion) -> tuple[int, ...]:
    """The walk lengths k with ``c_k > 0`` in ``sum_k c_k P^k V``."""
    return tuple(k for k, c in enumerate(pattern.weights()) if c > 0)


@register_graph_builder(DIFFUSION)
def diffusion_graph(pattern: Diffusion, seq_len: int, **options) -> AttentionGraph:
    """The base pattern's graph with ``hops_per_layer = K``.

    The generic layer operator keeps every shorter path (what ``alpha > 0`` does). K = 0 or
    ``alpha = 1`` give a layer without token-to-token edges; ``alpha = 0`` keeps only walks of
    exactly K steps, noted on the graph (use :func:`one_layer_support` for the exact relation).
    """
    g = attention_graph(pattern.base, seq_len, **options)
    support = hop_support(pattern)
    notes = tuple(g.notes) + (f"diffusion: {pattern.kernel.value}, K={pattern.hops} hops per layer",)
    if support == (0,):
        empty = sp.csr_matrix(g.adj.shape, dtype=g.adj.dtype)
        return dataclasses.replace(g, pattern=pattern, adj=empty, edge_kind=sp.csr_matrix(g.adj.shape, dtype=np.int8),
                                   notes=notes + ("the layer returns V: no token-to-token edges",))
    if 0 not in support or len(support) != support[-1] + 1:
        notes += (f"only walks of lengths {support} contribute; reach below is an upper bound",)
    return dataclasses.replace(g, pattern=pattern, hops_per_layer=max(1, pattern.hops), notes=notes)


def base_adjacency(pattern: Diffusion, L: int) -> sp.csr_matrix:
    """Bool CSR ``[query, key]`` of the base graph (one hop), exact."""
    from .mask_graph import token_adjacency

    return sp.csr_matrix(token_adjacency(pattern.base, L), dtype=bool)


def one_layer_support(pattern: Diffusion, L: int) -> sp.csr_matrix:
    """Exact one-layer relation ``M[query, key]``: some walk key -> query of a length k with c_k > 0."""
    if L > MAX_DENSE_L:
        raise UnsupportedError(f"L={L} is too large for the exact K-hop closure (limit {MAX_DENSE_L}); "
                               "use attncompiler.analysis.analyze(pattern, L, level='block')")
    A = base_adjacency(pattern, L).astype(np.int64)
    power = sp.identity(L, dtype=np.int64, format="csr")
    out = sp.csr_matrix((L, L), dtype=np.int64)
    support = set(hop_support(pattern))
    for k in range(pattern.hops + 1):
        if k:
            power = (A @ power).astype(bool).astype(np.int64)
        if k in support:
            out = out + power
    return out.astype(bool).tocsr()


def base_diameter(pattern: Diffusion, L: int) -> int | None:
    """Largest base-graph distance from a key to a query over all pairs; None if some pair never connects."""
    from scipy.sparse.csgraph import shortest_path

    if L > MAX_DENSE_L:
        raise UnsupportedError(f"L={L} is too large for all-pairs distances (limit {MAX_DENSE_L})")
    # csgraph follows row -> column, i.e. key -> query: transpose [query, key].
    dist = shortest_path(base_adjacency(pattern, L).T.tocsr(), directed=True, unweighted=True)
    np.fill_diagonal(dist, 0)
    return None if np.isinf(dist).any() else int(dist.max())


@dataclass(frozen=True)
class ReceptiveField:
    """Per-query reach of diffusion layers (residual stream included across layers).

    Attributes:
        layers: layers stacked.
        hops: K per layer.
        reach: ``[L]`` number of keys that influence each query.
        all_pairs: every key influences every query.
        diameter: base-graph diameter (None: some pair is never connected).
    """

    layers: int
    hops: int
    reach: np.ndarray
    all_pairs: bool
    diameter: int | None

    def __str__(self) -> str:
        return (f"{self.layers} layer(s) x K={self.hops}: reach min {self.reach.min()}, mean "
                f"{self.reach.mean():.1f}, max {self.reach.max()} of {len(self.reach)}; all pairs: "
                f"{self.all_pairs}; base diameter {self.diameter}")


def receptive_field(pattern: Diffusion, L: int, layers: int = 1) -> ReceptiveField:
    """How many keys influence each query after ``layers`` diffusion layers (exact, small L)."""
    M = one_layer_support(pattern, L)
    step = (M + sp.identity(L, dtype=bool, format="csr")).astype(bool).tocsr() if layers > 1 else M
    R = M
    for _ in range(layers - 1):
        R = (step @ R).astype(bool).tocsr()
        R = (R + sp.identity(L, dtype=bool, format="csr")).astype(bool).tocsr()
    reach = np.asarray(R.sum(axis=1)).reshape(-1)
    return ReceptiveField(layers, pattern.hops, reach, bool((reach == L).all()), base_diameter(pattern, L))


def every_pair_interacts(pattern: Diffusion, L: int) -> bool:
    """The claim: with every ``c_k > 0``, all pairs interact in one layer iff K >= diameter."""
    diam = base_diameter(pattern, L)
    support = hop_support(pattern)
    if diam is None:
        return False
    if support == tuple(range(pattern.hops + 1)):
        return pattern.hops >= diam
    return bool(one_layer_support(pattern, L).nnz == L * L)


# ---------------------------------------------------------------------------------------------
# Spectrum
# ---------------------------------------------------------------------------------------------

def uniform_walk(pattern: Diffusion, L: int) -> np.ndarray:
    """Dense ``P = D^-1 A``: attention with q = k = 0 on the base graph (empty rows zero)."""
    A = base_adjacency(pattern, L).toarray().astype(np.float64)
    deg = A.sum(axis=1, keepdims=True)
    return A / np.where(deg == 0, 1.0, deg)


def spectral_map(pattern: Diffusion, mu: np.ndarray, limit: bool = False) -> np.ndarray:
    """Eigenvalues of the diffused operator from those of P: ``sum_k c_k mu^k`` (``limit``: K -> oo)."""
    mu = np.asarray(mu, dtype=np.complex128)
    if limit:
        if pattern.kernel is Kernel.PPR:
            return pattern.alpha / (1 - (1 - pattern.alpha) * mu)
        return np.exp(pattern.t * (mu - 1))
    return sum(c * mu ** k for k, c in enumerate(pattern.weights()))


def spectral_gap(eigs: np.ndarray) -> float:
    """``1 - |lambda_2|``: one minus the second largest eigenvalue modulus."""
    mod = np.sort(np.abs(eigs))[::-1]
    return float(1 - mod[1]) if len(mod) > 1 else 1.0


@dataclass(frozen=True)
class DiffusedSpectrum:
    """Eigenvalues of one attention step and of the diffusion layer, and their gaps."""

    mu: np.ndarray
    diffused: np.ndarray
    gap_before: float
    gap_after: float
    gap_limit: float

    def __str__(self) -> str:
        return (f"spectral gap: one step {self.gap_before:.4f}, diffused {self.gap_after:.4f}, "
                f"K -> oo {self.gap_limit:.4f}")


def diffused_spectrum(pattern: Diffusion, L: int) -> DiffusedSpectrum:
    """Spectrum of the uniform-attention P on the base graph and of the diffused operator."""
    if L > MAX_DENSE_L:
        raise UnsupportedError(f"L={L} is too large for a dense eigenvalue problem (limit {MAX_DENSE_L})")
    mu = np.linalg.eigvals(uniform_walk(pattern, L))
    diffused = spectral_map(pattern, mu)
    return DiffusedSpectrum(mu, diffused, spectral_gap(mu), spectral_gap(diffused),
                            spectral_gap(spectral_map(pattern, mu, limit=True)))


def hops_table(pattern: Diffusion, L: int, max_hops: int | None = None) -> list[tuple[int, float, float, bool]]:
    """``(K, spectral gap, fraction of pairs reached in one layer, all pairs)`` for K = 0..max_hops.

    What ``attnc analyze`` shows for a diffusion pattern: how gap and reach change with K.
    """
    max_hops = pattern.hops if max_hops is None else max_hops
    mu = np.linalg.eigvals(uniform_walk(pattern, L))
    rows = []
    for K in range(max_hops + 1):
        p = dataclasses.replace(pattern, hops=K)
        frac = one_layer_support(p, L).nnz / (L * L)
        rows.append((K, spectral_gap(spectral_map(p, mu)), frac, frac == 1.0))
    return rows


# ---------------------------------------------------------------------------------------------
# Cost
# ---------------------------------------------------------------------------------------------

L_, D_, K_, E_ = sympy.symbols("L D K E", positive=True, integer=True)


@dataclass(frozen=True)
class DiffusionCost:
    """FLOPs and memory of one diffusion layer, per head, symbolic in L, D, K and E = |edges|.

    ``flops``: ``2 E D`` scores + ``4 E`` softmax + K hops of ``2 E D`` SpMM and ``3 L D``
    axpby, i.e. O((K + 1) |E| D). ``memory``: stored P (E) plus the K hop inputs kept for the
    backward pass (K L D), in elements. ``values`` substitutes a concrete instance.
    """

    flops: sympy.Expr
    memory: sympy.Expr
    order: str
    values: tuple[tuple[sympy.Symbol, int], ...] = ()

    def at(self) -> tuple[float, float]:
        """``(flops, memory elements)`` at ``values``."""
        sub = dict(self.values)
        return float(self.flops.subs(sub)), float(self.memory.subs(sub))


def diffusion_cost(pattern: Diffusion, seq_len: int | None = None, head_dim: int = 64,
                   block: int | None = None) -> DiffusionCost:
    """Symbolic cost; with ``seq_len``, E is the exact number of allowed pairs (or, with
    ``block``, the stored elements of the block layout: what the torch backend computes)."""
    flops = 2 * E_ * D_ + 4 * E_ + K_ * (2 * E_ * D_ + 3 * L_ * D_)
    memory = E_ + K_ * L_ * D_
    values: tuple = ()
    if seq_len is not None:
        if block is None:
            E = int(base_adjacency(pattern, seq_len).nnz) if seq_len <= 8192 else \
                pattern.base.layout(seq_len, seq_len, 128, 128).groups[0].allowed_pairs()
        else:  # the torch backend's stored P: the layout's blocks, global rows/columns apart
            split = split_global_tokens(pattern.base)
            base = split.light if split is not None else pattern.base
            E = base.layout(seq_len, seq_len, block, block).groups[0].num_blocks * block * block
            if split is not None:
                E += 2 * len(split.tokens) * seq_len
        values = ((L_, seq_len), (D_, head_dim), (K_, pattern.hops), (E_, E))
    return DiffusionCost(sympy.expand(flops), memory, "O((K+1) |E| D)", values)


# ---------------------------------------------------------------------------------------------
# Closed form through the generic cost registry
# ---------------------------------------------------------------------------------------------

from .cost import SymbolicCost, register_cost, symbolic_cost  # noqa: E402
from .symbols import BM, BYTES, D, L  # noqa: E402


@dataclass(frozen=True)
class DiffusionSymbolicCost(SymbolicCost):
    """The base pattern's closed form (``pairs`` = |E|) with diffusion's FLOPs and bytes.

    ``flops = 2 (K + 1) |E| D + 4 |E| + 3 K L D`` (scores, softmax, K SpMM hops and axpbys);
    ``bytes_moved`` for the materialized schedule: P written once and read K times, q, k read
    once, and per hop z read once per stored key block row plus v read and z written.
    """

    hops: int = 0

    @property
    def flops(self) -> sympy.Expr:
        return 2 * (self.hops + 1) * self.pairs * D + 4 * self.pairs + 3 * self.hops * L * D

    @property
    def bytes_moved(self) -> sympy.Expr:
        K = self.hops
        return BYTES * ((K + 1) * self.pairs + 2 * L * D + K * (self.pairs * D / BM + 2 * L * D))


@register_cost(DIFFUSION)
def _diffusion_symbolic_cost(pattern: Diffusion) -> DiffusionSymbolicCost | None:
    """Recognized when the base is a catalogue mask pattern (its closed form gives |E|)."""
    base = symbolic_cost(pattern.base)
    if base is None:
        return None
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
    fields["name"] = f"diffuse({base.name}, K={pattern.hops})"
    return DiffusionSymbolicCost(**fields, hops=pattern.hops)
