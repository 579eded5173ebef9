"""Memory estimates checked before large allocations (dense masks, block layouts).

A request that cannot fit raises a :class:`LayoutError` saying how much memory it needs and what
to do instead, rather than a raw numpy ``MemoryError`` or a torch allocator error deep inside.
"""

from __future__ import annotations

import os

import torch

from ..errors import LayoutError

MAX_ALLOC_BYTES = 1 << 40
"""Documented cap (1 TiB) on one dense mask or block layout, whatever the machine reports."""


_ALWAYS_FITS = 1 << 26  # requests this small skip the free-memory lookup


def available_bytes(device: torch.device | str = "cpu") -> int | None:
    """Memory a new allocation on ``device`` can use, or None when unknown (e.g. meta tensors)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(dev)[0])
        except (RuntimeError, AssertionError):
            return None
    if dev.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def format_bytes(n: float) -> str:
    """``1536`` -> ``'1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def check_budget(what: str, need: int, hint: str, device: torch.device | str = "cpu") -> None:
    """Raise a :class:`LayoutError` when ``need`` bytes exceed the free memory or :data:`MAX_ALLOC_BYTES`.

    Args:
        what: the request, e.g. ``"to_dense(1000000, 1000000)"``.
        need: its estimated peak size in bytes.
        hint: what to do instead.
        device: where it would be allocated.
    """
    if need <= _ALWAYS_FITS:
        return
    free = available_bytes(device)
    limit = MAX_ALLOC_BYTES if free is None else min(free, MAX_ALLOC_BYTES)
    if need > limit:
        have = "the 1 TiB limit" if free is None or free >= MAX_ALLOC_BYTES else \
            f"the {format_bytes(free)} available on {torch.device(device)}"
        raise LayoutError(f"{what} needs about {format_bytes(need)}, more than {have}; {hint}")
