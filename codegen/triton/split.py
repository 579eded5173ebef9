"""Split-K ("flash-decoding") for the Triton forward: when to split, how far, and the merge.

A decode step (a few query rows against a long key sequence) gives the plain forward one program
per (query tile, batch*head), each looping over every key block of its row: no parallelism
across the keys. The split kernel (``_attn_fwd_split`` in templates/forward.py) cuts each row's
key blocks -- its full ranges then its partial blocks, numbered in that order -- into
``num_splits`` chunks, one program per chunk, each writing a normalized partial output and its
log-sum-exp; :func:`merge_partials` combines them here with torch ops (a few small reductions
over the split axis, negligible next to the key walk).

``ATTNC_SPLIT_K`` forces the choice: ``0``/``off`` never splits, ``on`` splits with the automatic
count, an integer ``n >= 2`` splits into ``n`` chunks (as many as the row has key blocks at most).
"""

from __future__ import annotations

import functools
import math
import os

import numpy as np
import torch

from attncompiler.errors import ScheduleError
from attncompiler.layout.block_layout import BlockLayout

MIN_ROW_BLOCKS = 8  # rows with fewer key blocks gain nothing from a split
TARGET_PROGRAMS = 256  # enough programs to fill a large GPU (about 2 per SM)
MIN_CHUNK = 4  # key blocks per chunk at least, under the automatic count


def split_mode() -> int | str:
    """``ATTNC_SPLIT_K`` read: ``"auto"``, ``0`` (off), ``"on"``, or a forced chunk count ``n >= 2``.

    Raises:
        ScheduleError: a value that is none of these.
    """
    raw = os.environ.get("ATTNC_SPLIT_K", "auto").strip().lower()
    if raw in ("", "auto"):
        return "auto"
    if raw in ("0", "off"):
        return 0
    if raw == "on":
        return "on"
    if raw.isdigit() and int(raw) >= 2:
        return int(raw)
    raise ScheduleError(f"ATTNC_SPLIT_K={raw!r} is not understood; use auto, 0/off, on, or a chunk count >= 2")


@functools.lru_cache(maxsize=64)
def row_key_blocks(layout: BlockLayout) -> int:
    """The most key blocks (full and partial) any query-block row of ``layout`` visits."""
    f = layout.bcsr_ranges()
    nr = f["full_kv_num_ranges"].numpy()
    rng = f["full_kv_ranges"].numpy().astype(np.int64)
    used = np.arange(rng.shape[-2]) < nr[..., None]  # padding ranges left out
    full = np.where(used, rng[..., 1] - rng[..., 0], 0).sum(-1)
    total = full + f["kv_num_blocks"].numpy()
    return int(total.max()) if total.size else 0


def num_splits(layout: BlockLayout, q_len: int, q_tiles: int, batch_heads: int) -> int:
    """Chunks per row for this call: 1 (the plain kernel) unless the queries fit one layout block
    row and the rows are long, or ``ATTNC_SPLIT_K`` forces a count."""
    mode = split_mode()
    if mode == 0:
        return 1
    blocks = row_key_blocks(layout)
    if isinstance(mode, int):
        return max(1, min(mode, blocks))
    if mode == "auto" and (q_len > layout.block_m or blocks <= MIN_ROW_BLOCKS):
        return 1
    want = max(2, math.ceil(TARGET_PROGRAMS / max(1, q_tiles * batch_heads)))
    return max(1, min(want, blocks // MIN_CHUNK if mode == "auto" else blocks))


def chunk_size(layout: BlockLayout, splits: int) -> tuple[int, int]:
    """``(CH, n)``: key blocks per chunk and the number of non-empty chunks for ``splits``."""
    blocks = max(1, row_key_blocks(layout))
    ch = -(-blocks // splits)
    return ch, -(-blocks // ch)


def merge_partials(out_p: torch.Tensor, lse_p: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine chunk partials ``out_p [S, B, H, Lq, Dv]`` (each normalized over its chunk) and
    ``lse_p [S, B, H, Lq]`` (natural log, -inf for a chunk with no visible key) into ``(out, lse)``.

    Rows no chunk sees give zeros and lse -inf, as in the plain kernel.
    """
    m = lse_p.amax(0)
    m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)  # all -inf: shift by 0, weights 0
    w = torch.exp(lse_p - m_safe)  # [S, B, H, Lq]; exp(-inf) = 0 for empty chunks
    den = w.sum(0)
    out = (w.unsqueeze(-1) * out_p).sum(0) / torch.where(den == 0, torch.ones_like(den), den).unsqueeze(-1)
    lse = torch.where(den == 0, torch.full_like(den, float("-inf")), m_safe + torch.log(den))
    return out.to(dtype), lse
