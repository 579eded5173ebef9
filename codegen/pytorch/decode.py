"""Fused decoding on the torch backend: a few query rows whose keys form one or several contiguous runs.

A decode step of a pattern such as ``(sliding_window(w) | global_tokens(g)).causal()`` sees the
global keys and the window: two runs of key blocks, which the fused single-range path
(:func:`key_range_forward`) does not take. Here every run is one fused flash-attention
call (PyTorch's CPU kernel, which returns the log-sum-exp) on its K/V slice, and the partial
results merge exactly through their log-sum-exp. The backward is the block path's (it needs
only out and lse). Measured with ``python -m attncompiler.bench.decode --pattern window_global``.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from attncompiler.layout.block_layout import Blocks2D

from .attention_plan import NEG_INF, KeyRange, single_key_range

MAX_RUNS = 8  # more runs than this: the block path's steps cost less than one call per run


@functools.lru_cache(maxsize=256)
def key_runs(blocks: Blocks2D) -> tuple[KeyRange, ...] | None:
    """The keys of a one-block-row layout as contiguous runs (at least two, at most
    :data:`MAX_RUNS`), each with its visibility mask over the rows (None: all visible); None when
    the layout has another shape or some row sees no key of some run (the merge needs a finite
    log-sum-exp from every run)."""
    g = blocks.geom
    if g.nqb != 1:
        return None
    rs, re = blocks.range_ptr[0], blocks.range_ptr[1]
    cols = [np.arange(s, e) for s, e in zip(blocks.range_start[rs:re], blocks.range_end[rs:re])]
    parts = blocks.part_cols[blocks.part_ptr[0]:blocks.part_ptr[1]]
    ids = np.unique(np.concatenate(cols + [parts]).astype(np.int64))
    if len(ids) == 0:
        return None
    breaks = np.flatnonzero(np.diff(ids) > 1) + 1
    starts, ends = np.concatenate([[0], breaks]), np.concatenate([breaks, [len(ids)]])
    if not 2 <= len(starts) <= MAX_RUNS:
        return None
    partial = set(parts.tolist())
    q = torch.arange(g.q_start, g.q_end)
    runs = []
    for a, b in zip(starts, ends):
        first, last = int(ids[a]), int(ids[b - 1])
        k0, k1 = first * g.block_n, min((last + 1) * g.block_n, g.kv_len)
        vis = torch.ones(g.q_len, k1 - k0, dtype=torch.bool)
        for blk in (c for c in ids[a:b].tolist() if c in partial):  # edge blocks of a run, in practice
            k = torch.arange(blk * g.block_n, min((blk + 1) * g.block_n, g.kv_len))
            vis[:, k - k0] = blocks.pattern.evaluate(0, 0, q[:, None], k[None, :], g.q_end, g.kv_len)
        if not bool(vis.any(dim=1).all()):
            return None
        runs.append(KeyRange(k0, k1, None if bool(vis.all()) else vis.contiguous()))
    return tuple(runs)


def key_range_forward(blocks: Blocks2D, q, k, v, scale: float, cdt: torch.dtype):
    """``(out, lse)`` of a layout whose keys are one contiguous range (decoding), or None.

    One fused flash-attention call (PyTorch's CPU kernel, which also returns the log-sum-exp)
    on the K/V slice: no block loop, no gather, parallel over heads and query rows; partial edge
    blocks take an additive mask over the slice. The backward is the block path's (it needs only
    out and lse)."""
    if not fused_applies(q, v):
        return None
    kr = single_key_range(blocks)
    return None if kr is None else fused_runs((kr,), q, k, v, scale, cdt)


def split_k_forward(blocks: Blocks2D, q, k, v, scale: float, cdt: torch.dtype):
    """``(out, lse)`` of a decode step whose keys form a few contiguous runs, or None: one fused
    call per run, merged through the log-sum-exp (:func:`fused_runs`)."""
    if not fused_applies(q, v):
        return None
    runs = key_runs(blocks)
    return None if runs is None else fused_runs(runs, q, k, v, scale, cdt)


def fused_applies(q, v) -> bool:
    """The fused CPU kernel takes the call: CPU tensors, value width = key width, some query row."""
    return q.device.type == "cpu" and q.shape[-1] == v.shape[-1] and q.shape[2] > 0


def fused_runs(runs, q, k, v, scale: float, cdt: torch.dtype):
    """``(out [B,H,Lq,D], lse [B,H,Lq])`` over the key ``runs`` (every row sees a key of every run).

    GQA heads are folded into the query rows (``[B, Hkv, G*Lq, D]``, a view), so K/V are read
    once per key/value head; each run's partial result comes with its log-sum-exp, and the merge
    ``out = sum_i exp(lse_i - lse) out_i`` with ``lse = logsumexp_i lse_i`` is exact."""
    B, H, Lq, D = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    qf = q.to(cdt).reshape(B, Hkv, G * Lq, D)
    outs, lses = [], []
    for kr in runs:
        bias = None
        if kr.visible is not None:
            bias = torch.zeros(kr.visible.shape, dtype=cdt).masked_fill_(~kr.visible, NEG_INF)
            bias = bias.repeat(G, 1).to(q.device)  # [G*Lq, n]: every folded head, same rows
        o, l = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            qf, k[:, :, kr.k0:kr.k1].to(cdt), v[:, :, kr.k0:kr.k1].to(cdt), 0.0, False, attn_mask=bias,
            scale=scale)[:2]
        outs.append(o)
        lses.append(l.to(cdt))
    if len(runs) == 1:
        return outs[0].reshape(B, H, Lq, D), lses[0].reshape(B, H, Lq)
    lse = torch.logsumexp(torch.stack(lses), dim=0)  # every row sees a key of every run: finite
    out = sum(torch.exp(l - lse)[..., None] * o for l, o in zip(lses, outs))
    return out.reshape(B, H, Lq, D), lse.reshape(B, H, Lq)
