"""Thread policy of the torch backend's block-sparse stage: one coarse parallel region over
(batch, key/value head) instead of a parallel region per small ATen op.

Why two threads are no faster than one: the block path issues several small ops per chunk and
head (``bmm`` of a ``[R, G*bm, C*bn]`` tile, ``amax``, ``exp``, ``sum``, a second ``bmm``, the
online-softmax merge); each is its own OpenMP region with a fork/join barrier, and most are too
small to split well. With a competing process on one core every barrier waits for the
descheduled thread, so two threads can be several times slower than one.

The policy: when the call has more threads than one and at least two independent
(batch, kv-head) slices, split the slices into ``min(threads, slices)`` parts and run each part
in a worker thread with intra-op parallelism set to 1 (ATen releases the GIL inside ops, so the
parts run concurrently; no op forks). Layouts that differ per (batch, head) and calls that need
a gradient keep the plain path (the backward would run the parts one after another anyway).

:func:`split_heads` is called by ``run_block_sparse`` (``codegen/pytorch/stages.py``);
:mod:`attncompiler.bench.threads` measures it against the plain call. ``ATTNC_THREAD_SPLIT=0``
turns it off. The intra-op thread count is process-wide, so split calls are serialized (a
second Python thread calling attention at the same time waits), and the caller's count is
restored afterwards.
"""

from __future__ import annotations

import contextlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

_LOCK = threading.Lock()
_SPLIT_LOCK = threading.Lock()  # one split call at a time: each sets the process-wide thread count
_POOL: dict[int, ThreadPoolExecutor] = {}
ENABLED = os.environ.get("ATTNC_THREAD_SPLIT", "1") != "0"


def parts_for(batch: int, kv_heads: int, threads: int) -> int:
    """How many independent parts a call is split into: one per thread, never more than the
    (batch, kv-head) slices; 1 means "run the plain path"."""
    return max(1, min(threads, batch * kv_heads))


def _pool(n: int) -> ThreadPoolExecutor:
    with _LOCK:
        if n not in _POOL:
            _POOL[n] = ThreadPoolExecutor(max_workers=n, thread_name_prefix="attnc-heads")
        return _POOL[n]


@contextlib.contextmanager
def intra_op_threads(n: int):
    """``torch.set_num_threads(n)`` for the block (process-wide; restored afterwards)."""
    old = torch.get_num_threads()
    if old != n:
        torch.set_num_threads(n)
    try:
        yield old
    finally:
        if old != n:
            torch.set_num_threads(old)


def split_heads(fn, q, k, v, layout, schedule, scale, need_lse=True):
    """``fn(q, k, v, layout, schedule, scale, need_lse)`` run as ``parts_for(...)`` concurrent
    parts over (batch, kv-head) slices, each with one intra-op thread; the plain call where the
    policy does not apply (one thread, one slice, per-(batch, head) layouts, a gradient)."""
    B, H = q.shape[:2]
    Hkv = k.shape[1]
    G = H // Hkv
    parts = parts_for(B, Hkv, torch.get_num_threads())
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if not ENABLED or parts == 1 or grad or len(layout.groups) != 1 or q.device.type != "cpu":
        return fn(q, k, v, layout, schedule, scale, need_lse)
    # slices of the flattened (batch, kv-head) axis, as even as possible
    qf, kf, vf = (t.reshape(B * Hkv, -1, *t.shape[2:]) for t in (q, k, v))  # q: [B*Hkv, G, Lq, D]
    bounds = [round(i * B * Hkv / parts) for i in range(parts + 1)]

    def one(i):
        a, b = bounds[i], bounds[i + 1]
        return fn(qf[a:b].reshape(b - a, G, *q.shape[2:]), kf[a:b].reshape(b - a, 1, *k.shape[2:]),
                  vf[a:b].reshape(b - a, 1, *v.shape[2:]), layout, schedule, scale, need_lse)

    with _SPLIT_LOCK, intra_op_threads(1):
        results = list(_pool(parts).map(one, range(parts)))
    out = torch.cat([o.reshape(-1, G, *o.shape[2:]) for o, _ in results]).reshape(B, H, *results[0][0].shape[2:])
    lse = None
    if results[0][1] is not None:
        lse = torch.cat([l.reshape(-1, G, l.shape[-1]) for _, l in results]).reshape(B, H, -1)
    return out, lse
