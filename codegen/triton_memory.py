"""Triton implementation of the ABC memory stages.

The causal read (``SlotRead``) is one Triton kernel: a program per (chunk, batch * query head)
loads its query chunk, the chunk's keys/values/write weights and the memory entering the
chunk (from ``SlotWrite``), and computes ``(q S^T + tril(q k^T) e) / Z``, the softmax over
slots and ``(p / Z) S_v + tril((p / Z) e^T) v`` in registers, the same math as the torch
backend (see :mod:`attncompiler.codegen.torch_memory`). The kernel is a plain module-level
``@triton.jit`` function (it does not depend on the pattern), so it needs no rendering.

``SlotControl``, ``SlotWrite`` (one matmul and an O(T / C) scan of ``[n, D]`` states) and the
bidirectional read are a few large tensor ops and run as torch ops on the same device. The
backward pass of the read recomputes it with the torch implementation under autograd
(memory stays bounded, as there).

Interpreter note: tests run this under ``TRITON_INTERPRET=1`` at tiny sizes.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from attncompiler.memory_slots import SlotControl, SlotRead, SlotWrite

from .registry import RunContext, register_stage
from .torch_memory import SlotMemory, read_memory, run_slot_control, run_slot_write


@triton.jit
def _slot_read_kernel(q_ptr, kv_ptr, e_ptr, st_ptr, out_ptr, lse_ptr, scale, Lr, B, H, G, Hkv,
                      s_qb, s_qh, s_ql, s_ob, s_oh, s_ol,
                      C: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, F: tl.constexpr, NS: tl.constexpr,
                      BC: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, BN: tl.constexpr,
                      NORMALIZED: tl.constexpr, MAY_BE_EMPTY: tl.constexpr, DOT_PREC: tl.constexpr):
    c = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // G
    rows = tl.arange(0, BC)
    dd = tl.arange(0, BD)
    dv = tl.arange(0, BDV)
    ss = tl.arange(0, BN)
    pos = c * C + rows  # token positions of this chunk
    row_ok = (rows < C) & (pos < Lr)
    q = tl.load(q_ptr + b * s_qb + h * s_qh + pos[:, None] * s_ql + dd[None, :],
                mask=row_ok[:, None] & (dd[None, :] < D), other=0.0).to(tl.float32) * scale  # [BC, BD]
    chunk = (c * B + b) * Hkv + hk  # flat index into the [N, B, Hkv] leading dims of the memory tensors
    kvb = kv_ptr + chunk * C * F
    k = tl.load(kvb + rows[:, None] * F + dd[None, :], mask=(rows[:, None] < C) & (dd[None, :] < D), other=0.0)
    v = tl.load(kvb + rows[:, None] * F + D + dv[None, :], mask=(rows[:, None] < C) & (dv[None, :] < DV), other=0.0)
    e = tl.load(e_ptr + chunk * C * NS + rows[:, None] * NS + ss[None, :],
                mask=(rows[:, None] < C) & (ss[None, :] < NS), other=0.0)  # [BC, BN]
    stb = st_ptr + chunk * NS * F
    sk = tl.load(stb + ss[:, None] * F + dd[None, :], mask=(ss[:, None] < NS) & (dd[None, :] < D), other=0.0)
    sv = tl.load(stb + ss[:, None] * F + D + dv[None, :], mask=(ss[:, None] < NS) & (dv[None, :] < DV), other=0.0)
    causal = rows[:, None] >= rows[None, :]
    a = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)  # [BC, BC] q_i . k_j
    a = tl.where(causal, a, 0.0)
    score = tl.dot(q, tl.trans(sk), input_precision=DOT_PREC) + tl.dot(a, e, input_precision=DOT_PREC)  # [BC, BN]
    slot_ok = ss[None, :] < NS
    if NORMALIZED:
        zin = tl.load(stb + ss * F + (F - 1), mask=ss < NS, other=0.0)  # [BN]
        z = zin[None, :] + tl.cumsum(e, axis=0)  # [BC, BN] normalizer of each row's memory
        if MAY_BE_EMPTY:
            slot_ok = slot_ok & (z > 0)
        zs = tl.where(z > 0, z, 1.0)
        score = score / zs
    score = tl.where(slot_ok, score, float("-inf"))
    m = tl.max(score, axis=1)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    p = tl.exp(score - m_safe[:, None])  # empty slots: 0
    l = tl.sum(p, axis=1)
    l_safe = tl.where(l > 0, l, 1.0)
    p = p / l_safe[:, None]
    lse = tl.where(l > 0, m_safe + tl.log(l_safe), float("-inf"))
    if NORMALIZED:
        p = p / zs
    bmat = tl.where(causal, tl.dot(p, tl.trans(e), input_precision=DOT_PREC), 0.0)  # [BC, BC]
    out = tl.dot(p, sv, input_precision=DOT_PREC) + tl.dot(bmat, v, input_precision=DOT_PREC)  # [BC, BDV]
    tl.store(out_ptr + b * s_ob + h * s_oh + pos[:, None] * s_ol + dv[None, :], out,
             mask=row_ok[:, None] & (dv[None, :] < DV))
    tl.store(lse_ptr + bh * Lr + pos, lse, mask=row_ok)


def _p2(x: int) -> int:
    return max(16, triton.next_power_of_2(x))


def triton_causal_read(q: torch.Tensor, mem: SlotMemory, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward of the causal read with the Triton kernel -> ``out [B, H, Lr, Dv]``, ``lse [B, H, Lr]``."""
    B, H, Lq, D = q.shape
    N, _, Hkv, C, F = mem.kv1.shape
    n, Dv = mem.e.shape[-1], F - D - 1
    Lr = min(Lq, mem.kv_len)
    assert mem.dtype == torch.float32, "float64 memories (huge logit spreads) take the torch path"
    out = torch.empty(B, H, Lr, Dv, dtype=torch.float32, device=q.device)
    lse = torch.empty(B, H, Lr, dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(Lr, C), B * H)
    _slot_read_kernel[grid](q, mem.kv1, mem.e, mem.state, out, lse, scale, Lr, B, H, H // Hkv, Hkv,
                            q.stride(0), q.stride(1), q.stride(2), out.stride(0), out.stride(1), out.stride(2),
                            C=C, D=D, DV=Dv, F=F, NS=n, BC=_p2(C), BD=_p2(D), BDV=_p2(Dv), BN=_p2(n),
                            NORMALIZED=mem.normalized, MAY_BE_EMPTY=mem.may_be_empty, DOT_PREC="ieee")
    return out, lse


class _TritonReadFn(torch.autograd.Function):
    """Triton forward; backward recomputes the read with the torch implementation."""

    @staticmethod
    def forward(ctx, q, kv1, e, state, final, mem: SlotMemory, scale: float):
        ctx.mem, ctx.scale = mem, scale
        ctx.save_for_backward(q, kv1, e, state, final)
        out, lse = triton_causal_read(q.float(), mem, scale)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, kv1, e, state, final = (t.detach().requires_grad_() for t in ctx.saved_tensors)
        mem = dataclasses.replace(ctx.mem, kv1=kv1, e=e, state=state, final=final)
        with torch.enable_grad():
            out, _ = read_memory(q, mem, ctx.scale, need_lse=False)
            grads = torch.autograd.grad(out[:, :, :dout.shape[2]], (q, kv1, e, state, final), dout,
                                        allow_unused=True)
        return (*grads, None, None)


register_stage("triton", SlotControl)(run_slot_control)
register_stage("triton", SlotWrite)(run_slot_write)


@register_stage("triton", SlotRead)
def run_slot_read(stage: SlotRead, env: dict, ctx: RunContext) -> dict:
    q, mem = (env[name] for name in stage.inputs)
    need_lse = ctx.extra.get("need_lse", True)
    if not mem.causal or mem.dtype != torch.float32 or q.shape[2] > mem.kv_len:
        # bidirectional: two small matmuls; float64 memories and queries past the last key:
        # the torch implementation on the same device
        out, lse = read_memory(q, mem, ctx.scale, need_lse, stage.schedule.tile_elems)
        return dict(zip(stage.outputs, (out, lse)))
    out, lse = _TritonReadFn.apply(q, mem.kv1, mem.e, mem.state, mem.final, mem, ctx.scale)
    return dict(zip(stage.outputs, (out, lse)))
