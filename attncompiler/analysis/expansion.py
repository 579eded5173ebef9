"""Expansion of the symmetrized layer graph: spectral gap, Ramanujan ratio, Cheeger bounds.

Conventions: the graph is the one-layer token graph made undirected (an edge wherever either
direction is allowed), self-loops ignored. ``spectral_gap`` is lambda_2 of the normalized
Laplacian ``I - D^-1/2 A D^-1/2``; ``slem`` is the second-largest eigenvalue modulus of the
random-walk matrix ``D^-1 A`` (same eigenvalues as the normalized adjacency); the Ramanujan
bound is ``2 sqrt(d - 1) / d`` for the average degree ``d``, and ``ramanujan_ratio`` =
slem / bound (<= 1: as good an expander as a Ramanujan graph of that degree).

On a twin quotient the computation is exact: the normalized adjacency restricted to
node-constant vectors is the weighted quotient's normalized adjacency, and each class of
``s > 1`` twins adds ``s - 1`` eigenvalues ``-1/d`` (twins adjacent to each other) or ``0``.
Large quotients use Lanczos (scipy ``eigsh``), with shift-invert for banded graphs where
plain Lanczos converges slowly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as sla
from scipy.sparse.csgraph import connected_components

from .blas_threads import one_blas_thread
from .quotient import Quotient

_DENSE_LIMIT = 1500
_BAND_LIMIT = 512


@dataclass(frozen=True)
class ExpansionResult:
    """Spectral and combinatorial expansion figures of the symmetrized layer graph.

    Attributes:
        spectral_gap: lambda_2 of the normalized Laplacian (0 when disconnected).
        slem: second-largest eigenvalue modulus of the random walk.
        avg_degree: average token degree d (self-loops excluded).
        ramanujan_bound: ``2 sqrt(d-1)/d`` (None when d <= 1).
        ramanujan_ratio: slem / ramanujan_bound.
        conductance_bounds: Cheeger: ``lambda_2 / 2 <= phi <= sqrt(2 lambda_2)``.
        edge_expansion_bounds: ``phi * d_min <= h_E <= phi_max * d_max`` (edges per token of S).
        vertex_expansion: smallest ``|N(S) \\ S| / |S|`` over sampled token sets (an upper bound
            on the true vertex expansion), None for L < 2.
        components: connected components of the symmetrized token graph.
        exact: computed on an exact quotient (False: block-level estimate).
        method: eigen-solver used.
    """

    spectral_gap: float
    slem: float
    avg_degree: float
    ramanujan_bound: float | None
    ramanujan_ratio: float | None
    conductance_bounds: tuple[float, float]
    edge_expansion_bounds: tuple[float, float]
    vertex_expansion: float | None
    components: int
    exact: bool
    method: str


def _components(q: Quotient, off: sp.csr_matrix) -> int:
    ncomp, _ = connected_components(off, directed=False)
    alone = (np.diff(off.indptr) == 0) & ~q.intra & (q.sizes > 1)
    return int(ncomp + (q.sizes[alone] - 1).sum())


def _spectrum(c: sp.csr_matrix, v1: np.ndarray, band: int) -> tuple[float, float, str]:
    """``(mu_2, mu_min)`` of a connected graph's normalized adjacency ``c``."""
    n = c.shape[0]
    if n == 1:
        return -np.inf, float(c[0, 0]), "trivial"
    if n <= _DENSE_LIMIT:
        dense = c.toarray()
        with one_blas_thread():  # threaded BLAS waits on busy cores: 0.1-1 s instead of 5 ms at n = 256
            ev = np.linalg.eigvalsh(dense)
        return float(ev[-2]), float(ev[0]), "dense eigvalsh"
    v0 = np.random.default_rng(0).standard_normal(n)
    if band <= _BAND_LIMIT:  # clustered spectrum near 1: shift-invert on the Laplacian
        lap = (sp.identity(n, format="csc") - c).tocsc()
        lo = sla.eigsh(lap, k=2, sigma=-1e-10, which="LM", v0=v0, return_eigenvectors=False)
        mu2, method = float(1.0 - np.sort(lo)[1]), "eigsh shift-invert (banded)"
    else:
        def deflated_mv(x):
            x = np.ravel(x)
            # v1 (eigenvalue 1) moved to -2, below the spectrum ([-1, 1]): moving it to 0 made a
            # graph whose other eigenvalues are all negative (near-complete) report mu_2 = 0.
            # Not a BLAS dot: threaded BLAS stalls on busy machines.
            return c @ x - 3.0 * v1 * float(np.sum(v1 * x))

        deflated = sla.LinearOperator((n, n), matvec=deflated_mv, dtype=np.float64)
        mu2 = float(sla.eigsh(deflated, k=1, which="LA", v0=v0, tol=1e-9, return_eigenvectors=False)[0])
        method = "eigsh Lanczos (deflated)"
    try:  # only its modulus matters for the SLEM; a short Lanczos run, since bands converge slowly
        mumin = float(sla.eigsh(c, k=1, which="SA", v0=v0, tol=1e-6, maxiter=100, ncv=min(n, 24),
                                return_eigenvectors=False)[0])
    except sla.ArpackNoConvergence as e:
        mumin = float(e.eigenvalues.min()) if len(e.eigenvalues) else -abs(mu2)
        method += "; smallest eigenvalue not converged (slem assumes |mu_min| <= mu_2)"
    return mu2, mumin, method


def _vertex_expansion(q: Quotient, off: sp.csr_matrix, samples: int = 24) -> float | None:
    L, n = q.length, q.n
    if L < 2 or n < 2:
        return None
    rng = np.random.default_rng(0)
    sets = []
    cum = np.cumsum(q.sizes)
    for frac in (0.01, 0.05, 0.1, 0.25, 0.5):
        hi = int(np.searchsorted(cum, frac * L, side="right"))
        if hi >= 1:
            sets.append(np.arange(hi))                                  # a prefix interval
            mid = n // 2
            sets.append(np.arange(max(0, mid - hi // 2), max(0, mid - hi // 2) + hi))
    while len(sets) < samples:
        k = int(rng.integers(1, max(2, n // 2)))
        sets.append(rng.choice(n, size=k, replace=False))
    best = np.inf
    for s in sets:
        x = np.zeros(n, dtype=bool)
        x[s] = True
        tokens = q.sizes[x].sum()
        if tokens == 0 or tokens > L / 2:
            continue
        nb = (off @ x.astype(np.float64)) > 0
        best = min(best, q.sizes[nb & ~x].sum() / tokens)
    return float(best) if np.isfinite(best) else None


def _bandwidth(m: sp.csr_matrix) -> int:
    coo = m.tocoo()
    return int(np.abs(coo.row - coo.col).max()) if coo.nnz else 0


def expansion(q: Quotient) -> ExpansionResult:
    """Spectral gap, random-walk SLEM, Ramanujan ratio, Cheeger bounds, sampled vertex expansion."""
    w = q.sym.tocsr()
    off = sp.csr_matrix(w - sp.diags(w.diagonal()))
    off.eliminate_zeros()
    off_b = sp.csr_matrix(off, dtype=bool).astype(np.float64)
    wdeg = np.asarray(w.sum(axis=1)).reshape(-1)         # token degree x node size
    tdeg = np.where(q.sizes > 0, wdeg / q.sizes, 0.0)     # token degree
    L = q.length
    d = float(wdeg.sum() / L) if L else 0.0
    comps = _components(q, off)
    method = "components"
    if comps > 1 or L < 2:
        gap, slem = 0.0, 1.0
    else:
        inv = 1.0 / np.sqrt(wdeg)
        c = sp.csr_matrix(sp.diags(inv) @ w @ sp.diags(inv))
        v1 = np.sqrt(wdeg) / np.sqrt(wdeg.sum())
        mu2, mumin, method = _spectrum(c, v1, _bandwidth(off))
        twins = q.sizes > 1
        twin_mu = np.where(q.intra[twins], -1.0 / np.maximum(tdeg[twins], 1e-300), 0.0)
        top = max([mu2] + ([twin_mu.max()] if twin_mu.size else []))
        gap = float(1.0 - top)
        mods = [abs(mu2) if np.isfinite(mu2) else 0.0, abs(mumin) if q.n > 1 else 0.0]
        if twin_mu.size:
            mods.append(float(np.abs(twin_mu).max()))
        slem = float(max(mods))
    bound = 2.0 * np.sqrt(d - 1.0) / d if d > 1 else None
    ratio = slem / bound if bound else None
    phi = (gap / 2.0, min(1.0, float(np.sqrt(2.0 * gap))))
    dmin = float(tdeg.min()) if len(tdeg) else 0.0
    dmax = float(tdeg.max()) if len(tdeg) else 0.0
    return ExpansionResult(gap, slem, d, bound, ratio, phi, (phi[0] * dmin, phi[1] * dmax),
                           _vertex_expansion(q, off_b), comps, q.exact, method)
