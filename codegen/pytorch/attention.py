"""PyTorch implementation of the ``BlockSparseAttention`` stage.

On an x86-64 CPU with AVX2 (float32, bfloat16, float16) the stage runs on the fused C kernels
(:mod:`.fused_cpu`: one parallel region per direction). Everything else (float64, other devices
and architectures, ``fused_cpu.disabled()``) takes the plan path below, which stays the portable
fallback; decoding calls (one query block row) keep their fused SDPA paths (:mod:`.decode`).

How the plan path is organized (per layout group, i.e. per distinct 2-D block layout):

* **Plan** (:mod:`.torch_attention_plan`, cached per layout, schedule and GQA group): query
  blocks are bucketed by their number of non-empty key blocks, so rows of very different cost
  (global rows, causal rows) never pad each other; each bucket is cut into chunks whose score
  tile stays near ``schedule.tile_elems`` elements, and each chunk's key blocks into steps of
  at most ``schedule.key_blocks_per_step`` blocks (merged by online softmax).
* **Keys**: when a chunk's key blocks are an affine band (row ``r`` reads blocks
  ``c0 + r*step + j``, as in sliding windows) they are a strided view of K; otherwise the
  blocks are gathered once per chunk.
* **Masks**: full blocks take no mask work; only partial blocks evaluate the pattern's predicate.
* **GQA**: the query heads sharing one key/value head are folded into the rows of one matmul.
* **Backward**: recomputes probabilities from the saved log-sum-exp (flash-attention style),
  so memory stays O(L D) besides one chunk's tile; dk/dv are scatter-added per key block.

:mod:`torch_probs` reuses the plan, key views and step masks for attention that also keeps its
probabilities (cross-layer reuse applies them to another layer's values).
"""

from __future__ import annotations

import torch

from attncompiler.program.autograd_guard import single_backward
from attncompiler.layout.block_layout import BlockLayout, Blocks2D
from attncompiler.program.schedule import Schedule

from .attention_plan import NEG_INF, StepMask, make_plan, step_bias
from . import fused_cpu
from .decode import key_range_forward, split_k_forward
from .common import Operands, compute_dtype_for, fold, group_calls, pad_len, write_rows
from .threads import split_kv


def _scores(q: torch.Tensor, K: torch.Tensor, mask: StepMask | None, G: int, bn: int) -> torch.Tensor:
    """``q [R, G*bm, D] @ K[R, C*bn, D]^T`` plus the step's additive mask on its masked columns."""
    if mask is None:
        return torch.bmm(q, K.transpose(1, 2))
    if G == 1 and mask.runs == ((0, K.shape[1] // bn),):
        return torch.baddbmm(mask.biases[0], q, K.transpose(1, 2))
    s = torch.bmm(q, K.transpose(1, 2))  # [R, G*bm, C*bn]
    R, GM, N = s.shape
    s5 = s.view(R, G, GM // G, N)
    for (j0, j1), bias in zip(mask.runs, mask.biases):
        s5[..., j0 * bn:j1 * bn].add_(bias[:, None])
    return s


def forward_group(blocks: Blocks2D, plan, ops: Operands, out, lse) -> None:
    """Fill ``out [B,Hkv,G,nqb,bm,Dv]`` and (if given) ``lse [B,Hkv,G,nqb,bm,1]`` for one group.

    Without ``lse`` (inference), single-step rows use the fused ``torch.softmax``.
    """
    G = ops.G
    for chunk in plan:
        R = len(chunk.rows)
        steps = chunk.steps  # derived on access for bands: once per chunk
        Ks = [ops.keys(ops.k, chunk, st) for st in steps]
        Vs = [ops.keys(ops.v, chunk, st) for st in steps]
        biases = [step_bias(blocks, chunk, st, ops.q.dtype, ops.q.device) if st.needs_mask else None
                  for st in steps]
        q_rows = ops.rows(ops.q, chunk)  # [B, Hkv, G, R, bm, D]
        for b in range(ops.B):
            for h in range(ops.Hkv):
                qt = fold(q_rows[b, h])  # [R, G*bm, D]
                if lse is None and len(steps) == 1:
                    p = torch.softmax(_scores(qt, Ks[0][b, h], biases[0], G, ops.bn), dim=-1)
                    direct = G == 1 and chunk.q_slice is not None
                    dst = out[b, h, 0, chunk.q_slice[0]:chunk.q_slice[1]] if direct else None
                    o = torch.bmm(p, Vs[0][b, h], out=dst)  # [R, G*bm, Dv]
                    if biases[0] is not None and biases[0].empty_rows is not None:
                        # rows with no visible key: zeros, not softmax's NaN
                        R_, GM, Dv = o.shape
                        o.view(R_, G, GM // G, Dv).masked_fill_(biases[0].empty_rows[:, None, :, None], 0.0)
                    if not direct:
                        write_rows(out[b, h], o, chunk)
                    continue
                state = None
                for i in range(len(steps)):
                    s = _scores(qt, Ks[i][b, h], biases[i], G, ops.bn)  # [R, G*bm, C*bn]
                    state = softmax_step(state, s, Vs[i][b, h])
                finish_rows(state, out[b, h], None if lse is None else lse[b, h], chunk)


def softmax_step(state, s: torch.Tensor, V: torch.Tensor):
    """One online-softmax step: fold the masked scores ``s [R, G*bm, N]`` (overwritten) and their
    values ``V [R, N, Dv]`` into ``state`` (``(max, sum, unnormalized out)`` or None at the start)."""
    m = s.amax(dim=-1, keepdim=True)  # -inf where the step shows the row no key
    p = s.sub_(finite_or_zero(m)).exp_()
    l = p.sum(dim=-1, keepdim=True)
    o = torch.bmm(p, V)  # [R, G*bm, Dv]
    return (m, l, o) if state is None else merge_partials(*state, m, l, o)


def finish_rows(state, out_rows: torch.Tensor, lse_rows: torch.Tensor | None, chunk) -> None:
    """Normalize an online-softmax ``state`` and write the chunk's rows of out (and lse): rows that
    saw no key get zeros and lse -inf."""
    m_run, l_run, acc = state
    empty = l_run == 0
    acc.div_(l_run.masked_fill(empty, 1.0))
    write_rows(out_rows, acc, chunk)
    if lse_rows is not None:
        write_rows(lse_rows, (m_run + torch.log(l_run)).masked_fill_(empty, NEG_INF), chunk)


def finite_or_zero(m: torch.Tensor) -> torch.Tensor:
    """A running max with -inf (no visible key yet) replaced by 0, for use only where it is
    subtracted before ``exp``: the row's terms are all -inf, so they still give 0, not NaN.

    The max itself must stay -inf: a 0 would be merged as if it were a real logit, and real
    logits far below 0 would then underflow to 0 (issue 15).
    """
    return m.masked_fill(m == NEG_INF, 0.0)


def merge_partials(m1, l1, o1, m2, l2, o2):
    """Online-softmax merge of two partial results ``(max, sum, unnormalized out)`` whose sums
    and outputs are taken relative to ``finite_or_zero(max)``. Returns the merged triple (it may
    reuse ``o1`` and ``o2``'s storage). Rows empty in both parts keep max -inf, sum 0, out 0."""
    m = torch.maximum(m1, m2)
    ms = finite_or_zero(m)
    a, c = torch.exp(finite_or_zero(m1) - ms), torch.exp(finite_or_zero(m2) - ms)
    # An empty part has max -inf but sums taken relative to 0: its factor must be 0 (its terms
    # are 0 anyway), and exp(0 - ms) could overflow for very negative merged maxima.
    a = a.masked_fill_(m1 == NEG_INF, 0.0)
    c = c.masked_fill_(m2 == NEG_INF, 0.0)
    return m, l1 * a + l2 * c, o1.mul_(a).add_(o2.mul_(c))


def backward_group(blocks: Blocks2D, plan, ops: Operands, dout, lse, delta, dq, dk, dv) -> None:
    """Accumulate dq ``[B,Hkv,G,nqb,bm,D]`` and dk, dv ``[B,Hkv,nkb,bn,X]`` for one group."""
    G = ops.G
    for chunk in plan:
        R = len(chunk.rows)
        q_rows, do_rows = ops.rows(ops.q, chunk), ops.rows(dout, chunk)
        lse_rows, delta_rows = ops.rows(lse, chunk), ops.rows(delta, chunk)
        steps = chunk.steps  # derived on access for bands: once per chunk
        Ks = [ops.keys(ops.k, chunk, st) for st in steps]
        Vs = [ops.keys(ops.v, chunk, st) for st in steps]
        biases = [step_bias(blocks, chunk, st, ops.q.dtype, ops.q.device) if st.needs_mask else None
                  for st in steps]
        # key-block ids of the dk/dv scatter: built per chunk from the plan's compact form
        index = [chunk.step_index(st).to(ops.q.device) for st in steps]
        for b in range(ops.B):
            for h in range(ops.Hkv):
                qt, do = fold(q_rows[b, h]), fold(do_rows[b, h])
                row_lse, row_delta = fold(lse_rows[b, h]), fold(delta_rows[b, h])
                row_lse = row_lse.masked_fill(row_lse == NEG_INF, 0.0)
                dq_acc = None
                for i, st in enumerate(steps):
                    K, V = Ks[i][b, h], Vs[i][b, h]
                    p = _scores(qt, K, biases[i], G, ops.bn).sub_(row_lse).exp_()  # [R, G*bm, C*bn]
                    ds = torch.bmm(do, V.transpose(1, 2)).sub_(row_delta).mul_(p)
                    part = torch.bmm(ds, K)  # [R, G*bm, D]
                    dq_acc = part if dq_acc is None else dq_acc.add_(part)
                    C = st.c1 - st.c0
                    dk[b, h].index_add_(0, index[i], torch.bmm(ds.transpose(1, 2), qt).view(R * C, ops.bn, ops.D))
                    dv[b, h].index_add_(0, index[i], torch.bmm(p.transpose(1, 2), do).view(R * C, ops.bn, ops.Dv))
                write_rows(dq[b, h], dq_acc, chunk)


class BlockSparseAttentionFn(torch.autograd.Function):
    """Differentiable block-sparse attention over a :class:`BlockLayout`."""

    @staticmethod
    def forward(ctx, q, k, v, layout: BlockLayout, schedule: Schedule, scale: float):
        out, lse = _run_forward(q, k, v, layout, schedule, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.layout, ctx.schedule, ctx.scale = layout, schedule, scale
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @single_backward("BlockSparseAttention (torch backend)")
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _run_backward(q, k, v, out, lse, dout, ctx.layout, ctx.schedule, ctx.scale)
        return dq, dk, dv, None, None, None


def _split_by_group(layout, q, k, v, fn):
    """Run ``fn(blocks, q, k, v)`` per group; single-group layouts run on everything at once."""
    B, H = q.shape[:2]
    return [(None, None, fn(c.blocks, q, k, v)) if c.whole else
            (c.b0, c.h0, fn(c.blocks, q[c.bs, c.hs], k[c.bs, c.ks], v[c.bs, c.ks]))
            for c in group_calls(layout, B, H, H // k.shape[1])]


def _run_forward(q, k, v, layout, schedule, scale, need_lse=True):
    """``(out, lse)``: the fused CPU kernels where they apply (one parallel region, see
    fused_cpu.py) except for one-block-row calls (decoding keeps its fused SDPA paths); else a
    one-group layout runs as concurrent (batch, kv-head) parts where the thread policy applies
    (see threads.py), with or without a gradient."""
    if fused_applies(layout, q, k, v):
        return fused_cpu.forward(q, k, v, layout, scale, need_lse)
    if len(layout.groups) != 1:
        return _forward_plain(q, k, v, layout, schedule, scale, need_lse)
    return split_kv(lambda q_, k_, v_: _forward_plain(q_, k_, v_, layout, schedule, scale, need_lse),
                    q.shape[0], k.shape[1], (q, k, v))


def _forward_plain(q, k, v, layout, schedule, scale, need_lse=True):
    cdt = compute_dtype_for(q.dtype)
    B, H, Lq, _ = q.shape

    def one(blocks, qq, kk, vv):
        fused = key_range_forward(blocks, qq, kk, vv, scale, cdt) or split_k_forward(blocks, qq, kk, vv, scale, cdt)
        if fused is not None:
            return fused[0], fused[1] if need_lse else None
        g = blocks.geom
        ops = Operands(qq, kk, vv, g, scale, cdt)
        o = torch.zeros(ops.B, ops.Hkv, ops.G, g.nqb, g.block_m, ops.Dv, dtype=cdt, device=q.device)
        l = (torch.full((ops.B, ops.Hkv, ops.G, g.nqb, g.block_m, 1), NEG_INF, dtype=cdt, device=q.device)
             if need_lse else None)
        plan = make_plan(blocks, schedule, ops.G)
        forward_group(blocks, plan, ops, o, l)
        Bq, Hq = qq.shape[:2]
        return (o.view(Bq, Hq, g.nqb * g.block_m, ops.Dv)[:, :, :Lq],
                l.view(Bq, Hq, g.nqb * g.block_m)[:, :, :Lq] if need_lse else None)

    results = _split_by_group(layout, q, k, v, one)
    if results[0][0] is None:  # one layout for every (batch, head): its buffers are the result
        o, l = results[0][2]
        return o.to(q.dtype), l
    out = q.new_zeros((B, H, Lq, v.shape[-1]))
    lse = torch.full((B, H, Lq), NEG_INF, dtype=cdt, device=q.device) if need_lse else None
    for b, h, (o, l) in results:
        out[b, h] = o[0, 0]
        if need_lse:
            lse[b, h] = l[0, 0]
    return out, lse


def _one_block_row(layout: BlockLayout) -> bool:
    return all(g.geom.nqb == 1 for g in layout.groups)


def fused_applies(layout: BlockLayout, q, k, v) -> bool:
    """Whether a call of this stage runs on the fused CPU kernels (which split their own work
    across threads: callers then skip the (batch, kv-head) thread split)."""
    return not _one_block_row(layout) and fused_cpu.applies(layout, q, k, v)


def _run_backward(q, k, v, out, lse, dout, layout, schedule, scale):
    """``(dq, dk, dv)``: the fused CPU kernels where they apply; else a one-group layout runs as
    concurrent (batch, kv-head) parts where the thread policy applies: a slice's dq, dk and dv
    depend on that slice only."""
    if fused_cpu.applies(layout, q, k, v):
        return fused_cpu.backward(q, k, v, out, lse, dout, layout, scale)
    if len(layout.groups) != 1:
        return _backward_plain(q, k, v, out, lse, dout, layout, schedule, scale)
    return split_kv(lambda *t: _backward_plain(*t, layout, schedule, scale),
                    q.shape[0], k.shape[1], (q, k, v, out, lse, dout))


def _backward_plain(q, k, v, out, lse, dout, layout, schedule, scale):
    cdt = compute_dtype_for(q.dtype)
    delta_all = (dout.to(cdt) * out.to(cdt)).sum(-1)  # [B, H, Lq]
    dq_all = torch.zeros(q.shape, dtype=cdt, device=q.device)
    dk_all = torch.zeros(k.shape, dtype=cdt, device=q.device)
    dv_all = torch.zeros(v.shape, dtype=cdt, device=q.device)
    B, H, Lq, _ = q.shape

    def one(blocks, qq, kk, vv, bsl, hsl):
        g = blocks.geom
        ops = Operands(qq, kk, vv, g, scale, cdt)
        Bq, Hq = qq.shape[:2]

        def rows_view(t, X):
            t = pad_len(t.to(cdt).reshape(Bq, Hq, Lq, X), g.nqb * g.block_m)
            return t.view(ops.B, ops.Hkv, ops.G, g.nqb, g.block_m, X)

        do = rows_view(dout[bsl, hsl], ops.Dv)
        ls = rows_view(lse[bsl, hsl][..., None], 1)
        de = rows_view(delta_all[bsl, hsl][..., None], 1)
        dq = torch.zeros(ops.B, ops.Hkv, ops.G, g.nqb, g.block_m, ops.D, dtype=cdt, device=q.device)
        dk = torch.zeros(ops.B, ops.Hkv, g.nkb, g.block_n, ops.D, dtype=cdt, device=q.device)
        dv = torch.zeros(ops.B, ops.Hkv, g.nkb, g.block_n, ops.Dv, dtype=cdt, device=q.device)
        plan = make_plan(blocks, schedule, ops.G)
        backward_group(blocks, plan, ops, do, ls, de, dq, dk, dv)
        Lk = kk.shape[2]
        return (dq.view(Bq, Hq, -1, ops.D)[:, :, :Lq] * scale,
                dk.view(ops.B, ops.Hkv, -1, ops.D)[:, :, :Lk],
                dv.view(ops.B, ops.Hkv, -1, ops.Dv)[:, :, :Lk])

    G = H // k.shape[1]
    if len(layout.groups) == 1:
        dq, dk, dv = one(layout.groups[0], q, k, v, slice(None), slice(None))
        dq_all, dk_all, dv_all = dq, dk, dv
    else:
        for b in range(B):
            for h in range(H):
                kh = h // G
                dq, dk, dv = one(layout.group_for(b, h), q[b:b + 1, h:h + 1], k[b:b + 1, kh:kh + 1],
                                 v[b:b + 1, kh:kh + 1], slice(b, b + 1), slice(h, h + 1))
                dq_all[b, h] = dq[0, 0]
                dk_all[b, kh] += dk[0, 0]
                dv_all[b, kh] += dv[0, 0]
    return dq_all.to(q.dtype), dk_all.to(k.dtype), dv_all.to(v.dtype)


def block_sparse_attention(q, k, v, layout: BlockLayout, schedule: Schedule, scale: float,
                           need_lse: bool = True):
    """``(out [B,H,Lq,Dv], lse [B,H,Lq])`` of the layout's pattern; differentiable in q, k, v.

    When no gradient is needed and ``need_lse`` is False, lse is None and a faster
    inference path is taken.
    """
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return BlockSparseAttentionFn.apply(q, k, v, layout, schedule, scale)
    return _run_forward(q, k, v, layout, schedule, scale, need_lse)


def block_sparse_attention_backward(q, k, v, out, lse, dout, layout: BlockLayout, schedule: Schedule, scale: float):
    """``(dq, dk, dv)`` of block-sparse attention given its (possibly merged) ``out`` and ``lse``.

    Used where partial results are merged outside this module (e.g. the distributed ring), so
    the gradient must be taken with the merged log-sum-exp.
    """
    return _run_backward(q, k, v, out, lse, dout, layout, schedule, scale)
