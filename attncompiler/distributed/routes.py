"""Ring routes: how far each key/value shard travels in each direction, and which rows it carries.

A bidirectional ring: the shard of rank ``o`` moves forward ``o -> o+1 -> ... -> o+f`` and
backward ``o -> o-1 -> ... -> o-b`` (ranks mod P), one hop per ring step, each hop forwarding
the buffer the rank received at the previous step. ``f`` and ``b`` are the fewest hops that
reach every rank whose queries need the shard (a sliding window: one hop each way; causal:
forward only, as far as the last rank). At hop ``t`` the buffer holds only the rows still
needed by the ranks ahead (the hull of their key ranges), so a shard shrinks as it travels
and stops as soon as no rank further on needs it. The dense ring sends every shard whole
P-1 hops forward. Backward gradients retrace each hop in reverse, with the same sizes.
"""

from __future__ import annotations

import numpy as np

FWD, BWD = 0, 1
SIGN = (1, -1)


def sparse_routes(need: np.ndarray, key_range: np.ndarray, sizes) -> tuple[np.ndarray, np.ndarray]:
    """``(hops [P, 2], hop_range [P, 2, P, 2])`` of the sparsity-aware bidirectional ring.

    ``hop_range[o, d, t]`` is the local row range of shard ``o`` carried on hop ``t`` in
    direction ``d`` (``t = 0``: the whole shard at its owner).
    """
    P = need.shape[0]
    hops = np.zeros((P, 2), dtype=np.int64)
    hop_range = np.zeros((P, 2, P, 2), dtype=np.int64)
    for o in range(P):
        hop_range[o, :, 0] = (0, sizes[o])
        offs = [t for t in range(1, P) if need[(o + t) % P, o]]
        best = None
        for cut in range(P):  # offsets <= cut go forward, the others backward
            f = max((t for t in offs if t <= cut), default=0)
            b = P - min((t for t in offs if t > cut), default=P)
            cost = (f + b, max(f, b), b)
            if best is None or cost < best[0]:
                best = (cost, f, b)
        _, f, b = best
        hops[o] = (f, b)
        for d, h in ((FWD, f), (BWD, b)):
            for t in range(1, h + 1):
                dests = [(o + SIGN[d] * u) % P for u in range(t, h + 1)]
                dests = [r for r in dests if need[r, o]]
                hop_range[o, d, t] = (min(key_range[r, o, 0] for r in dests), max(key_range[r, o, 1] for r in dests))
    return hops, hop_range


def dense_routes(sizes) -> tuple[np.ndarray, np.ndarray]:
    """The dense ring: every shard whole, P-1 hops forward."""
    P = len(sizes)
    hops = np.zeros((P, 2), dtype=np.int64)
    hops[:, FWD] = P - 1
    hop_range = np.zeros((P, 2, P, 2), dtype=np.int64)
    hop_range[:, FWD, :, 1] = np.asarray(sizes)[:, None]
    hop_range[:, BWD, 0, 1] = np.asarray(sizes)
    return hops, hop_range


def route_bytes(hops: np.ndarray, hop_range: np.ndarray, row_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    """Bytes each rank sends and receives in the forward pass (backward: the same, swapped)."""
    P = hops.shape[0]
    sent = np.zeros(P, dtype=np.int64)
    recv = np.zeros(P, dtype=np.int64)
    for o in range(P):
        for d in (FWD, BWD):
            for t in range(1, int(hops[o, d]) + 1):
                w = int(hop_range[o, d, t, 1] - hop_range[o, d, t, 0]) * row_bytes
                sent[(o + SIGN[d] * (t - 1)) % P] += w
                recv[(o + SIGN[d] * t) % P] += w
    return sent, recv
