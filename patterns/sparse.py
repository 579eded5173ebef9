"""Sparse-mask patterns from the literature, written with the public DSL only."""

from __future__ import annotations

from typing import Sequence

from attncompiler import dsl
from attncompiler.errors import PatternError
from attncompiler.dsl.pattern import Pattern, check_int as int_param


def sliding_window(window: int = 256, causal: bool = False) -> Pattern:
    """Local attention (Longformer's window, Beltagy et al. 2020, arXiv 2004.05150, sec. 3.1).

    Args:
        window: keys visible on each side of the query (``|q - k| <= window``). Default 256.
        causal: keep only keys at or before the query. Default False.
    """
    p = dsl.sliding_window(window)
    return p.causal() if causal else p


def causal() -> Pattern:
    """Causal (autoregressive) attention, as in the decoder of Vaswani et al. 2017, sec. 3.2.3."""
    return dsl.causal()


def prefix_lm(prefix: int = 128) -> Pattern:
    """Prefix-LM attention (Raffel et al. 2020, T5, arXiv 1910.10683, sec. 3.2.1, Fig. 3).

    Args:
        prefix: length of the bidirectional prefix; later positions attend causally. Default 128.
    """
    return dsl.prefix_lm(prefix)


def document(lengths: Sequence[int] = (256, 512, 256)) -> Pattern:
    """Document packing: several sequences packed into one, attending only within themselves
    (the block-diagonal mask of sequence packing, e.g. Krell et al. 2021, arXiv 2107.02027).

    Args:
        lengths: length of each packed document. Default (256, 512, 256).
    """
    return dsl.document(lengths)


def sparse_transformer_strided(stride: int = 128, merged: bool = False) -> Pattern:
    """Sparse Transformer, strided pattern (Child et al. 2019, arXiv 1904.10509, sec. 4.1, Fig. 3b).

    Head A(1) attends to the previous ``stride`` positions, head A(2) to every ``stride``-th
    previous position; both causal. Heads alternate A(1), A(2), ... unless ``merged``, which
    gives every head the union (the paper's "merged head" variant).

    Args:
        stride: the stride l (about sqrt(L) in the paper). Default 128.
        merged: one head attending to the union of both sets. Default False.
    """
    stride = int_param("stride", stride, 1)
    local = dsl.sliding_window(stride) & dsl.causal()
    summary = dsl.strided(stride) & dsl.causal()
    return (local | summary) if merged else dsl.per_head([local, summary])


def sparse_transformer_fixed(stride: int = 128, summary: int = 8, merged: bool = False) -> Pattern:
    """Sparse Transformer, fixed pattern (Child et al. 2019, arXiv 1904.10509, sec. 4.1, Fig. 3c).

    A(1) = {j : floor(j / l) == floor(i / l)} (own block), A(2) = {j : j mod l in
    {l - c, ..., l - 1}} (the last c positions of every block act as summaries); causal.

    Args:
        stride: the block length l. Default 128.
        summary: c, summary positions per block (the paper uses 8 to 32). Default 8.
        merged: one head attending to the union of both sets. Default False.
    """
    stride = int_param("stride", stride, 1)
    if int_param("summary", summary, 1) > stride:
        raise PatternError(f"summary={summary} must be in [1, stride={stride}]")
    own = dsl.block_local(stride) & dsl.causal()
    summaries = dsl.mask(lambda b, h, q_idx, kv_idx: kv_idx % stride >= stride - summary) & dsl.causal()
    return (own | summaries) if merged else dsl.per_head([own, summaries])


# global_blocks * block tokens are listed one by one: keep the list a sane size.
_MAX_GLOBAL_TOKENS = 1 << 24


def bigbird(block: int = 64, window_blocks: int = 3, global_blocks: int = 2, random_blocks: int = 3,
            seed: int = 0, causal: bool = False) -> Pattern:
    """BigBird (Zaheer et al. 2020, arXiv 2007.14062, sec. 2 and App. D, BIGBIRD-ITC).

    Block-sparse: each query block sees ``window_blocks`` neighbouring blocks (centred), the
    first ``global_blocks`` blocks are global (see and are seen by all), and each query block
    sees ``random_blocks`` random key blocks drawn from ``seed``. At a sequence shorter than the
    global blocks, the tokens that exist are global (the global part is clipped to the length).

    Args:
        block: block size in tokens. Default 64.
        window_blocks: width of the block window, odd (3 = previous, own and next). Default 3.
        global_blocks: leading blocks that are global. Default 2.
        random_blocks: random key blocks per query block. Default 3.
        seed: seed of the random draw. Default 0.
        causal: restrict to keys at or before the query. Default False.
    """
    block = int_param("block", block, 1)
    if int_param("window_blocks", window_blocks, 1) % 2 == 0:
        raise PatternError(f"window_blocks={window_blocks} must be a positive odd number (centred window)")
    global_blocks = int_param("global_blocks", global_blocks, 0, _MAX_GLOBAL_TOKENS // block)
    p = dsl.block_window(window_blocks // 2, block)
    if global_blocks:
        p = p | dsl.global_tokens(range(global_blocks * block), clip=True)
    if random_blocks:
        p = p | dsl.random_blocks(random_blocks, block, seed)
    return p.causal() if causal else p


def longformer(window: int = 256, dilation: int = 1, global_indices: Sequence[int] = (0,),
               causal: bool = False) -> Pattern:
    """Longformer (Beltagy et al. 2020, arXiv 2004.05150, sec. 3.1): (dilated) sliding window
    plus task-specific global attention.

    Args:
        window: attended positions on each side, before dilation (``w/2`` in the paper). Default 256.
        dilation: gap between attended positions (1 = no dilation). Default 1.
        global_indices: positions with global attention (e.g. [CLS]). Default (0,).
        causal: restrict to keys at or before the query. Default False.
    """
    dilation = int_param("dilation", dilation, 1)
    p = dsl.dilated_window(window, dilation) if dilation > 1 else dsl.sliding_window(window)
    if global_indices:
        p = p | dsl.global_tokens(global_indices)
    return p.causal() if causal else p


def logsparse(local: int = 0) -> Pattern:
    """LogSparse attention (Li et al. 2019, arXiv 1907.00235, sec. 3.2, Fig. 3): each position
    attends to itself and to the positions at distances 1, 2, 4, 8, ... before it (causal),
    optionally plus a local window.

    Args:
        local: also attend to the previous ``local`` positions. Default 0.
    """
    local = int_param("local", local, 0)
    p = dsl.mask(lambda b, h, q_idx, kv_idx: (q_idx >= kv_idx) & (((q_idx - kv_idx) & (q_idx - kv_idx - 1)) == 0))
    if local:
        p = p | (dsl.sliding_window(local) & dsl.causal())
    return p


def axial(cols: int = 64, causal: bool = False) -> Pattern:
    """Axial attention (Ho et al. 2019, arXiv 1912.12180, sec. 3) on a row-major 2-D grid:
    each position attends to its own row and its own column.

    Args:
        cols: grid width (row length); the grid has ``L / cols`` rows. Default 64.
        causal: restrict to keys at or before the query. Default False.
    """
    cols = int_param("cols", cols, 0)  # type and int64 range; dsl.block_local checks cols >= 1
    p = dsl.block_local(cols) | dsl.strided(cols)
    return p.causal() if causal else p
