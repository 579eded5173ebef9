"""Thread policy of the torch backend's attention stages: one coarse parallel region over
(batch, key/value head) slices instead of a parallel region per small ATen op.

Why two threads are no faster than one: the block path issues several small ops per chunk and
head (``bmm`` of a ``[R, G*bm, C*bn]`` tile, ``amax``, ``exp``, ``sum``, a second ``bmm``, the
online-softmax merge, the backward's ``index_add_``); each is its own OpenMP region with a
fork/join barrier, and most are too small to split well. With a competing process on one core
every barrier waits for the descheduled thread, so two threads can be several times slower
than one.

The policy: when the call has more threads than one and at least two independent
(batch, kv-head) slices, split the slices into ``min(threads, slices)`` parts and run each part
in a worker thread with intra-op parallelism 1 (ATen releases the GIL inside ops, so the parts
run concurrently; no op forks). It applies to the forward (with or without a gradient) and the
backward alike: a slice's dq, dk and dv depend only on that slice, so parts need no reduction.

Mechanics worth knowing:

* OpenMP's thread count is per OS thread: ``torch.set_num_threads`` in the caller does not
  reach pool threads, so each worker sets 1 for itself around its part and then sets the
  caller's count back (``set_num_threads`` also stores the count later threads start with).
* Grad mode and inference mode are thread-local: workers run their part under the caller's
  modes (inside an autograd Function's forward grad mode is off; a worker would otherwise
  record a graph).
* Split calls are serialized by a lock (a second Python thread calling attention at the same
  time waits), and a call made from inside a worker runs plain (no nested split).

:func:`split_kv` is the one mechanism: the block-sparse stage's forward and backward
(``codegen/pytorch/attention.py``) and :func:`split_heads` (the inference hook in
``run_block_sparse``) use it. :mod:`attncompiler.bench.threads` measures it against the plain
call. ``ATTNC_THREAD_SPLIT=0`` turns it off.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

_LOCK = threading.Lock()
_SPLIT_LOCK = threading.Lock()  # one split call at a time
_POOL: dict[int, ThreadPoolExecutor] = {}
_IN_WORKER = threading.local()
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


def split_parts(batch: int, kv_heads: int, device: torch.device) -> int:
    """The number of parts this call runs in (1: the plain path): the policy is on, the tensors
    are on the CPU, the caller is not itself a worker, and ``parts_for`` gives more than one."""
    if not ENABLED or device.type != "cpu" or getattr(_IN_WORKER, "on", False):
        return 1
    return parts_for(batch, kv_heads, torch.get_num_threads())


def kv_slice(t: torch.Tensor | None, batch: int, kv_heads: int, a: int, b: int) -> torch.Tensor | None:
    """Entries ``a:b`` of the flattened (batch, kv-head) axis of ``t [batch, kv_heads*m, ...]`` as
    ``[b-a, m, ...]``: a valid input of the same stage with batch ``b-a`` and one kv head."""
    if t is None:
        return None
    return t.reshape(batch * kv_heads, t.shape[1] // kv_heads, *t.shape[2:])[a:b]


def kv_cat(parts: list, batch: int) -> torch.Tensor | None:
    """The inverse of :func:`kv_slice` over all parts: ``[batch, kv_heads*m, ...]``."""
    if parts[0] is None:
        return None
    t = torch.cat(parts)
    return t.reshape(batch, -1, *t.shape[2:])


def run_parts(fn, n: int) -> list:
    """``[fn(0), ..., fn(n-1)]`` run concurrently in ``n`` pool threads, each with one intra-op
    thread and the caller's grad and inference modes."""
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()
    caller = torch.get_num_threads()

    def one(i):
        torch.set_num_threads(1)
        _IN_WORKER.on = True
        try:
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                return fn(i)
        finally:
            _IN_WORKER.on = False
            torch.set_num_threads(caller)  # also the count threads started later begin with

    with _SPLIT_LOCK:
        return list(_pool(n).map(one, range(n)))


def split_kv(fn, batch: int, kv_heads: int, tensors: tuple, parts: int | None = None) -> tuple:
    """``fn(*tensors)`` computed as concurrent parts over (batch, kv-head) slices.

    Every tensor in ``tensors`` (None allowed) is ``[batch, kv_heads*m, ...]`` for some ``m`` (q:
    ``m = G``, k and v: 1, lse ``[B, H, Lq]``: G); ``fn`` must treat the slices independently and
    return a tuple of tensors of the same form (or None). ``parts`` defaults to
    :func:`split_parts`; with 1 part this is the plain call ``fn(*tensors)``."""
    device = next(t.device for t in tensors if t is not None)
    n = split_parts(batch, kv_heads, device) if parts is None else parts
    if n <= 1:
        return fn(*tensors)
    bounds = [round(i * batch * kv_heads / n) for i in range(n + 1)]  # as even as possible
    results = run_parts(lambda i: fn(*(kv_slice(t, batch, kv_heads, bounds[i], bounds[i + 1]) for t in tensors)), n)
    return tuple(kv_cat([r[j] for r in results], batch) for j in range(len(results[0])))


def split_heads(fn, q, k, v, layout, schedule, scale, need_lse=True):
    """``fn(q, k, v, layout, schedule, scale, need_lse)`` run by :func:`split_kv`; the plain call
    for per-(batch, head) layouts and calls that need a gradient (the autograd Function of the
    stage splits its own forward and backward)."""
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if grad or len(layout.groups) != 1:
        return fn(q, k, v, layout, schedule, scale, need_lse)
    return split_kv(lambda q_, k_, v_: fn(q_, k_, v_, layout, schedule, scale, need_lse),
                    q.shape[0], k.shape[1], (q, k, v))
