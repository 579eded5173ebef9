"""Benchmark measurement: timing, peak memory, and what every benchmark result shares.

Used by the side-by-side benchmarks in :mod:`attncompiler.bench.attention`, the layout benchmark in
:mod:`attncompiler.bench.layout` and the scripts in ``benchmarks/``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Callable

import torch

from ..errors import InputError

Progress = Callable[[str], None]


def quiet(msg: str) -> None:
    """Progress callback that discards its message (the default when no progress is wanted)."""
    pass


class JsonReport:
    """Mixin for frozen-dataclass results: ``to_dict()`` (JSON-ready) and ``to_json()``."""

    def to_dict(self) -> dict:
        """The result as nested dicts and lists."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """The result as indented JSON."""
        return json.dumps(self.to_dict(), indent=2)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_run(fn: Callable[[], None], device: torch.device) -> float:
    """Wall-clock seconds of one call of ``fn``, synchronizing CUDA before and after so queued kernels
    count."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def memory_method(device: torch.device) -> str:
    """How :func:`peak_memory` measures on ``device`` (printed with the results)."""
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated during one call, above the memory held before it"
    return ("peak of the CPU allocator's live tensor bytes during one call, above those held before it "
            "(torch.profiler allocation events; inputs, cached layouts and block masks excluded)")


def peak_memory(fn: Callable[[], None], device: torch.device) -> int:
    """Peak tensor memory (bytes) that one call of ``fn`` allocates beyond what was held before."""
    if device.type == "cuda":
        _sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        _sync(device)
        return max(0, torch.cuda.max_memory_allocated(device) - before)
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, node.extra_fields.alloc_size, node.extra_fields.total_allocated))
    if not events:
        return 0
    events.sort()
    baseline = events[0][2] - events[0][1]  # allocator total just before the first event
    return max(0, max(total for _, _, total in events) - baseline)


def fmt(x, spec: str) -> str:
    """Format ``x`` with ``spec``, or ``"-"`` when it is None (a missing table cell)."""
    return "-" if x is None else format(x, spec)


def check_positive(**kw) -> None:
    """Raise :class:`InputError` unless every keyword value is a positive int (bools rejected)."""
    for name, v in kw.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise InputError(f"{name}={v!r} must be a positive integer")
