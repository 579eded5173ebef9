"""Side-by-side benchmarks: our torch backend vs SDPA with a dense mask vs FlexAttention.

Contenders run in one process on the same inputs, alternating (the order rotates every
round), after one untimed warm-up call each (FlexAttention's first call compiles). Reported
per contender: median time, speedups against each peer, useful GFLOP/s (4 * allowed pairs * D
per (batch, head) forward, counting only allowed (q, k) pairs; backward counts 2.5x forward)
and peak memory of one call. Layout benchmarks (our analytic layout vs FlexAttention's
``create_block_mask``) run each build in a fresh subprocess so their peak RSS is their own.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import statistics
from dataclasses import dataclass
from typing import Callable

import torch

from .layout import LAYOUT_CONTENDERS, LayoutBenchResult, LayoutEntry, run_layout_bench
from .measure import JsonReport, Progress, check_positive, fmt, quiet, timed_run, memory_method, peak_memory
from .peers import CREATE_BLOCK_MASK_BYTES_PER_PAIR, setup_flex, setup_sdpa, allowed_pairs, flex_mask_mod
from ..errors import InputError, UnsupportedError
from ..dsl.pattern import Family, Pattern

__all__ = [
    "BACKWARD_FACTOR", "CONTENDERS", "CREATE_BLOCK_MASK_BYTES_PER_PAIR", "DTYPES", "LAYOUT_CONTENDERS",
    "BenchResult", "ContenderResult", "JsonReport", "LayoutBenchResult", "LayoutEntry", "Progress",
    "allowed_pairs", "flex_mask_mod", "memory_method", "peak_memory", "run_bench", "run_layout_bench",
]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
CONTENDERS = ("attnc", "sdpa", "flex")
BACKWARD_FACTOR = 2.5  # backward FLOPs relative to forward (FlashAttention's convention)


@dataclass(frozen=True)
class ContenderResult:
    """One contender's figures (``skipped`` says why a contender did not run)."""

    name: str
    description: str
    median_s: float | None = None
    times_s: tuple[float, ...] = ()
    gflops: float | None = None
    peak_bytes: int | None = None
    max_abs_diff: float | None = None  # against our backend's output, a sanity check
    skipped: str | None = None


@dataclass(frozen=True)
class BenchResult(JsonReport):
    """The result of :func:`run_bench`; ``str()`` is a readable table, ``to_dict()`` is JSON-ready."""

    pattern: str
    family: str
    seq_len: int
    batch: int
    heads: int
    head_dim: int
    dtype: str
    device: str
    backward: bool
    repeats: int
    allowed_pairs: int | None
    density: float | None
    memory_method: str | None
    contenders: tuple[ContenderResult, ...]
    notes: tuple[str, ...] = ()

    def contender(self, name: str) -> ContenderResult:
        for c in self.contenders:
            if c.name == name:
                return c
        raise KeyError(f"no contender {name!r}; have {[c.name for c in self.contenders]}")

    def speedup(self, name: str, peer: str) -> float | None:
        """How many times faster ``name`` is than ``peer`` (peer median / own median)."""
        a, b = self.contender(name).median_s, self.contender(peer).median_s
        return None if a is None or b is None else b / a

    def to_dict(self) -> dict:
        """The result as nested dicts, with the speedups of every contender over every other."""
        d = super().to_dict()
        ran = [c.name for c in self.contenders if c.median_s is not None]
        d["speedups"] = {a: {b: self.speedup(a, b) for b in ran if b != a} for a in ran}
        return d

    def __str__(self) -> str:
        mode = "forward + backward" if self.backward else "forward"
        dens = f", density {self.density:.4f}" if self.density is not None else ""
        lines = [f"bench {self.pattern}",
                 f"  L={self.seq_len} B={self.batch} H={self.heads} D={self.head_dim} {self.dtype} {mode} on "
                 f"{self.device}{dens}; {self.repeats} alternating rounds, medians; warm-up and "
                 "FlexAttention compilation excluded"]
        ran = [c for c in self.contenders if c.median_s is not None]
        head = f"  {'contender':<8} {'median ms':>10} {'GFLOP/s':>9} {'peak MiB':>9} {'max|diff|':>10}"
        head += "".join(f" {'x vs ' + c.name:>10}" for c in ran)
        lines.append(head)
        for c in self.contenders:
            if c.median_s is None:
                lines.append(f"  {c.name:<8} skipped: {c.skipped}")
                continue
            row = f"  {c.name:<8} {c.median_s * 1e3:>10.3f} {fmt(c.gflops, '.2f'):>9} "
            row += f"{fmt(None if c.peak_bytes is None else c.peak_bytes / 2**20, '.1f'):>9} "
            row += f"{fmt(c.max_abs_diff, '.2e'):>10}"
            row += "".join(f" {'-' if p is c else fmt(self.speedup(c.name, p.name), '.2f'):>10}" for p in ran)
            lines.append(row)
        lines.append("  x vs P: speedup over P (P's median / this median; > 1 is faster)")
        lines += [f"  {c.name}: {c.description}" for c in self.contenders]
        if self.memory_method:
            lines.append(f"  peak memory: {self.memory_method}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


@contextlib.contextmanager
def native_stderr_silenced(device: torch.device):
    """Drop what native code writes to file descriptor 2 while the CPU profiler runs: kineto
    prints ``USDT: ... profiler_start/stop`` lines there that no option turns off. Python's own
    ``sys.stderr`` (progress, warnings) is flushed first and works again afterwards."""
    if torch.device(device).type != "cpu":
        yield
        return
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no descriptor 2 (embedded interpreters): nothing to silence
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def run_bench(pattern: Pattern, seq_len: int, *, heads: int = 4, head_dim: int = 64, batch: int = 1,
              dtype: str = "float32", backward: bool = False, repeats: int = 10,
              contenders: tuple[str, ...] = CONTENDERS, device: str = "cpu", backend: str = "torch",
              seed: int = 0, mask_cap_bytes: int = 1 << 30, block_mask_cap_bytes: int = 4 << 30,
              flex_block: int = 128,
              flex_mask: str = "create", measure_memory: bool = True,
              progress: Progress = quiet) -> BenchResult:
    """Time our backend against SDPA (dense mask) and FlexAttention on the same inputs.

    Args:
        pattern: any pattern; SDPA and FlexAttention run only for mask patterns.
        seq_len, heads, head_dim, batch: input shape ``[batch, heads, seq_len, head_dim]``.
        dtype: one of ``DTYPES``.
        backward: time forward + backward instead of forward only.
        repeats: timed calls per contender (alternating).
        contenders: which of ``CONTENDERS`` to run.
        device: ``"cpu"`` or ``"cuda"``.
        backend: our backend (``"torch"``, or ``"triton"``/``"auto"`` on CUDA).
        seed: seed of the random inputs.
        mask_cap_bytes: skip SDPA when its dense bool mask would exceed this many bytes.
        block_mask_cap_bytes: when ``create_block_mask`` would need more than this (about 24
            bytes per (q, k) pair on CPU), build FlexAttention's BlockMask from our layout instead.
        flex_block: FlexAttention's BLOCK_SIZE (its default is 128).
        flex_mask: ``"create"`` (``create_block_mask`` with the pattern's mask_mod, what a user
            writes) or ``"layout"`` (our layout exported with ``layout.to_block_mask()``).
        measure_memory: also measure each contender's peak memory (one extra call each).
        progress: called with short status messages (the CLI prints them to stderr).
    """
    check_positive(seq_len=seq_len, heads=heads, head_dim=head_dim, batch=batch, repeats=repeats)
    if dtype not in DTYPES:
        raise InputError(f"dtype={dtype!r} is not supported; choose one of {sorted(DTYPES)}")
    bad = [c for c in contenders if c not in CONTENDERS]
    if bad or not contenders:
        raise InputError(f"contenders={tuple(contenders)!r}: choose from {CONTENDERS}")
    if flex_mask not in ("create", "layout"):
        raise InputError(f"flex_mask={flex_mask!r} must be 'create' or 'layout'")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UnsupportedError(f"device={device!r} requested but CUDA is not available; use --device cpu")
    from ..runtime.compile import compile as ac_compile

    L, B, H, D = seq_len, batch, heads, head_dim
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q, k, v, grad = (torch.randn(B, H, L, D, generator=gen, dtype=torch.float32).to(dev, DTYPES[dtype])
                     for _ in range(4))  # [B, H, L, D] each
    for t in (q, k, v):
        t.requires_grad_(backward)
    is_mask = pattern.family == Family.MASK
    progress("counting allowed pairs")
    pairs = allowed_pairs(pattern, L, L, batch=B, heads=H)
    flops = None if pairs is None else 4 * pairs * D * (1 + BACKWARD_FACTOR if backward else 1)
    notes: list[str] = []
    calls: dict[str, Callable[[], torch.Tensor]] = {}
    desc: dict[str, str] = {}
    skipped: dict[str, str] = {}

    if "attnc" in contenders:
        attn = ac_compile(pattern, backend)
        calls["attnc"] = lambda: attn(q, k, v)
        desc["attnc"] = f"attncompiler {backend} backend (ac.compile(pattern, {backend!r}))"
    if "sdpa" in contenders:
        desc["sdpa"] = "torch.nn.functional.scaled_dot_product_attention with a dense bool mask"
        if not is_mask:
            skipped["sdpa"] = f"{pattern.family} patterns have no dense mask"
        else:
            setup_sdpa(pattern, q, k, v, mask_cap_bytes, calls, skipped, progress)
    if "flex" in contenders:
        desc["flex"] = f"torch.compile(flex_attention), BLOCK_SIZE={flex_block}"
        if not is_mask:
            skipped["flex"] = f"{pattern.family} patterns have no mask_mod"
        else:
            desc["flex"] += setup_flex(pattern, q, k, v, flex_block, flex_mask, block_mask_cap_bytes, calls,
                                        skipped, progress)

    def step(fn):
        if not backward:
            return lambda: fn()

        def fwd_bwd():
            out = fn()
            out.backward(grad)
            for t in (q, k, v):
                t.grad = None
            return out
        return fwd_bwd

    steps = {n: step(fn) for n, fn in calls.items()}
    outputs: dict[str, torch.Tensor] = {}
    for name in list(steps):  # warm-up: builds layouts and caches, compiles FlexAttention
        slow = " (torch.compile of flex_attention: slow the first time)" if name == "flex" else ""
        progress(f"warm-up {name}{slow}")
        try:
            with contextlib.nullcontext() if backward else torch.no_grad():
                outputs[name] = steps[name]().detach()
        except Exception as e:  # a peer failing must not hide the others' figures
            if name == "attnc":
                raise
            skipped[name] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
            del steps[name]
    names = list(steps)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        progress(f"round {r + 1}/{repeats}")
        shift = r % max(len(names), 1)  # rotate the order so no contender always runs first
        for name in names[shift:] + names[:shift]:
            fn = steps[name]
            with contextlib.nullcontext() if backward else torch.no_grad():
                times[name].append(timed_run(fn, dev))
    peaks: dict[str, int] = {}
    if measure_memory:
        for name in names:
            progress(f"peak memory {name}")
            with contextlib.nullcontext() if backward else torch.no_grad(), native_stderr_silenced(dev):
                peaks[name] = peak_memory(steps[name], dev)
    results = []
    ref_out = outputs.get("attnc")
    for name in contenders:
        if name not in desc:
            continue
        if name not in times:
            results.append(ContenderResult(name, desc[name], skipped=skipped.get(name, "not run")))
            continue
        med = statistics.median(times[name])
        diff = None
        if ref_out is not None:
            d = (outputs[name].double() - ref_out.double()).abs()
            diff = float(d.nan_to_num(nan=math.inf).max())
        results.append(ContenderResult(name, desc[name], med, tuple(times[name]),
                                       None if flops is None else flops / med / 1e9, peaks.get(name), diff))
    density = None if pairs is None else pairs / (B * H * L * L)
    if pairs is None:
        notes.append(f"GFLOP/s not reported: {pattern.family} patterns are not a set of allowed (q, k) pairs")
    progress("done")
    return BenchResult(repr(pattern), pattern.family, L, B, H, D, dtype, str(dev), backward, repeats, pairs,
                       density, memory_method(dev) if measure_memory else None, tuple(results), tuple(notes))
