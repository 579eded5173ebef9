"""Sequence-parallel attention: each rank holds a contiguous query/key/value shard.

Key/value shards travel only to the ranks whose queries need them (the plan, from the
layout); each rank computes one block-sparse sub-problem per needed key shard with the
pattern shifted to global indices, and merges the partial outputs through their
log-sum-exp. Forward and backward are differentiable end to end (gradients of the
received shards flow back to their owners through :class:`ExchangeKV`).
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from .. import expr as E
from ..errors import InputError
from ..pattern import Mask, mask
from ..schedule import Schedule
from .comm import ExchangeKV
from .plan import dense_plan, plan_attention, require_mask_family


@functools.lru_cache(maxsize=256)
def shifted_pattern(pattern, q_off: int, k_off: int, seq_len: int):
    """``pattern`` restricted to queries ``q_off + i`` and keys ``k_off + j`` of a length-L problem.

    An analyzable predicate stays analyzable (its index variables are shifted, so the layout
    is classified analytically); an opaque one is wrapped and evaluated chunk by chunk.
    """
    e = pattern.predicate(seq_len, seq_len)
    if e is not None:
        return Mask(None, _shift(e, {"q_idx": q_off, "kv_idx": k_off}))

    def shard_mask(b, h, q_idx, kv_idx):
        return pattern.evaluate(b, h, q_idx + q_off, kv_idx + k_off, seq_len, seq_len)

    shard_mask.__name__ = f"shard_of_{type(pattern).__name__}_{q_off}_{k_off}"
    return mask(shard_mask, per_head=pattern.head_period != 1, per_batch=pattern.batch_dependent)


def _shift(e, offsets):
    """``e`` with index variable ``x`` replaced by ``x + offsets[x]`` (structure as in expr.substitute)."""
    match e:
        case E.Var(name) if offsets.get(name):
            return E.binop("add", e, E.Const(int(offsets[name])))
        case E.Var() | E.Const():
            return e
        case E.Load(buf, idx, fill):
            return E.Load(buf, _shift(idx, offsets), fill)
        case E.BinOp(op, a, b):
            return E.binop(op, _shift(a, offsets), _shift(b, offsets))
        case E.UnOp(op, a):
            return E.unop(op, _shift(a, offsets))
        case E.Where(c, a, b):
            return E.where(_shift(c, offsets), _shift(a, offsets), _shift(b, offsets))
    raise AssertionError(f"unknown expression node {e!r}")


def merge_partials(outs: list[torch.Tensor], lses: list[torch.Tensor]):
    """Merge partial attention results over disjoint key sets through their log-sum-exp."""
    lse_all = torch.stack(lses)  # [n, B, H, Lq]
    lse = torch.logsumexp(lse_all, dim=0)  # [B, H, Lq]
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    w = torch.exp(lse_all - safe)  # [n, B, H, Lq]; rows with no key anywhere get weight 0
    w = torch.where(torch.isfinite(lse_all), w, torch.zeros_like(w))
    out = (w.unsqueeze(-1) * torch.stack(outs).to(w.dtype)).sum(0)  # [B, H, Lq, Dv]
    return out, lse


def ring_attention(pattern, q, k, v, *, seq_len: int, group=None, scale: float | None = None,
                   schedule: Schedule | None = None, stats: dict | None = None, plan=None,
                   dense_ring: bool = False):
    """Sparsity-aware sequence-parallel attention on torch.distributed.

    Args:
        pattern: a mask pattern (structural families raise :class:`UnsupportedError`).
        q, k, v: this rank's contiguous shards ``[B, H, Lr, D]`` of a length-``seq_len`` sequence,
            split as :func:`~attncompiler.distributed.plan.shard_bounds` says (sizes differ by <= 1).
        seq_len: the total sequence length L.
        group: the process group (default: the world).
        scale: softmax scale (default ``1/sqrt(D)``).
        schedule: block sizes of the local sub-problems (default 64, capped by the shard size).
        stats: if given, ``forward_bytes_sent``/``backward_bytes_sent`` are added to it.
        plan: a precomputed plan (default: :func:`plan_attention` on this pattern and sizes).
        dense_ring: baseline for measurements: move every shard whole to every rank (the dense
            ring's bytes), then compute exactly what the sparse plan computes.

    Returns:
        ``(out [B, H, Lr, Dv], lse [B, H, Lr])`` for this rank's queries; differentiable.
    """
    require_mask_family(pattern, "ring_attention")
    P, r = dist.get_world_size(group), dist.get_rank(group)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise InputError(f"q, k, v must be [B, H, L, D], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if plan is None:
        plan = plan_attention(pattern, seq_len, P, "ring", batch=q.shape[0], heads=q.shape[1],
                              kv_heads=k.shape[1], head_dim=(k.shape[3] + v.shape[3]) // 2,
                              elem_bytes=k.element_size())
    qa, qb = plan.bounds[r], plan.bounds[r + 1]
    if q.shape[2] != qb - qa or k.shape[2] != qb - qa or v.shape[2] != qb - qa:
        raise InputError(f"rank {r} holds {q.shape[2]} queries / {k.shape[2]} keys, but its shard of L={seq_len} "
                         f"over {P} ranks is [{qa}, {qb}) ({qb - qa} tokens); split with shard_bounds()")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    comm = dense_plan(plan) if dense_ring else plan
    srcs = [src for _, src in comm.recvs(r)]
    pending: list = []  # overlap: receives finish while the own shard is computed
    token, *received = ExchangeKV.apply(k, v, comm, r, group, stats, pending)
    shards = {}
    for i, src in enumerate(srcs):
        if plan.need[r, src]:  # keep only the rows the sparse plan uses (dense_ring received more)
            lo, hi = (int(x) - int(comm.key_range[r, src, 0]) for x in plan.key_range[r, src])
            shards[src] = (received[2 * i][:, :, lo:hi], received[2 * i + 1][:, :, lo:hi])
    if plan.need[r, r]:  # this rank's own keys, restricted to the rows its queries need
        lo, hi = (int(x) - qa for x in plan.key_range[r, r])
        shards[r] = (k[:, :, lo:hi], v[:, :, lo:hi])
    parts, kvs = [], []
    for j in sorted(shards, key=lambda j: j != r):  # own shard first: its compute overlaps the receives
        kj, vj = shards[j]
        ka, kb = (int(x) for x in plan.key_range[r, j])  # global key rows held for shard j
        sched = schedule or Schedule(block_m=min(64, qb - qa), block_n=min(64, kb - ka))
        sub = shifted_pattern(pattern, qa, ka, seq_len)
        layout = sub.layout(qb - qa, kb - ka, sched.block_m, sched.block_n, batch=q.shape[0], heads=q.shape[1])
        if layout.num_blocks == 0:  # the coarse plan over-approximated: nothing to compute here
            continue
        parts.append((layout, sched, j != r))
        kvs += [kj, vj]
    if not parts:
        pending[0]()
        out = q.new_zeros(q.shape[:3] + (v.shape[3],)) + 0 * q.sum()  # [B, H, Lr, Dv]
        return out + token, q.new_full(q.shape[:3], float("-inf"))
    out, lse = ShardAttentionFn.apply(q, tuple(parts), scale, pending[0], *kvs)
    return out + token, lse


class ShardAttentionFn(torch.autograd.Function):
    """Local queries against several key shards, merged by log-sum-exp; exact backward.

    The backward of each key shard runs the block-sparse backward with the *merged* output
    and log-sum-exp (what flash-style ring attention does), which gives the exact gradient of
    the merged softmax; the per-shard lse is not differentiable, so merging differentiable
    per-shard results would drop the lse term.
    """

    @staticmethod
    def forward(ctx, q, parts, scale, wait_remote, *kvs):
        from ..codegen.torch_attention import block_sparse_attention

        outs, lses = [], []
        waited = False
        for i, (layout, sched, remote) in enumerate(parts):
            if remote and not waited:
                wait_remote()
                waited = True
            o, l = block_sparse_attention(q, kvs[2 * i], kvs[2 * i + 1], layout, sched, scale)
            outs.append(o)
            lses.append(l)
        if not waited:
            wait_remote()  # also completes this rank's sends
        out, lse = (outs[0], lses[0]) if len(outs) == 1 else merge_partials(outs, lses)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, out, lse, *kvs)
        ctx.parts, ctx.scale = parts, scale
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        from ..codegen.torch_attention import block_sparse_attention_backward

        q, out, lse, *kvs = ctx.saved_tensors
        dq = torch.zeros_like(q)
        grads = []
        for i, (layout, sched, _) in enumerate(ctx.parts):
            dqi, dki, dvi = block_sparse_attention_backward(q, kvs[2 * i], kvs[2 * i + 1], out, lse,
                                                            dout.contiguous(), layout, sched, ctx.scale)
            dq = dq + dqi
            grads += [dki, dvi]
        return (dq, None, None, None, *grads)
