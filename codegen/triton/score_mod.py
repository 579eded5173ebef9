"""Block-sparse attention with a traced score_mod and attention sinks on the Triton backend.

The score_mod's expression is rendered into the forward, dq and dk/dv kernels
(:mod:`.score_render`, ``SCORE_MOD=True``); its captured float tensors are flattened into one
float32 buffer per call (they are parameters: their values change every step, the kernel text
does not). The backward includes ``d score_mod / d score`` in the kernels. Gradients of captured
tensors are not computed by the kernels: when one is needed, the whole backward runs on the
torch backend's implementation (:func:`attncompiler.codegen.pytorch.score_mod.run_backward`, the
same device tensors), which computes them exactly. Sinks are autograd on top of a differentiable
lse, as on the torch backend.
"""

from __future__ import annotations

import numpy as np
import torch

from attncompiler.dsl.score_mod import captured_tensors, check_captured_grads, check_device, check_sinks
from attncompiler.errors import InputError, UnsupportedError
from attncompiler.ir.fexpr import FLoad
from attncompiler.ir.score_trace import ScoreTrace, trace_score_mod
from attncompiler.layout.block_layout import BlockLayout
from attncompiler.program.autograd_guard import single_backward

from ..pytorch.score_mod import apply_sinks, run_backward as torch_backward
from .common import on_device
from .kernels import make_plan, run_backward, run_forward
from .score_render import int_parts, render_score_mod

MAX_DIMS = 4  # smeta holds offset, length and up to four strides per captured tensor


def traced(score_mod) -> ScoreTrace:
    """The score_mod's trace, or :class:`UnsupportedError` naming it when it is opaque."""
    t = trace_score_mod(score_mod)
    if t.expr is None:
        raise UnsupportedError(f"the triton backend needs a traceable score_mod; {score_mod!r} is opaque "
                               f"({t.failure}); hint: use backend='torch', which evaluates it on tensors")
    return t


def check_reads(t: ScoreTrace, batch: int, heads: int, q_end: int, kv_len: int) -> None:
    """Raise :class:`InputError` when a captured tensor may be read out of range for these sizes
    (torch would raise IndexError; a kernel would read another element)."""
    box = {"b": (np.int64(0), np.int64(batch - 1)), "h": (np.int64(0), np.int64(heads - 1)),
           "q_idx": (np.int64(0), np.int64(q_end - 1)), "kv_idx": (np.int64(0), np.int64(kv_len - 1))}
    for node in t.expr.walk():
        if isinstance(node, FLoad):
            if len(node.shape) > MAX_DIMS:
                raise UnsupportedError(f"the triton backend reads captured tensors of at most {MAX_DIMS} "
                                       f"dimensions; t{node.slot} has shape {node.shape}")
            for d, ix in enumerate(node.index):
                lo, hi = (int(np.min(x)) for x in ix.bounds(box))
                if lo < -node.shape[d] or hi >= node.shape[d] or lo < 0:
                    raise InputError(f"score_mod reads a captured tensor of shape {node.shape} at index {ix!r} "
                                     f"(dimension {d}) over [{lo}, {hi}] for batch={batch}, heads={heads}, "
                                     f"query positions < {q_end}, keys < {kv_len}; hint: size the tensor to the "
                                     "call (the query axis is indexed by position)")


def score_args(t: ScoreTrace, buffers, device) -> tuple[torch.Tensor, ...]:
    """``(sbuf, smeta, mbufs, mbuf_meta)``: captured tensors flattened to float32 with
    ``[offset, length, stride0..3]`` each, and the expression's integer tables."""
    flats, meta, off = [], [], 0
    for x in t.tensors:
        if x.device != device:
            raise InputError(f"score_mod captures a tensor {tuple(x.shape)} on {x.device} but q is on {device}")
        f = x.detach().to(torch.float32).contiguous().reshape(-1)
        strides = list(x.contiguous().stride()) if x.dim() else []
        meta.append([off, f.numel(), *(strides + [0] * (MAX_DIMS - len(strides)))])
        flats.append(f)
        off += f.numel()
    sbuf = torch.cat(flats) if flats else torch.zeros(1, dtype=torch.float32, device=device)
    smeta = torch.tensor(meta or [[0] * 6], dtype=torch.int64).reshape(-1).to(device)
    if buffers:
        lengths = [len(b) for b in buffers]
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        mbufs = torch.from_numpy(np.concatenate([b.data for b in buffers])).to(device)
        mmeta = torch.tensor(np.stack([offsets, lengths], axis=1), dtype=torch.int64).reshape(-1).to(device)
    else:
        mbufs, mmeta = torch.zeros(1, dtype=torch.int64, device=device), torch.zeros(2, dtype=torch.int64, device=device)
    return sbuf, smeta, mbufs, mmeta


class TritonScoreModFn(torch.autograd.Function):
    """Generated kernels with a rendered score_mod; differentiable in q, k, v, lse and the
    captured tensors (those through the torch backend's backward, see the module docstring)."""

    @staticmethod
    def forward(ctx, q, k, v, plan, scale, fn, layout, *captured):
        with on_device(q):
            out, lse = run_forward(plan, q, k, v, scale)
        ctx.save_for_backward(q, k, v, out, lse, *captured)
        ctx.plan, ctx.scale, ctx.fn, ctx.layout = plan, scale, fn, layout
        ctx.captured_ids = [id(x) for x in captured]
        return out, lse

    @staticmethod
    @single_backward("BlockSparseAttention with score_mod (triton backend)")
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, *captured = ctx.saved_tensors
        if any(ctx.needs_input_grad[7:]):  # captured tensors' gradients: the torch implementation
            dq, dk, dv, cg = torch_backward(q, k, v, out, lse, dout, dlse, ctx.layout, ctx.plan.schedule,
                                            ctx.scale, ctx.fn, tuple(range(q.shape[0])),
                                            list(zip(ctx.captured_ids, captured)))
            return (dq, dk, dv, None, None, None, None, *cg)
        with on_device(q):
            dq, dk, dv = run_backward(ctx.plan, q, k, v, out, lse, dout.contiguous(), ctx.scale, dlse)
        return (dq, dk, dv, None, None, None, None, *([None] * len(captured)))


def triton_score_mod_attention(q, k, v, layout: BlockLayout, schedule, scale: float, score_mod=None, sinks=None,
                               batch_index=None):
    """``(out, lse)`` with the score_mod rendered into the generated kernels and ``sinks`` in the
    denominator (see :func:`attncompiler.codegen.pytorch.score_mod.score_mod_attention`)."""
    B, H = q.shape[:2]
    g = layout.geom
    text, sargs, captured, fn = "", (), (), None
    if score_mod is not None:
        t = traced(score_mod)
        uses_b = any("b" in e.variables() for n in t.expr.walk() for e in int_parts(n))
        if batch_index is not None and uses_b:
            raise UnsupportedError(f"score_mod {score_mod!r} reads the batch index and this call runs a subset of "
                                   "the batch (per-entry q_offset or kv_lens); use backend='torch'")
        check_reads(t, B, H, g.q_end, g.kv_len)
        text, buffers = render_score_mod(t.expr)
        sargs = score_args(t, buffers, q.device)
        # Gradients go to the tensors the function holds (the trace's slots may be views made
        # while tracing, which a re-evaluation in the backward would not reuse).
        captured, fn = captured_tensors(score_mod), score_mod
        check_device(captured, q.device, fn)
        if torch.is_grad_enabled() and any(x.requires_grad for x in captured):
            check_captured_grads(fn, captured, torch.float32, q.device)
    plan = make_plan(layout, schedule, q.dtype, q.device, text, sargs)
    out, lse = TritonScoreModFn.apply(q, k, v, plan, scale, fn, layout, *captured)
    if sinks is not None:
        out, lse = apply_sinks(out, lse, check_sinks(sinks, H, q.device))
    return out, lse
