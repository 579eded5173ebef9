"""Helpers the PyTorch stages share: operand views, block gathers, row folds and padding, the compute dtype,
the loop over a layout's block groups."""

from __future__ import annotations

from typing import NamedTuple

import torch

from attncompiler.layout.block_layout import BlockLayout, Blocks2D

from .attention_plan import Chunk, Step


class Operands:
    """q/k/v padded to whole blocks and viewed block-wise, in the compute dtype (``v`` may be
    None for stages that only need scores, e.g. :mod:`torch_probs`)."""

    def __init__(self, q, k, v, g, scale, compute_dtype):
        B, H, Lq, D = q.shape
        Hkv = k.shape[1]
        self.G = H // Hkv
        self.B, self.Hkv, self.D = B, Hkv, D
        self.Dv = D if v is None else v.shape[-1]
        self.nqb, self.nkb = g.nqb, g.nkb
        self.bm, self.bn = g.block_m, g.block_n
        qs = q.to(compute_dtype) * scale
        self.q = pad_len(qs, g.nqb * g.block_m).view(B, Hkv, self.G, g.nqb, g.block_m, D)
        self.k = key_blocks(k, g, compute_dtype)
        self.v = None if v is None else key_blocks(v, g, compute_dtype)

    def rows(self, t: torch.Tensor, chunk: Chunk) -> torch.Tensor:
        """``[B, Hkv, G, nqb, bm, X]`` -> the chunk's rows ``[B, Hkv, G, R, bm, X]`` (a view if consecutive)."""
        if chunk.q_slice is not None:
            return t[:, :, :, chunk.q_slice[0]:chunk.q_slice[1]]
        return t.index_select(3, chunk.q_index)

    def keys(self, blocks_view: torch.Tensor, chunk: Chunk, step: Step) -> torch.Tensor:
        """Key (or value) blocks of a step as ``[B, Hkv, R, C*bn, X]`` (see :func:`step_keys`)."""
        return step_keys(blocks_view, chunk, step)

def key_blocks(t: torch.Tensor, g, compute_dtype) -> torch.Tensor:
    """``[B, Hkv, Lk, X]`` -> padded block view ``[B, Hkv, nkb, bn, X]`` in the compute dtype."""
    B, Hkv, _, X = t.shape
    return pad_len(t.to(compute_dtype), g.nkb * g.block_n).contiguous().view(B, Hkv, g.nkb, g.block_n, X)

def step_keys(blocks_view: torch.Tensor, chunk: Chunk, step: Step) -> torch.Tensor:
    """Key (or value) blocks of a step as ``[B, Hkv, R, C*bn, X]``: a strided view for
    affine bands (no copy; per-head slices are plain 3-D strided matrices), else a gather."""
    C, R = step.c1 - step.c0, len(chunk.rows)
    B, Hkv, _, bn, X = blocks_view.shape
    if step.affine is not None:
        c0, st = step.affine
        sB, sH, sK, sN, sX = blocks_view.stride()
        return blocks_view.as_strided((B, Hkv, R, C * bn, X), (sB, sH, st * sK, sN, sX),
                                      blocks_view.storage_offset() + c0 * sK)
    # A 2-D row gather is much faster than index_select on dim 2 of a 5-D tensor.
    nkb = blocks_view.shape[2]
    offsets = torch.arange(B * Hkv, device=blocks_view.device)[:, None] * nkb
    idx = (offsets + chunk.step_index(step).to(blocks_view.device)[None, :]).reshape(-1)
    rows = blocks_view.reshape(B * Hkv * nkb, bn * X).index_select(0, idx)
    return rows.view(B, Hkv, R, C * bn, X)

def fold(t: torch.Tensor) -> torch.Tensor:
    """``[G, R, bm, X]`` -> ``[R, G*bm, X]`` (GQA heads folded into rows; a view when G == 1)."""
    G, R, bm, X = t.shape
    return t[0] if G == 1 else t.permute(1, 0, 2, 3).reshape(R, G * bm, X)

def _unfold_into(dst: torch.Tensor, val: torch.Tensor) -> None:
    """Write ``[R, G*bm, X]`` into a ``[G, R, bm, X]`` destination."""
    G, R, bm, X = dst.shape
    dst.copy_(val.view(R, G, bm, X).transpose(0, 1))

def pad_len(t: torch.Tensor, n: int) -> torch.Tensor:
    """Zero-pad ``t`` ``[B, H, L, X]`` along the sequence axis to ``n`` tokens (unchanged when ``L == n``)."""
    L = t.shape[2]
    return t if L == n else torch.nn.functional.pad(t, (0, 0, 0, n - L))

def write_rows(dst: torch.Tensor, val: torch.Tensor, chunk: Chunk) -> None:
    """Write ``[R, G*bm, X]`` into the chunk's rows of ``dst [G, nqb, bm, X]``."""
    if chunk.q_slice is not None:
        _unfold_into(dst[:, chunk.q_slice[0]:chunk.q_slice[1]], val)
    else:
        G, _, bm, X = dst.shape
        R = val.shape[0]
        dst.index_copy_(1, chunk.q_index, val.view(R, G, bm, X).transpose(0, 1))

def compute_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """The dtype to compute in for inputs of ``dtype``: float64 stays float64, all else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class GroupCall(NamedTuple):
    """One call of a loop over a layout's block groups: its blocks, the first batch entry and
    query head it covers, and the slices selecting them (``bs``, ``hs``) and their key/value heads
    (``ks``) in ``[B, H, ...]`` / ``[B, Hkv, ...]`` tensors."""

    blocks: Blocks2D
    b0: int
    h0: int
    bs: slice
    hs: slice
    ks: slice
    whole: bool  # the one call of a one-group layout: the whole batch and every head


def group_calls(layout: BlockLayout, B: int, H: int, G: int):
    """The :class:`GroupCall` s covering every (batch entry, query head) once: one for a one-group
    layout, else one per (b, h) with head h's key/value head ``h // G``."""
    if len(layout.groups) == 1:
        yield GroupCall(layout.groups[0], 0, 0, slice(None), slice(None), slice(None), True)
        return
    for b in range(B):
        for h in range(H):
            yield GroupCall(layout.group_for(b, h), b, h, slice(b, b + 1), slice(h, h + 1),
                            slice(h // G, h // G + 1), False)
