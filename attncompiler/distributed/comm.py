"""Differentiable point-to-point exchange of key/value shards along the plan (torch.distributed only).

Forward: rank ``r`` sends its shard to every rank that needs it and receives the shards it
needs, all posted at once through ``batch_isend_irecv``. Backward: the mirror image, the
gradients of the received shards travel back to their owners and are summed there.
Sent bytes are counted from the tensors actually handed to torch.distributed.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..errors import AttnCompilerError


class CommunicationError(AttnCompilerError, RuntimeError):
    """A peer rank died or did not answer within the process group's timeout."""

_K, _V, _DK, _DV = 0, 1, 2, 3  # message tags: k/v forward, their gradients backward


def _post(ops_spec, group, stats, key, wait: bool = True):
    """Post the sends/receives at once; wait for them, or return a function that does."""
    ops = []
    for kind, t, peer, tag in ops_spec:
        ops.append(dist.P2POp(dist.isend if kind == "send" else dist.irecv, t, peer=peer, group=group, tag=tag))
        if kind == "send" and stats is not None:
            stats[key] = stats.get(key, 0) + t.numel() * t.element_size()
    if not ops:
        return lambda: None
    peers = sorted({p for _, _, p, _ in ops_spec})
    try:
        reqs = dist.batch_isend_irecv(ops)
    except RuntimeError as e:
        _raise(e, peers, key)

    def finish() -> None:
        try:
            for req in reqs:
                req.wait()
        except RuntimeError as e:
            _raise(e, peers, key)

    if wait:
        finish()
    return finish


def _raise(e: RuntimeError, peers, key: str):
    """gloo/NCCL report a dead peer or a timeout as RuntimeError: say which exchange and why."""
    raise CommunicationError(
        f"rank {dist.get_rank()}: {key.split('_')[0]} exchange with ranks {peers} failed: {e}. A peer process "
        "died or exceeded the process group timeout (init_process_group(timeout=...)); check the other "
        "ranks' logs") from e


class ExchangeKV(torch.autograd.Function):
    """``(token, k_j, v_j for j in sources)`` from ``(k, v)`` of this rank; differentiable."""

    @staticmethod
    def forward(ctx, k, v, plan, rank, group, stats, pending=None):
        k, v = k.contiguous(), v.contiguous()  # [B, Hkv, Lr, D]
        sends = [dst for _, dst in plan.sends(rank)]
        srcs = [src for _, src in plan.recvs(rank)]
        bufs = {}
        spec = []
        own = plan.bounds[rank]
        for dst in sends:  # only the key rows dst's queries need
            lo, hi = (int(x) - own for x in plan.key_range[dst, rank])
            spec += [("send", k[:, :, lo:hi].contiguous(), _global(group, dst), _K),
                     ("send", v[:, :, lo:hi].contiguous(), _global(group, dst), _V)]
        for src in srcs:
            n = int(plan.key_range[rank, src, 1] - plan.key_range[rank, src, 0])
            kb = k.new_empty(k.shape[:2] + (n, k.shape[3]))  # [B, Hkv, Lsrc, Dk]
            vb = v.new_empty(v.shape[:2] + (n, v.shape[3]))  # [B, Hkv, Lsrc, Dv]
            bufs[src] = (kb, vb)
            spec += [("recv", kb, _global(group, src), _K), ("recv", vb, _global(group, src), _V)]
        # With ``pending`` (a list), the receives complete in the background: the caller computes
        # on its own shard meanwhile and calls ``pending[0]()`` before touching received rows.
        finish = _post(spec, group, stats, "forward_bytes_sent", wait=pending is None)
        if pending is not None:
            pending.append(finish)
        ctx.meta = (sends, srcs, group, stats, k.shape, v.shape)
        ctx.slices = [tuple(int(x) - own for x in plan.key_range[dst, rank]) for dst in sends]
        ctx.dtypes = (k.dtype, v.dtype)
        ctx.recv = {s: ((b[0].shape, b[0].dtype), (b[1].shape, b[1].dtype)) for s, b in bufs.items()}
        # A scalar the caller adds to its output: keeps this node in the graph on every rank, so
        # every rank runs the backward exchange even when it received nothing.
        out = [k.new_zeros(())]
        for src in srcs:
            out += list(bufs[src])
        return tuple(out)

    @staticmethod
    def backward(ctx, _token_grad, *grads):
        sends, srcs, group, stats, kshape, vshape = ctx.meta
        spec = []
        for i, src in enumerate(srcs):  # gradients of received shards go back to their owners
            for g, (shape, dtype), tag in ((grads[2 * i], ctx.recv[src][0], _DK),
                                           (grads[2 * i + 1], ctx.recv[src][1], _DV)):
                g = torch.zeros(shape, dtype=dtype) if g is None else g.contiguous()
                spec.append(("send", g, _global(group, src), tag))
        got = []
        for dst, (lo, hi) in zip(sends, ctx.slices):
            dk = torch.empty(kshape[:2] + (hi - lo, kshape[3]), dtype=ctx.dtypes[0])  # [B, Hkv, hi-lo, Dk]
            dv = torch.empty(vshape[:2] + (hi - lo, vshape[3]), dtype=ctx.dtypes[1])  # [B, Hkv, hi-lo, Dv]
            got.append((lo, hi, dk, dv))
            spec += [("recv", dk, _global(group, dst), _DK), ("recv", dv, _global(group, dst), _DV)]
        _post(spec, group, stats, "backward_bytes_sent")
        dk_tot = torch.zeros(kshape, dtype=ctx.dtypes[0])  # [B, Hkv, Lr, Dk]
        dv_tot = torch.zeros(vshape, dtype=ctx.dtypes[1])  # [B, Hkv, Lr, Dv]
        for lo, hi, dk, dv in got:
            dk_tot[:, :, lo:hi] += dk
            dv_tot[:, :, lo:hi] += dv
        return dk_tot, dv_tot, None, None, None, None, None


def _global(group, rank: int) -> int:
    """Global rank of ``rank`` in ``group`` (torch.distributed P2P ops take global ranks)."""
    if group is None:
        return rank
    return dist.get_global_rank(group, rank)
