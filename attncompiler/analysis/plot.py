"""PNG figure of an analysis: the mask, receptive-field growth per layer, the spectrum.

matplotlib is optional (``pip install 'attncompiler[plot]'``); without it :func:`save_png`
raises :class:`~attncompiler.errors.UnsupportedError` with that hint.
"""

from __future__ import annotations

import numpy as np

from ..errors import UnsupportedError
from ..dsl.pattern import Pattern
from .report import AnalysisReport

_MAX_PIXELS = 256
_DENSE_SPECTRUM = 1500


def _mask_image(pattern: Pattern, L: int) -> np.ndarray:
    """Fraction of allowed pairs per cell of an at most 512 x 512 grid (exact block counts)."""
    from .mask_graph import block_adjacency

    blk = max(1, -(-L // _MAX_PIXELS))
    adj, _, _ = block_adjacency(pattern, L, blk)
    nb = adj.shape[0]
    sizes = np.minimum(blk, L - blk * np.arange(nb))
    img = adj.toarray() / np.outer(sizes, sizes)
    return img


def _spectrum(pattern: Pattern, report: AnalysisReport) -> np.ndarray | None:
    from .graph import attention_graph
    from .quotient import from_graph

    graph = attention_graph(pattern, report.seq_len, level=report.level, block=max(report.block, 1))
    q = from_graph(graph, compress=not report.causal)
    if q.n > _DENSE_SPECTRUM:
        return None
    w = q.sym.toarray()
    deg = w.sum(axis=1)
    keep = deg > 0
    inv = 1.0 / np.sqrt(deg[keep])
    c = inv[:, None] * w[np.ix_(keep, keep)] * inv[None, :]
    return np.sort(1.0 - np.linalg.eigvalsh(c))


def save_png(report: AnalysisReport, pattern: Pattern, path: str) -> None:
    """Write the mask, the reach fraction per layer and the Laplacian spectrum to ``path``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UnsupportedError(f"--png {path} needs matplotlib; install it with "
                               "pip install 'attncompiler[plot]' (or pip install matplotlib)") from None
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    L = report.seq_len
    if pattern.family == "mask":
        img = _mask_image(pattern, L)
        # any allowed pair keeps a cell visible (a global token is 1 of L/512 rows of a cell)
        shown = np.where(img > 0, 0.3 + 0.7 * img, 0.0)
        axes[0].imshow(shown, cmap="Blues", vmin=0, vmax=1, interpolation="nearest", extent=(0, L, L, 0))
        axes[0].set_title("mask: share of allowed pairs per cell")
        axes[0].set_xlabel("key position")
        axes[0].set_ylabel("query position")
    else:
        axes[0].axis("off")
        axes[0].text(0.5, 0.5, f"{report.family} family:\nno single mask to draw", ha="center", va="center")
    xs = np.arange(1, len(report.reach_fraction) + 1)
    axes[1].plot(xs, report.reach_fraction, marker="o")
    axes[1].set_xticks(xs)
    axes[1].set_ylim(0, 1.05)
    axes[1].set_xlabel("layers")
    axes[1].set_ylabel("fraction of legal pairs reached")
    hops = report.hops_to_full if report.hops_to_full is not None else "never"
    axes[1].set_title(f"receptive field per layer (hops_to_full = {hops})" + (
        "" if report.exact else "\nblock quotient: reach upper bounds, hops a lower bound"), fontsize=10)
    spec = _spectrum(pattern, report)
    if spec is not None:
        axes[2].plot(spec, marker=".", linestyle="none")
        axes[2].set_xlabel("index" + ("" if report.exact else " (block quotient: an estimate)"))
        axes[2].set_ylabel("normalized Laplacian eigenvalue")
    else:
        axes[2].bar(["lambda_2", "1 - slem"], [report.spectral_gap, 1 - report.slem])
    axes[2].set_title(f"spectrum (gap {report.spectral_gap:.3g})")
    title = report.pattern if len(report.pattern) <= 110 else report.pattern[:107] + "..."
    fig.suptitle(f"{title}   L={L}, {report.graph}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
