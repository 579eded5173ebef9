"""PyTorch implementation of the ``DenseAttention`` stage: SDPA's fused flash kernel for CPU.

Where the block-sparse CPU kernels are built (x86-64 with AVX2, see :mod:`.fused_cpu`) they
run full and causal attention too: they measured faster than SDPA's kernel on both, so this
stage hands every call but decode-shaped ones (one query row) to the block-sparse stage.
Elsewhere (other CPUs, no compiler, ``ATTNC_CPU_KERNELS=0``) SDPA's kernel runs as follows.

A pattern that is exactly ``full()`` or exactly (top-left) causal is what ATen's
``_scaled_dot_product_flash_attention_for_cpu`` computes with ``is_causal`` False / True; it
returns the log-sum-exp, and its backward (``..._for_cpu_backward``) recomputes from it, so both
directions run as one parallel region each instead of the block loop's many small ops.

GQA: for ``full()`` the query heads sharing a key/value head are folded into its query rows
(a view; K/V read once); causal rows cannot be folded (row positions would change), so K/V are
repeated per query head and their gradients summed back.

Falls back to the block-sparse path (exactly the ``BlockSparseAttention`` stage) for float64,
non-CPU tensors, a value width different from the key width, empty lengths (the fused kernel
divides by zero there) and call-time positions it cannot express: a causal call at a query
offset where some row does not see every key, or runtime documents (a causal call whose first
row sees every key, such as a decode step, runs as full attention). ``full()`` ignores offsets (every key stays visible), and key
padding (``kv_lens``) arrives as already-sliced keys.
"""

from __future__ import annotations

import torch

from attncompiler.program.autograd_guard import single_backward
from attncompiler.program.dense import DenseAttention
from attncompiler.program.positions import group_layout
from attncompiler.program.schedule import blocks as with_blocks

from ..context import RunContext
from . import fused_cpu
from .attention import block_sparse_attention

FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def fused_applies(causal: bool, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions=None) -> bool:
    """Whether SDPA's fused kernel runs this call: it computes it exactly (see the module
    docstring) and the block-sparse CPU kernels are not available for it (where they are, they
    measured 1.04-1.48x faster than SDPA's kernel on full and causal attention, forward and
    forward+backward, 1 and 2 threads: docs/benchmarks.md, dense patterns; decode-shaped calls keep SDPA)."""
    if q.device.type != "cpu" or q.dtype not in FUSED_DTYPES or not (q.dtype == k.dtype == v.dtype):
        return False
    if q.shape[-1] != v.shape[-1] or 0 in q.shape or 0 in k.shape:
        return False
    if positions is not None:
        if getattr(positions, "doc_lengths", None) is not None:
            return False
        if causal and getattr(positions, "q_offset", 0) != 0 and fused_causal(causal, k.shape[2], positions):
            return False
    if q.shape[2] > 1 and fused_cpu.enabled():
        return False
    return True


def fused_causal(causal: bool, kv_len: int, positions=None) -> bool:
    """The kernel's ``is_causal`` for a call: False when the first row already sees every key
    (``q_offset >= Lk - 1``, a decode step), where causal attention is full attention."""
    return causal and getattr(positions, "q_offset", 0) < kv_len - 1


def _prepare(q, k, v, causal: bool):
    """``(q', k', v')`` with equal head counts: GQA folded (full) or K/V repeated (causal)."""
    B, H, Lq, D = q.shape
    Hkv = k.shape[1]
    if H == Hkv:
        return q, k, v
    G = H // Hkv
    if not causal:
        return q.reshape(B, Hkv, G * Lq, D), k, v
    return q, k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)


def _forward(q, k, v, causal: bool, scale: float):
    """``(out, lse)`` in the caller's shapes, and the kernel's own ``(q', k', v', out', lse')``."""
    qq, kk, vv = _prepare(q, k, v, causal)
    out, lse = _flash(qq, kk, vv, 0.0, causal, scale=scale)
    B, H, Lq, _ = q.shape
    o, l = out.reshape(B, H, Lq, v.shape[-1]), lse.reshape(B, H, Lq)
    # The kernel returns a zero row (lse 0) for a query row holding NaN; unchecked NaN inputs must
    # come back as NaN, never as a plausible row (NaN in k or v already propagates). One pass over q.
    nan_rows = q.isnan().any(-1)
    if nan_rows.any():
        o, l = o.masked_fill(nan_rows[..., None], float("nan")), l.masked_fill(nan_rows, float("nan"))
    return (o, l), (qq, kk, vv, out, lse)


class DenseAttentionFn(torch.autograd.Function):
    """Differentiable dense (full or top-left causal) attention through the fused CPU kernel."""

    @staticmethod
    def forward(ctx, q, k, v, causal: bool, scale: float):
        (out, lse), saved = _forward(q, k, v, causal, scale)
        ctx.save_for_backward(*saved)
        ctx.causal, ctx.scale, ctx.shapes = causal, scale, (q.shape, k.shape)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @single_backward("DenseAttention (torch backend, fused CPU kernel)")
    def backward(ctx, dout, _dlse):
        dq, dk, dv = _backward(*ctx.saved_tensors, dout, ctx.causal, ctx.scale, *ctx.shapes)
        return dq, dk, dv, None, None


def _backward(qq, kk, vv, out, lse, dout, causal: bool, scale: float, q_shape, k_shape):
    """``(dq, dk, dv)`` in the caller's shapes from the kernel's own saved tensors."""
    dq, dk, dv = _flash_backward(dout.reshape(out.shape).contiguous(), qq, kk, vv, out, lse, 0.0,
                                 causal, scale=scale)
    if dk.shape != k_shape:  # causal GQA: K/V were repeated per query head
        B, Hkv, Lk, D = k_shape
        dk = dk.view(B, Hkv, -1, Lk, D).sum(2)
        dv = dv.view(B, Hkv, -1, Lk, dv.shape[-1]).sum(2)
    return dq.reshape(q_shape), dk, dv


def dense_attention_backward(q, k, v, out, lse, dout, causal: bool, scale: float):
    """``(dq, dk, dv)`` of :func:`dense_attention` given its ``out`` and ``lse`` (for callers
    that run the forward and backward apart, such as the custom operators)."""
    qq, kk, vv = _prepare(q, k, v, causal)
    shaped_out = out.reshape(qq.shape[:-1] + (v.shape[-1],))
    shaped_lse = lse.to(torch.float32).reshape(qq.shape[:-1])
    return _backward(qq, kk, vv, shaped_out, shaped_lse, dout, causal, scale, q.shape, k.shape)


def dense_attention(q, k, v, causal: bool, scale: float):
    """``(out [B,H,Lq,Dv], lse [B,H,Lq] float32)`` of full / top-left causal attention with the
    fused kernel; differentiable in q, k, v. Call only where :func:`fused_applies` is True."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return DenseAttentionFn.apply(q, k, v, causal, scale)
    return _forward(q, k, v, causal, scale)[0]


# Keys and values per head above which a dense row streams them from memory rather than from
# cache; the block-sparse kernels then take query blocks of LONG_ROW_BLOCK_M rows, which read each
# key/value block once for more queries. Measured (docs/benchmarks.md, dense patterns): at L=16384,
# D=64 (8 MiB per head) full and causal forwards ran 1.05x SDPA's fused kernel with 256-row blocks
# and 0.89-0.99x with 64; at L <= 8192 (4 MiB) 64-row blocks stay the fastest.
LONG_ROW_KV_BYTES = 6 << 20
LONG_ROW_BLOCK_M = 256


def kernel_block_m(schedule, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> int:
    """The query block of a dense stage on the block-sparse CPU kernels: the schedule's, or
    :data:`LONG_ROW_BLOCK_M` for rows whose keys and values exceed :data:`LONG_ROW_KV_BYTES`."""
    kv_bytes = k.shape[2] * (k.shape[3] + v.shape[3]) * 4  # the kernels compute in float32
    if kv_bytes > LONG_ROW_KV_BYTES and q.shape[2] >= 2 * LONG_ROW_BLOCK_M and fused_cpu.operands_fit(q, k, v):
        return max(schedule.block_m, LONG_ROW_BLOCK_M)
    return schedule.block_m


def run_dense(stage: DenseAttention, env: dict, ctx: RunContext) -> dict:
    """Run one ``DenseAttention`` stage: the fused kernel where it applies, else block-sparse."""
    q, k, v = (env[n] for n in stage.inputs)
    positions = ctx.extra.get("positions")
    if fused_applies(stage.causal, q, k, v, positions):
        out, lse = dense_attention(q, k, v, fused_causal(stage.causal, k.shape[2], positions), ctx.scale)
        return dict(zip(stage.outputs, (out, lse)))
    s = stage.schedule
    bm = kernel_block_m(s, q, k, v)
    if bm != s.block_m:
        s = with_blocks(s, bm, s.block_n)
    layout = group_layout(stage.pattern, q.shape[2], k.shape[2], s.block_m, s.block_n, batch=ctx.batch,
                          heads=ctx.heads, positions=positions)
    out, lse = block_sparse_attention(q, k, v, layout, s, ctx.scale, ctx.extra.get("need_lse", True))
    return dict(zip(stage.outputs, (out, lse)))
