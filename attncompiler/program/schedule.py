"""Schedules: how a stage is computed (block sizes, warps, pipelining, chunking).

A :class:`Schedule` is a frozen value; schedule primitives are pure functions returning a new
one and raising :class:`ScheduleError` when a precondition fails, in the style of TVM.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import ScheduleError


@dataclass(frozen=True)
class Schedule:
    """How one attention stage is executed.

    Attributes:
        block_m, block_n: the layout's query/key block sizes (what is empty/partial/full).
        kernel_block_m, kernel_block_n: tile sizes of a generated kernel; they must divide the
            layout's block sizes (None: equal to them).
        num_warps, num_stages: Triton launch parameters.
        tile_elems: the torch backend processes query blocks in chunks whose per-head score
            tile holds about this many elements (1 MiB in fp32 by default: stays in cache).
        key_blocks_per_step: the most key blocks one online-softmax step covers; longer rows
            (global rows, causal rows at large L) are split and merged by log-sum-exp.
    """

    block_m: int = 64
    block_n: int = 64
    kernel_block_m: int | None = None
    kernel_block_n: int | None = None
    num_warps: int = 4
    num_stages: int = 2
    tile_elems: int = 1 << 18
    key_blocks_per_step: int = 64

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ScheduleError(f"{f.name}={v!r} must be a positive integer")
        for kb, lb, name in ((self.kernel_block_m, self.block_m, "kernel_block_m"),
                             (self.kernel_block_n, self.block_n, "kernel_block_n")):
            if kb is not None and lb % kb:
                raise ScheduleError(f"{name}={kb} must divide the layout block size {lb}")

    @property
    def tile_m(self) -> int:
        return self.kernel_block_m or self.block_m

    @property
    def tile_n(self) -> int:
        return self.kernel_block_n or self.block_n

    def __str__(self) -> str:
        parts = [f"block=({self.block_m}, {self.block_n})"]
        if self.kernel_block_m or self.kernel_block_n:
            parts.append(f"tile=({self.tile_m}, {self.tile_n})")
        parts += [f"warps={self.num_warps}", f"stages={self.num_stages}",
                  f"tile_elems={self.tile_elems}", f"key_blocks_per_step={self.key_blocks_per_step}"]
        return "Schedule(" + ", ".join(parts) + ")"


def blocks(s: Schedule, block_m: int, block_n: int | None = None) -> Schedule:
    """Set the layout block sizes (kernel tiles are reset to match)."""
    return dataclasses.replace(s, block_m=block_m, block_n=block_m if block_n is None else block_n,
                               kernel_block_m=None, kernel_block_n=None)


def tile(s: Schedule, kernel_block_m: int, kernel_block_n: int) -> Schedule:
    """Split each layout block into kernel tiles; they must divide the layout block sizes."""
    return dataclasses.replace(s, kernel_block_m=kernel_block_m, kernel_block_n=kernel_block_n)


def warps(s: Schedule, num_warps: int) -> Schedule:
    """Set the number of warps per program (a power of two, 1 to 16)."""
    if num_warps not in (1, 2, 4, 8, 16):
        raise ScheduleError(f"num_warps={num_warps!r} must be one of 1, 2, 4, 8, 16")
    return dataclasses.replace(s, num_warps=num_warps)


def pipeline(s: Schedule, num_stages: int) -> Schedule:
    """Set the software-pipelining depth of the key loop (1 to 8)."""
    if not isinstance(num_stages, int) or not 1 <= num_stages <= 8:
        raise ScheduleError(f"num_stages={num_stages!r} must be an integer in [1, 8]")
    return dataclasses.replace(s, num_stages=num_stages)


def chunk(s: Schedule, tile_elems: int | None = None, key_blocks_per_step: int | None = None) -> Schedule:
    """Set the torch backend's chunking (score-tile elements, key blocks per softmax step)."""
    return dataclasses.replace(s, tile_elems=tile_elems or s.tile_elems,
                               key_blocks_per_step=key_blocks_per_step or s.key_blocks_per_step)
