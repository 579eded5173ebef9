"""How a length-L sequence is split over P ranks for sequence-parallel attention.

The sequence is cut into contiguous *chunks*; each chunk belongs to one rank, and a rank's
local tensors are its chunks concatenated in increasing global order. Three layouts:

* ``contiguous``: P chunks, rank r holds chunk r (``shard_bounds(L, P)``).
* ``zigzag``: 2P chunks, rank r holds chunks r and 2P-1-r. Under a causal mask rank r's
  early chunk is cheap and its late chunk expensive, so every rank does about the same work.
* ``striped``: ``P * stripes`` chunks dealt round-robin (chunk c goes to rank c % P), the
  block-cyclic form of striped attention.

The user-facing tensors stay in the natural (contiguous) order: :meth:`Sharding.shard` cuts a
rank's local tensor out of a full one, :meth:`Sharding.unshard` reassembles full tensors from
the local ones, and :meth:`Sharding.indices` gives the global positions a rank holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from ..errors import InputError, LayoutError

KINDS = ("contiguous", "zigzag", "striped")
DEFAULT_STRIPES = 4  # chunks per rank of the striped layout


def shard_bounds(seq_len: int, world_size: int) -> tuple[int, ...]:
    """Contiguous shard boundaries ``b[0]=0 < ... < b[P]=L``; sizes differ by at most one."""
    for name, v in (("seq_len", seq_len), ("world_size", world_size)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
            raise LayoutError(f"{name}={v!r} must be a positive integer")
    if world_size > seq_len:
        raise LayoutError(f"world_size={world_size} exceeds seq_len={seq_len}; every rank needs at least one token")
    return tuple(r * seq_len // world_size for r in range(world_size + 1))


@dataclass(frozen=True)
class Sharding:
    """Chunks ``[chunk_bounds[c], chunk_bounds[c+1])`` of the sequence and the rank owning each."""

    kind: str
    seq_len: int
    world_size: int
    chunk_bounds: tuple[int, ...]
    chunk_owner: tuple[int, ...]

    @cached_property
    def _segments(self) -> tuple[tuple[tuple[int, int, int], ...], ...]:
        segs: list[list[tuple[int, int, int]]] = [[] for _ in range(self.world_size)]
        fill = [0] * self.world_size
        for c, owner in enumerate(self.chunk_owner):
            lo, hi = self.chunk_bounds[c], self.chunk_bounds[c + 1]
            segs[owner].append((lo, hi, fill[owner]))
            fill[owner] += hi - lo
        return tuple(tuple(s) for s in segs)

    def segments(self, rank: int) -> tuple[tuple[int, int, int], ...]:
        """``(global_lo, global_hi, local_lo)`` of each chunk ``rank`` holds, in local order."""
        return self._segments[rank]

    def local_len(self, rank: int) -> int:
        """Number of tokens ``rank`` holds."""
        return sum(hi - lo for lo, hi, _ in self.segments(rank))

    def chunk_local_start(self) -> np.ndarray:
        """Local row at which each chunk starts inside its owner's tensors."""
        out = np.zeros(len(self.chunk_owner), dtype=np.int64)
        fill = [0] * self.world_size
        for c, owner in enumerate(self.chunk_owner):
            out[c] = fill[owner]
            fill[owner] += self.chunk_bounds[c + 1] - self.chunk_bounds[c]
        return out

    def indices(self, rank: int) -> torch.Tensor:
        """Global positions of ``rank``'s local tokens, in local order (int64)."""
        return torch.cat([torch.arange(lo, hi) for lo, hi, _ in self.segments(rank)])

    def shard(self, x: torch.Tensor, rank: int, dim: int = 2) -> torch.Tensor:
        """``rank``'s local part of a full tensor ``x`` (sequence along ``dim``); a view when contiguous."""
        if x.shape[dim] != self.seq_len:
            raise InputError(f"tensor has {x.shape[dim]} positions along dim {dim}, the sharding is for "
                             f"seq_len={self.seq_len}")
        parts = [x.narrow(dim, lo, hi - lo) for lo, hi, _ in self.segments(rank)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim)

    def unshard(self, parts, dim: int = 2) -> torch.Tensor:
        """The full tensor from every rank's local part (``parts[r]`` from rank r), natural order."""
        if len(parts) != self.world_size:
            raise InputError(f"unshard needs one part per rank ({self.world_size}), got {len(parts)}")
        pieces = {}
        for r, x in enumerate(parts):
            if x.shape[dim] != self.local_len(r):
                raise InputError(f"rank {r}'s part has {x.shape[dim]} positions, expected {self.local_len(r)}")
            for lo, hi, local in self.segments(r):
                pieces[lo] = x.narrow(dim, local, hi - lo)
        return torch.cat([pieces[lo] for lo in sorted(pieces)], dim)


def make_sharding(kind: str, seq_len: int, world_size: int, *, stripes: int = DEFAULT_STRIPES) -> Sharding:
    """The ``kind`` sharding ("contiguous", "zigzag" or "striped") of ``seq_len`` tokens over ``world_size``."""
    P = world_size
    if kind == "contiguous":
        n, owner = P, tuple(range(P))
    elif kind == "zigzag":
        n, owner = 2 * P, tuple(c if c < P else 2 * P - 1 - c for c in range(2 * P))
    elif kind == "striped":
        if isinstance(stripes, bool) or not isinstance(stripes, int) or stripes < 1:
            raise LayoutError(f"{stripes=} must be a positive integer (chunks per rank)")
        n, owner = P * stripes, tuple(c % P for c in range(P * stripes))
    else:
        raise LayoutError(f"sharding={kind!r} is not one of {KINDS + ('auto',)}")
    shard_bounds(seq_len, world_size)  # validates the sizes
    if n > seq_len:
        raise LayoutError(f"sharding={kind!r} cuts L={seq_len} into {n} chunks over {P} ranks; it needs "
                          f"seq_len >= {n} (use sharding='contiguous' for such short sequences)")
    return Sharding(kind, seq_len, world_size, shard_bounds(seq_len, n), owner)
