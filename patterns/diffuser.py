"""Diffuser (Feng, Li, Jiang, Ying, AAAI 2023, arXiv 2210.11794): multi-hop attention diffusion
over a sparse window + random + global base graph, written with the public DSL only."""

from __future__ import annotations

from attncompiler import dsl
from attncompiler.errors import PatternError
from attncompiler.dsl.pattern import Pattern, check_int as int_param
from attncompiler.families.diffusion.pattern import diffuse


_MAX_GLOBAL_TOKENS = 1 << 24  # listed one by one


def diffuser_graph(window: int = 64, random_blocks: int = 1, num_global: int = 4, seed: int = 0,
                   causal: bool = False) -> Pattern:
    """The base attention graph of Diffuser (arXiv 2210.11794, sec. 3.1 "Sparse pattern design").

    Construction (the authors' code, ``graphtrainer.py::_create_adj_mat``, and how it maps here):

    * **Window made of overlapping blocks.** The code sets ``adj[s:s+w, s:s+w] = 1`` for
      ``s = 0, w/2, w, ...`` (blocks of width ``w = window`` overlapping by half). Two tokens
      share such a block exactly when their half-blocks ``i // (w/2)`` differ by at most one,
      so the window is ``dsl.block_window(1, block=window // 2)``: each token sees 1.5 to 2
      windows' worth of neighbours, ``w + w/2`` keys on average.
    * **Random edges.** The code draws ``num_rand * L`` (key, query) pairs uniformly without
      replacement (``np.random.seed(0)``). Here each query half-block sees ``random_blocks``
      random key half-blocks, drawn deterministically from ``seed`` (BigBird's block-granular
      draw, ``dsl.random_blocks``), so the graph stays block-sparse and P is stored in dense
      tiles; the expected number of random keys per query is ``random_blocks * window / 2``.
    * **Global tokens.** The code picks ``num_glob`` random positions in ``[w, 4096)`` that see
      and are seen by every token. Here they are the first ``num_global`` positions (as in
      Longformer/BigBird), so the pattern is valid at every length >= ``num_global``.

    Args:
        window: width w of the overlapping blocks (even, >= 2). Default 64, the paper's value.
        random_blocks: random key half-blocks per query half-block. Default 1.
        num_global: leading global tokens (0 for none). Default 4.
        seed: seed of the random draw. Default 0.
        causal: keep only keys at or before the query (every hop then stays causal). Default False.
    """
    if int_param("window", window, 2) % 2:
        raise PatternError(f"window={window!r} must be an even number >= 2 (blocks overlap by window/2)")
    num_global = int_param("num_global", num_global, 0, _MAX_GLOBAL_TOKENS)
    half = window // 2
    p = dsl.block_window(1, block=half)
    if random_blocks:
        p = p | dsl.random_blocks(random_blocks, block=half, seed=seed)
    if num_global:
        p = p | dsl.global_tokens(range(num_global))
    return p.causal() if causal else p


def diffuser(window: int = 64, random_blocks: int = 1, num_global: int = 4, seed: int = 0, hops: int = 5,
             alpha: float = 0.1, kernel: str = "ppr", t: float = 1.0, causal: bool = False) -> Pattern:
    """Diffuser (Feng et al. AAAI 2023, arXiv 2210.11794, sec. 3.2): K-hop attention diffusion.

    P = row-softmax of ``q . k`` on :func:`diffuser_graph`; personalized PageRank
    ``Z_{k+1} = (1 - alpha) P Z_k + alpha V`` from ``Z_0 = V`` for ``hops`` steps (the authors'
    ``DiffuserSelfAttention``: alpha 0.1, 5 hops), or the heat kernel
    ``sum_k w_k P^k V``, ``w_k ~ e^{-t} t^k / k!`` (sec. 3.2, renormalized over k <= hops).

    Args:
        window: width of the overlapping window blocks of the base graph. Default 64.
        random_blocks: random key half-blocks per query half-block. Default 1.
        num_global: leading global tokens. Default 4.
        seed: seed of the random draw. Default 0.
        hops: K, diffusion steps per layer. Default 5.
        alpha: PageRank teleport probability. Default 0.1.
        kernel: ``"ppr"`` or ``"heat"``. Default ``"ppr"``.
        t: heat-kernel time (``kernel="heat"``). Default 1.0.
        causal: causal base graph (every hop stays causal). Default False.
    """
    base = diffuser_graph(window, random_blocks, num_global, seed, causal)
    return diffuse(base, hops=hops, alpha=alpha, kernel=kernel, t=t)


def diffuser_heat(window: int = 64, hops: int = 5, t: float = 1.0, causal: bool = False) -> Pattern:
    """Diffuser with the heat kernel (arXiv 2210.11794, sec. 3.2): ``sum_k w_k P^k V`` on the
    default :func:`diffuser_graph`.

    Args:
        window: width of the overlapping window blocks. Default 64.
        hops: K. Default 5.
        t: diffusion time. Default 1.0.
        causal: causal base graph. Default False.
    """
    return diffuser(window=window, hops=hops, kernel="heat", t=t, causal=causal)
