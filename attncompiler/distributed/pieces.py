"""Sets of rows as a few disjoint intervals ("pieces"), and tensors packed from them.

A rank rarely needs a whole remote shard: a sliding window with global tokens needs the global
key rows at the start of the sequence and a window-wide strip at the shard's edge. Needs and
ring buffers are therefore lists of sorted, disjoint, non-adjacent ``(lo, hi)`` row intervals,
at most :data:`MAX_PIECES` of them (the smallest gaps are filled first beyond that, so a set
only ever grows). A buffer holding pieces stores their rows back to back ("packed").
"""

from __future__ import annotations

import torch

MAX_PIECES = 8  # per need and per ring buffer: more pieces would mean more, smaller copies

Pieces = tuple[tuple[int, int], ...]


def merge(intervals) -> Pieces:
    """Sorted union of ``(lo, hi)`` intervals; touching or overlapping ones are joined, empty ones dropped."""
    out: list[list[int]] = []
    for lo, hi in sorted((int(a), int(b)) for a, b in intervals if b > a):
        if out and lo <= out[-1][1]:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return tuple((a, b) for a, b in out)


def coarsen(pieces: Pieces, limit: int = MAX_PIECES) -> Pieces:
    """``pieces`` with the smallest gaps filled until at most ``limit`` remain (a superset)."""
    if len(pieces) <= limit:
        return pieces
    gaps = sorted(range(len(pieces) - 1), key=lambda j: (pieces[j + 1][0] - pieces[j][1], j))
    fill = set(gaps[:len(pieces) - limit])  # the smallest gaps, earliest first on ties
    out = [list(pieces[0])]
    for j in range(1, len(pieces)):
        if j - 1 in fill:
            out[-1][1] = pieces[j][1]
        else:
            out.append(list(pieces[j]))
    return tuple((a, b) for a, b in out)


def length(pieces: Pieces) -> int:
    """Number of rows in ``pieces``."""
    return sum(b - a for a, b in pieces)


def hull(pieces: Pieces) -> tuple[int, int]:
    """``(first lo, last hi)``, or ``(0, 0)`` when empty."""
    return (pieces[0][0], pieces[-1][1]) if pieces else (0, 0)


def clip(pieces: Pieces, lo: int, hi: int) -> Pieces:
    """The part of ``pieces`` inside ``[lo, hi)``."""
    return tuple((max(a, lo), min(b, hi)) for a, b in pieces if min(b, hi) > max(a, lo))


def subtract(pieces: Pieces, holes: Pieces) -> Pieces:
    """The rows of ``pieces`` outside ``holes``."""
    out = []
    for a, b in pieces:
        cur = a
        for c, d in holes:
            if d <= cur or c >= b:
                continue
            if c > cur:
                out.append((cur, c))
            cur = max(cur, d)
        if cur < b:
            out.append((cur, b))
    return tuple(out)


def covers(outer: Pieces, inner: Pieces) -> bool:
    """Whether every piece of ``inner`` lies inside a single piece of ``outer``."""
    return all(any(a <= c and d <= b for a, b in outer) for c, d in inner)


def offset(pieces: Pieces, lo: int, hi: int) -> int:
    """Packed offset of rows ``[lo, hi)``, which must lie inside one piece of ``pieces``."""
    at = 0
    for a, b in pieces:
        if a <= lo and hi <= b:
            return at + lo - a
        at += b - a
    raise AssertionError(f"rows [{lo}, {hi}) are not inside one of the pieces {pieces}")


def pack(x: torch.Tensor, have: Pieces, want: Pieces, dim: int = 2) -> torch.Tensor:
    """Rows ``want`` (each inside one piece of ``have``) of ``x``, whose ``dim`` packs ``have``."""
    parts = [x.narrow(dim, offset(have, a, b), b - a) for a, b in want]
    if len(parts) == 1:
        return parts[0]
    if not parts:
        return x.narrow(dim, 0, 0)
    return torch.cat(parts, dim)


def add_packed(dst: torch.Tensor, dst_pieces: Pieces, src: torch.Tensor, src_pieces: Pieces, dim: int = 2) -> None:
    """``dst[rows] += src[rows]`` for every row of ``src_pieces`` (each inside one piece of ``dst_pieces``)."""
    at = 0
    for a, b in src_pieces:
        dst.narrow(dim, offset(dst_pieces, a, b), b - a).add_(src.narrow(dim, at, b - a))
        at += b - a
