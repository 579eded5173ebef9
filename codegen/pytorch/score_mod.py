"""Block-sparse attention with a ``score_mod`` (edge weights) and attention sinks, torch backend.

Same plan, key views and step masks as :mod:`.attention`; each step's scaled scores go through
the score_mod (called on the whole tile with broadcast index tensors, see
:mod:`attncompiler.dsl.score_mod`) before the step's additive mask, then online softmax.

The backward recomputes each step's scores and runs the score_mod under autograd:
``torch.autograd.grad(modified, [score, *captured], grad_outputs=ds)`` gives both
``ds * d score_mod / d score`` (for dq and dk) and the captured tensors' gradients, accumulated
over steps (a ``[H, num_buckets]`` table receives its scatter-add from autograd's indexing).

``lse`` is differentiable here (its gradient enters as ``delta - dlse``), so attention sinks are
plain autograd on top: ``lse' = logaddexp(lse, sink[h])``, ``out' = out * exp(lse - lse')``.
"""

from __future__ import annotations

import torch

from attncompiler.dsl.score_mod import (ScoreMod, captured_tensors, check_captured_grads, check_device, check_sinks,
                                        check_result, check_score_mod)
from attncompiler.layout.block_layout import BlockLayout
from attncompiler.program.autograd_guard import single_backward

from . import fused_cpu
from .attention import finish_rows, softmax_step
from .attention_plan import NEG_INF, make_plan, step_bias
from .common import Operands, compute_dtype_for, fold, group_calls, pad_len, write_rows


def identity_mod(score, b, h, q_idx, kv_idx):
    """The score_mod that changes nothing (sinks without a score_mod)."""
    return score


class Indices:
    """The (b, h, q_idx, kv_idx) tensors of one block group, per chunk and step, as broadcastable
    tensors for a score tile ``[R, G*bm, C*bn]``: ``b`` 0-d, ``h [1, G*bm, 1]``,
    ``q_idx [R, G*bm, 1]`` (positions), ``kv_idx [R, 1, C*bn]``; padded rows and keys are clamped
    to the last real one (they are masked anyway)."""

    def __init__(self, g, G: int, b_ids, h_base: int, device):
        self.g, self.G, self.b_ids, self.h_base, self.device = g, G, b_ids, h_base, device
        self.heads: dict[int, torch.Tensor] = {}
        self.batches: dict[int, torch.Tensor] = {}

    def batch(self, b: int) -> torch.Tensor:
        if b not in self.batches:
            self.batches[b] = torch.tensor(self.b_ids[b], device=self.device)
        return self.batches[b]

    def head(self, kh: int) -> torch.Tensor:
        if kh not in self.heads:  # the same for every chunk
            g = self.g
            h = self.h_base + kh * self.G + torch.arange(self.G * g.block_m, device=self.device) // g.block_m
            self.heads[kh] = h.view(1, -1, 1)
        return self.heads[kh]

    def query(self, chunk) -> torch.Tensor:
        g = self.g
        q = torch.from_numpy(g.q_lo(chunk.rows))[:, None] + torch.arange(g.block_m)  # [R, bm]
        q = q.clamp_max(g.q_end - 1)
        if self.G > 1:
            q = q.repeat(1, self.G)  # folded rows: head-major, as fold() orders them
        return q.to(self.device)[:, :, None]

    def key(self, chunk, step) -> torch.Tensor:
        g = self.g
        k = torch.from_numpy(chunk.step_cols(step) * g.block_n)[:, :, None] + torch.arange(g.block_n)
        return k.reshape(len(chunk.rows), 1, -1).clamp_max(g.kv_len - 1).to(self.device)


def add_mask(s: torch.Tensor, mask, G: int, bn: int) -> torch.Tensor:
    """``s [R, G*bm, C*bn]`` plus the step's additive mask on its masked columns (in place)."""
    if mask is None:
        return s
    R, GM, N = s.shape
    s4 = s.view(R, G, GM // G, N)
    for (j0, j1), bias in zip(mask.runs, mask.biases):
        s4[..., j0 * bn:j1 * bn].add_(bias[:, None])
    return s


def modded(fn, s, idx, cache: dict) -> torch.Tensor:
    """``fn(s, *idx)`` without autograd, checked (shape and dtype) and materialized to ``s``'s
    shape; ``s`` may be overwritten (built-ins work in place, sharing ``cache`` within a step)."""
    if fn is identity_mod:
        return s
    if isinstance(fn, ScoreMod):
        return fn.apply_(s, *idx, cache)
    out = check_result(fn, fn(s, *idx), s)
    return out if out.is_contiguous() else out.contiguous()


def forward_group(blocks, plan, ops: Operands, fn, ix: Indices, out, lse) -> None:
    """Fill ``out [B,Hkv,G,nqb,bm,Dv]`` and (if given) ``lse [B,Hkv,G,nqb,bm,1]`` of one block
    group; without ``lse`` (inference), single-step rows use the fused ``torch.softmax`` when the
    score_mod cannot produce -inf (a row it empties must give zeros, not softmax's NaN)."""
    G, bn = ops.G, ops.bn
    for chunk in plan:
        steps = chunk.steps  # derived on access for bands: once per chunk
        Ks = [ops.keys(ops.k, chunk, st) for st in steps]
        Vs = [ops.keys(ops.v, chunk, st) for st in steps]
        masks = [step_bias(blocks, chunk, st, ops.q.dtype, ops.q.device) if st.needs_mask else None
                 for st in steps]
        qi, kis = ix.query(chunk), [ix.key(chunk, st) for st in steps]
        caches: list[dict] = [{} for _ in steps]
        q_rows = ops.rows(ops.q, chunk)
        for b in range(ops.B):
            bt = ix.batch(b)
            for h in range(ops.Hkv):
                qt, ht = fold(q_rows[b, h]), ix.head(h)
                if lse is None and len(steps) == 1 and (fn is identity_mod or getattr(fn, "finite", False)):
                    s = modded(fn, torch.bmm(qt, Ks[0][b, h].transpose(1, 2)), (bt, ht, qi, kis[0]), caches[0])
                    p = torch.softmax(add_mask(s, masks[0], G, bn), dim=-1)
                    o = torch.bmm(p, Vs[0][b, h])
                    if masks[0] is not None and masks[0].empty_rows is not None:  # zeros, not NaN
                        R_, GM, Dv = o.shape
                        o.view(R_, G, GM // G, Dv).masked_fill_(masks[0].empty_rows[:, None, :, None], 0.0)
                    write_rows(out[b, h], o, chunk)
                    continue
                state = None
                for i in range(len(steps)):
                    s = modded(fn, torch.bmm(qt, Ks[i][b, h].transpose(1, 2)), (bt, ht, qi, kis[i]), caches[i])
                    state = softmax_step(state, add_mask(s, masks[i], G, bn), Vs[i][b, h])
                finish_rows(state, out[b, h], None if lse is None else lse[b, h], chunk)


def backward_group(blocks, plan, ops: Operands, fn, ix: Indices, captured, dout, lse, delta, dq, dk, dv,
                   grads) -> None:
    """Accumulate dq, dk, dv of one block group and the captured tensors' gradients into ``grads``
    (keyed by the ``id`` of the tensor the score_mod holds; ``captured`` is ``[(id, tensor)]``)."""
    G, bn = ops.G, ops.bn
    want = [(i, t) for i, t in captured if t.requires_grad]
    for chunk in plan:
        R = len(chunk.rows)
        q_rows, do_rows = ops.rows(ops.q, chunk), ops.rows(dout, chunk)
        lse_rows, delta_rows = ops.rows(lse, chunk), ops.rows(delta, chunk)
        steps = chunk.steps
        Ks = [ops.keys(ops.k, chunk, st) for st in steps]
        Vs = [ops.keys(ops.v, chunk, st) for st in steps]
        masks = [step_bias(blocks, chunk, st, ops.q.dtype, ops.q.device) if st.needs_mask else None
                 for st in steps]
        index = [chunk.step_index(st).to(ops.q.device) for st in steps]  # dk/dv scatter targets
        qi, kis = ix.query(chunk), [ix.key(chunk, st) for st in steps]
        caches: list[dict] = [{} for _ in steps]
        for b in range(ops.B):
            bt = ix.batch(b)
            for h in range(ops.Hkv):
                qt, do, ht = fold(q_rows[b, h]), fold(do_rows[b, h]), ix.head(h)
                row_lse, row_delta = fold(lse_rows[b, h]), fold(delta_rows[b, h])
                row_lse = row_lse.masked_fill(row_lse == NEG_INF, 0.0)
                dq_acc = None
                for i, st in enumerate(steps):
                    K, V = Ks[i][b, h], Vs[i][b, h]
                    idx = (bt, ht, qi, kis[i])
                    s = torch.bmm(qt, K.transpose(1, 2))
                    dp = torch.bmm(do, V.transpose(1, 2)).sub_(row_delta)
                    ds, p = step_grads(fn, s, dp, idx, masks[i], G, bn, row_lse, caches[i], want, grads)
                    part = torch.bmm(ds, K)
                    dq_acc = part if dq_acc is None else dq_acc.add_(part)
                    C = st.c1 - st.c0
                    dk[b, h].index_add_(0, index[i], torch.bmm(ds.transpose(1, 2), qt).view(R * C, ops.bn, ops.D))
                    dv[b, h].index_add_(0, index[i], torch.bmm(p.transpose(1, 2), do).view(R * C, ops.bn, ops.Dv))
                write_rows(dq[b, h], dq_acc, chunk)


def step_grads(fn, s, dp, idx, mask, G: int, bn: int, row_lse, cache: dict, want, grads):
    """``(d loss / d score, p)`` of one step from the raw scaled scores ``s`` and
    ``dp = dO V^T - delta``: ``p = exp(mod(s) + mask - lse)``, ``ds_mod = p * dp``, then through the
    score_mod (its hand-written :meth:`ScoreMod.vjp_`, else autograd), adding captured gradients."""
    if fn is identity_mod:
        p = add_mask(s, mask, G, bn).sub_(row_lse).exp_()
        return dp.mul_(p), p
    if isinstance(fn, ScoreMod) and type(fn).vjp_ is not ScoreMod.vjp_:
        cache["keep"] = True  # apply_ keeps what vjp_ needs
        p = add_mask(fn.apply_(s, *idx, cache), mask, G, bn).sub_(row_lse).exp_()
        return fn.vjp_(dp.mul_(p), *idx, cache, grads), p
    with torch.enable_grad():
        s = s.requires_grad_()
        sm = check_result(fn, fn(s, *idx), s)
    p = add_mask(sm.detach().clone(), mask, G, bn).sub_(row_lse).exp_()
    got = torch.autograd.grad(sm, [s, *(t for _, t in want)], grad_outputs=dp.mul_(p), allow_unused=True)
    for (key, _), gt in zip(want, got[1:]):
        if gt is not None:
            grads[key] = gt if grads.get(key) is None else grads[key] + gt
    return (got[0] if got[0] is not None else torch.zeros_like(s)), p


def fused_mods(fn, layout: BlockLayout, q, k, v):
    """The fused CPU kernels' form of ``fn`` when they run this call (softcap, constant ALiBi, or
    no score_mod with sinks), else None (the torch ops below)."""
    if not fused_cpu.applies(layout, q, k, v):
        return None
    return fused_cpu.kernel_mods(None if fn is identity_mod else fn)


def run_forward(q, k, v, layout, schedule, scale, fn, b_ids, need_lse=True):
    """``(out [B,H,Lq,Dv], lse [B,H,Lq] or None)`` in the compute dtype."""
    cdt = compute_dtype_for(q.dtype)
    mods = fused_mods(fn, layout, q, k, v)
    if mods is not None:
        out, lse = fused_cpu.forward(q, k, v, layout, scale, need_lse, mods)
        return out.to(cdt), lse
    B, H, Lq, _ = q.shape
    out = torch.zeros(B, H, Lq, v.shape[-1], dtype=cdt, device=q.device)
    lse = torch.full((B, H, Lq), NEG_INF, dtype=cdt, device=q.device) if need_lse else None
    for c in group_calls(layout, B, H, H // k.shape[1]):
        blocks, b0, h0 = c.blocks, c.b0, c.h0
        qq, kk, vv = q[c.bs, c.hs], k[c.bs, c.ks], v[c.bs, c.ks]
        g = blocks.geom
        ops = Operands(qq, kk, vv, g, scale, cdt)
        o = torch.zeros(ops.B, ops.Hkv, ops.G, g.nqb, g.block_m, ops.Dv, dtype=cdt, device=q.device)
        l = torch.full((ops.B, ops.Hkv, ops.G, g.nqb, g.block_m, 1), NEG_INF, dtype=cdt, device=q.device) \
            if need_lse else None
        ix = Indices(g, ops.G, b_ids[b0:b0 + qq.shape[0]], h0, q.device)
        forward_group(blocks, make_plan(blocks, schedule, ops.G), ops, fn, ix, o, l)
        Bq, Hq = qq.shape[:2]
        if c.whole:  # the group's buffers are the result
            return o.view(Bq, Hq, -1, ops.Dv)[:, :, :Lq], l.view(Bq, Hq, -1)[:, :, :Lq] if need_lse else None
        out[b0:b0 + Bq, h0:h0 + Hq] = o.view(Bq, Hq, -1, ops.Dv)[:, :, :Lq]
        if need_lse:
            lse[b0:b0 + Bq, h0:h0 + Hq] = l.view(Bq, Hq, -1)[:, :, :Lq]
    return out, lse


def run_backward(q, k, v, out, lse, dout, dlse, layout, schedule, scale, fn, b_ids, captured):
    """``(dq, dk, dv, grads of captured)`` (a captured tensor's gradient is None when unused);
    ``captured`` is ``[(id of the tensor the score_mod holds, tensor)]``."""
    mods = fused_mods(fn, layout, q, k, v)
    if mods is not None:  # kernel_mods takes no captured tensor that needs a gradient
        dq, dk, dv = fused_cpu.backward(q, k, v, out, lse, dout, layout, scale, mods, dlse)
        return dq, dk, dv, [None] * len(captured)
    cdt = compute_dtype_for(q.dtype)
    delta_all = (dout.to(cdt) * out.to(cdt)).sum(-1)
    if dlse is not None:
        delta_all = delta_all - dlse.to(cdt)  # d lse / d s = p: it joins ds as -dlse in delta
    dq_all = torch.zeros(q.shape, dtype=cdt, device=q.device)
    dk_all = torch.zeros(k.shape, dtype=cdt, device=q.device)
    dv_all = torch.zeros(v.shape, dtype=cdt, device=q.device)
    grads: dict[int, torch.Tensor] = {}
    B, H, Lq, _ = q.shape
    G = H // k.shape[1]
    for c in group_calls(layout, B, H, G):
        blocks, b0, h0, bsl, hsl = c.blocks, c.b0, c.h0, c.bs, c.hs
        qq, kk, vv = q[bsl, hsl], k[bsl, c.ks], v[bsl, c.ks]
        g = blocks.geom
        ops = Operands(qq, kk, vv, g, scale, cdt)
        Bq, Hq = qq.shape[:2]

        def rows_view(t, X):
            t = pad_len(t.to(cdt).reshape(Bq, Hq, Lq, X), g.nqb * g.block_m)
            return t.view(ops.B, ops.Hkv, ops.G, g.nqb, g.block_m, X)

        dq = torch.zeros(ops.B, ops.Hkv, ops.G, g.nqb, g.block_m, ops.D, dtype=cdt, device=q.device)
        dk = torch.zeros(ops.B, ops.Hkv, g.nkb, g.block_n, ops.D, dtype=cdt, device=q.device)
        dv = torch.zeros(ops.B, ops.Hkv, g.nkb, g.block_n, ops.Dv, dtype=cdt, device=q.device)
        ix = Indices(g, ops.G, b_ids[b0:b0 + Bq], h0, q.device)
        backward_group(blocks, make_plan(blocks, schedule, ops.G), ops, fn, ix, captured,
                       rows_view(dout[bsl, hsl], ops.Dv), rows_view(lse[bsl, hsl][..., None], 1),
                       rows_view(delta_all[bsl, hsl][..., None], 1), dq, dk, dv, grads)
        Lk = kk.shape[2]
        dq_all[bsl, hsl] = dq.view(Bq, Hq, -1, ops.D)[:, :, :Lq] * scale
        dk_all[bsl, c.ks] += dk.view(ops.B, ops.Hkv, -1, ops.D)[:, :, :Lk]
        dv_all[bsl, c.ks] += dv.view(ops.B, ops.Hkv, -1, ops.Dv)[:, :, :Lk]
    cg = [None if grads.get(key) is None else grads[key].to(t.dtype) for key, t in captured]
    return dq_all.to(q.dtype), dk_all.to(k.dtype), dv_all.to(v.dtype), cg


class ScoreModAttentionFn(torch.autograd.Function):
    """Differentiable block-sparse attention with a score_mod: in q, k, v, the captured tensors
    (passed as extra inputs so autograd routes their gradients) and ``lse``."""

    @staticmethod
    def forward(ctx, q, k, v, layout, schedule, scale, fn, b_ids, *captured):
        out, lse = run_forward(q, k, v, layout, schedule, scale, fn, b_ids)
        ctx.save_for_backward(q, k, v, out, lse, *captured)
        ctx.layout, ctx.schedule, ctx.scale, ctx.fn, ctx.b_ids = layout, schedule, scale, fn, b_ids
        ctx.captured_ids = [id(t) for t in captured]
        return out.to(q.dtype), lse

    @staticmethod
    @single_backward("BlockSparseAttention with score_mod (torch backend)")
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, *captured = ctx.saved_tensors
        dq, dk, dv, cg = run_backward(q, k, v, out, lse, dout, dlse, ctx.layout, ctx.schedule, ctx.scale,
                                      ctx.fn, ctx.b_ids, list(zip(ctx.captured_ids, captured)))
        return (dq, dk, dv, None, None, None, None, None, *cg)


def apply_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor):
    """Attention sinks: a per-head logit ``sinks [H]`` joins every row's softmax denominator and
    contributes no value. Differentiable in out, lse and sinks. A row with no visible key keeps
    output 0; its lse becomes the sink (the denominator holds only the sink)."""
    s = sinks.to(lse.dtype)[None, :, None]
    new_lse = torch.logaddexp(lse, s)
    return out * torch.exp(lse - new_lse)[..., None].to(out.dtype), new_lse


def score_mod_attention(q, k, v, layout: BlockLayout, schedule, scale: float, score_mod=None, sinks=None,
                        batch_index=None, need_lse: bool = True):
    """``(out, lse)`` of block-sparse attention with ``score_mod`` applied to the scaled scores before
    the mask and ``sinks`` in the denominator; differentiable in q, k, v, the score_mod's captured
    tensors and the sinks. ``batch_index`` maps this call's batch entries to the ``b`` the score_mod
    sees (a call that runs a subset of the batch). Without gradients and ``need_lse``, lse is None
    (a faster inference path)."""
    B, H = q.shape[:2]
    fn = identity_mod if score_mod is None else check_score_mod(score_mod)
    captured = captured_tensors(fn) if score_mod is not None else ()
    check_device(captured, q.device, fn)
    if isinstance(fn, ScoreMod):
        g = layout.groups[0].geom
        fn.check(max(B, max(batch_index) + 1 if batch_index else 0), H, g.q_end, g.kv_len)
    b_ids = tuple(range(B)) if batch_index is None else tuple(batch_index)
    differentiable = (q, k, v, *captured) + (() if sinks is None else (sinks,))
    if torch.is_grad_enabled() and any(t.requires_grad for t in differentiable):
        if fn is not identity_mod:
            check_captured_grads(fn, captured, compute_dtype_for(q.dtype), q.device)
        out, lse = ScoreModAttentionFn.apply(q, k, v, layout, schedule, scale, fn, b_ids, *captured)
    else:
        with torch.no_grad():
            out, lse = run_forward(q, k, v, layout, schedule, scale, fn, b_ids, need_lse or sinks is not None)
        out = out.to(q.dtype)
    if sinks is not None:
        out, lse = apply_sinks(out, lse, check_sinks(sinks, H, q.device))
    return out, lse
