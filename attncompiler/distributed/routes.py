"""Ring routes: how far each key/value shard travels in each direction, and which rows it carries.

A bidirectional ring: the shard of rank ``o`` moves forward ``o -> o+1 -> ... -> o+f`` and
backward ``o -> o-1 -> ... -> o-b`` (ranks mod P), one hop per ring step, each hop forwarding
the buffer the rank received at the previous step. ``f`` and ``b`` are the fewest hops that
reach every rank whose queries need the shard (a sliding window: one hop each way; causal:
forward only, as far as the last rank). At hop ``t`` the buffer holds only the rows still
needed by the ranks ahead (the union of their key pieces, at most ``MAX_PIECES`` intervals),
so a shard shrinks as it travels and stops as soon as no rank further on needs it. Global key
rows thus travel as their own small piece, next to each neighbour's window strip. The dense ring sends every shard whole
P-1 hops forward. Backward gradients retrace each hop in reverse, with the same sizes.
"""

from __future__ import annotations

import numpy as np

from .pieces import coarsen, hull, length, merge

FWD, BWD = 0, 1
SIGN = (1, -1)


def sparse_routes(need: np.ndarray, key_pieces, sizes):
    """``(hops [P, 2], hop_pieces)`` of the sparsity-aware bidirectional ring.

    ``hop_pieces[o][d][t]`` are the local row pieces of shard ``o`` carried on hop ``t`` in
    direction ``d`` (``t = 0``: the whole shard at its owner). Each hop's pieces contain the
    next hop's (built from the route's end backwards), and the key pieces of the rank reached.
    """
    P = need.shape[0]
    hops = np.zeros((P, 2), dtype=np.int64)
    hop_pieces = []
    for o in range(P):
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
        per_dir = []
        for d, h in ((FWD, f), (BWD, b)):
            route = [((0, int(sizes[o])),)] + [()] * h
            for t in range(h, 0, -1):
                r = (o + SIGN[d] * t) % P
                mine = key_pieces[r][o] if need[r, o] else ()
                route[t] = coarsen(merge(mine + (route[t + 1] if t < h else ())))
            per_dir.append(tuple(route))
        hop_pieces.append(tuple(per_dir))
    return hops, tuple(hop_pieces)


def hop_hulls(hops: np.ndarray, hop_pieces) -> np.ndarray:
    """``hop_range [P, 2, P, 2]``: the hull of each hop's pieces (zeros past the route's end)."""
    P = hops.shape[0]
    out = np.zeros((P, 2, P, 2), dtype=np.int64)
    for o in range(P):
        for d in (FWD, BWD):
            for t, ps in enumerate(hop_pieces[o][d]):
                out[o, d, t] = hull(ps)
    return out


def dense_routes(sizes):
    """The dense ring: every shard whole, P-1 hops forward."""
    P = len(sizes)
    hops = np.zeros((P, 2), dtype=np.int64)
    hops[:, FWD] = P - 1
    hop_pieces = tuple((tuple(((0, int(n)),) for _ in range(P)), (((0, int(n)),),)) for n in sizes)
    return hops, hop_pieces


def route_bytes(hops: np.ndarray, hop_pieces, row_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    """Bytes each rank sends and receives on the ring in the forward pass (backward: the same, swapped)."""
    P = hops.shape[0]
    sent = np.zeros(P, dtype=np.int64)
    recv = np.zeros(P, dtype=np.int64)
    for o in range(P):
        for d in (FWD, BWD):
            for t in range(1, int(hops[o, d]) + 1):
                w = length(hop_pieces[o][d][t]) * row_bytes
                sent[(o + SIGN[d] * (t - 1)) % P] += w
                recv[(o + SIGN[d] * t) % P] += w
    return sent, recv
