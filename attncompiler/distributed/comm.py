"""Point-to-point posting for the ring (torch.distributed only) and its error type.

Sends and receives of one ring step are posted together through ``batch_isend_irecv``; the
caller gets a function that waits for them, so it can compute in the meantime. Sent bytes
are counted from the tensors actually handed to torch.distributed. A dead or silent peer
surfaces, after the process group's timeout, as :class:`CommunicationError` naming the
exchange and the peers.
"""

from __future__ import annotations

import torch.distributed as dist

from ..errors import AttnCompilerError


class CommunicationError(AttnCompilerError, RuntimeError):
    """A peer rank died or did not answer within the process group's timeout."""


def post(ops_spec, group, stats, key: str, wait: bool = True):
    """Post ``("send"|"recv", tensor, global_peer, tag)`` ops at once; wait, or return a function that does."""
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

    done = []

    def finish() -> None:
        if done:  # gloo's wait() on a finished send blocks for another one: wait once only
            return
        done.append(True)
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


def global_rank(group, rank: int) -> int:
    """Global rank of ``rank`` in ``group`` (torch.distributed P2P ops take global ranks)."""
    if group is None:
        return rank
    return dist.get_global_rank(group, rank)
