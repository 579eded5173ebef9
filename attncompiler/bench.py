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
import dataclasses
import json
import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from .errors import InputError, UnsupportedError
from .pattern import Family, Pattern, PerHead

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
CONTENDERS = ("attnc", "sdpa", "flex")
BACKWARD_FACTOR = 2.5  # backward FLOPs relative to forward (FlashAttention's convention)
CREATE_BLOCK_MASK_BYTES_PER_PAIR = 24  # measured peak of create_block_mask on CPU, per (q, k) pair

Progress = Callable[[str], None]


def _quiet(msg: str) -> None:
    pass


# ---------------------------------------------------------------------------------------------
# Pattern helpers shared by the contenders
# ---------------------------------------------------------------------------------------------

def allowed_pairs(pattern: Pattern, q_len: int, kv_len: int, *, batch: int = 1, heads: int = 1,
                  block: int = 64) -> int | None:
    """Allowed (q, k) pairs summed over all ``batch * heads`` entries (exact), or None when the
    pattern is not a mask (its work is not a set of pairs)."""
    if pattern.family != Family.MASK:
        return None
    lay = pattern.layout(q_len, kv_len, block, batch=batch, heads=heads)
    gi = lay.group_index.reshape(-1)
    per_entry = sum(lay.groups[i].allowed_pairs() for i in gi)
    return per_entry * (batch * heads) // len(gi)  # group_index broadcasts over unvaried dims


def flex_mask_mod(pattern: Pattern, q_len: int, kv_len: int, device="cpu") -> tuple[Callable, str]:
    """A FlexAttention ``mask_mod`` for a mask pattern and a note on how it was made.

    Traced patterns use :func:`attncompiler.expr.to_mask_mod` (plain torch ops, compiles
    cleanly); per-head patterns select their parts with ``torch.where`` on ``h``; opaque ones
    call ``pattern.evaluate``.
    """
    from .expr import to_mask_mod

    e = pattern.predicate(q_len, kv_len)
    if e is not None:
        return to_mask_mod(e, device), "traced predicate (expr.to_mask_mod)"
    if isinstance(pattern, PerHead) and all(p.predicate(q_len, kv_len) is not None for p in pattern.patterns):
        mods = [to_mask_mod(p.predicate(q_len, kv_len), device) for p in pattern.patterns]
        n = len(mods)

        def per_head_mod(b, h, q_idx, kv_idx):
            out = mods[0](b, h, q_idx, kv_idx)
            for i in range(1, n):
                out = torch.where(h % n == i, mods[i](b, h, q_idx, kv_idx), out)
            return out

        return per_head_mod, "per-head traced predicates selected by h"
    return (lambda b, h, q_idx, kv_idx: pattern.evaluate(b, h, q_idx, kv_idx, q_len, kv_len),
            "pattern.evaluate (opaque mask_mod)")


# ---------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], None], device: torch.device) -> float:
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


# ---------------------------------------------------------------------------------------------
# Forward / backward benchmark
# ---------------------------------------------------------------------------------------------

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
class BenchResult:
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
        d = dataclasses.asdict(self)
        ran = [c.name for c in self.contenders if c.median_s is not None]
        d["speedups"] = {a: {b: self.speedup(a, b) for b in ran if b != a} for a in ran}
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

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
            row = f"  {c.name:<8} {c.median_s * 1e3:>10.3f} {_fmt(c.gflops, '.2f'):>9} "
            row += f"{_fmt(None if c.peak_bytes is None else c.peak_bytes / 2**20, '.1f'):>9} "
            row += f"{_fmt(c.max_abs_diff, '.2e'):>10}"
            row += "".join(f" {'-' if p is c else _fmt(self.speedup(c.name, p.name), '.2f'):>10}" for p in ran)
            lines.append(row)
        lines.append("  x vs P: speedup over P (P's median / this median; > 1 is faster)")
        lines += [f"  {c.name}: {c.description}" for c in self.contenders]
        if self.memory_method:
            lines.append(f"  peak memory: {self.memory_method}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _check_positive(**kw) -> None:
    for name, v in kw.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise InputError(f"{name}={v!r} must be a positive integer")


def run_bench(pattern: Pattern, seq_len: int, *, heads: int = 4, head_dim: int = 64, batch: int = 1,
              dtype: str = "float32", backward: bool = False, repeats: int = 10,
              contenders: tuple[str, ...] = CONTENDERS, device: str = "cpu", backend: str = "torch",
              seed: int = 0, mask_cap_bytes: int = 1 << 30, block_mask_cap_bytes: int = 4 << 30,
              flex_block: int = 128,
              flex_mask: str = "create", measure_memory: bool = True,
              progress: Progress = _quiet) -> BenchResult:
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
    _check_positive(seq_len=seq_len, heads=heads, head_dim=head_dim, batch=batch, repeats=repeats)
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
    from .module import compile as ac_compile

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
            _setup_sdpa(pattern, q, k, v, mask_cap_bytes, calls, skipped, progress)
    if "flex" in contenders:
        desc["flex"] = f"torch.compile(flex_attention), BLOCK_SIZE={flex_block}"
        if not is_mask:
            skipped["flex"] = f"{pattern.family} patterns have no mask_mod"
        else:
            desc["flex"] += _setup_flex(pattern, q, k, v, flex_block, flex_mask, block_mask_cap_bytes, calls,
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
                times[name].append(_timed(fn, dev))
    peaks: dict[str, int] = {}
    if measure_memory:
        for name in names:
            progress(f"peak memory {name}")
            with contextlib.nullcontext() if backward else torch.no_grad():
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


def _setup_sdpa(pattern, q, k, v, cap, calls, skipped, progress) -> None:
    from .pattern import Causal, Full
    from .reference import dense_masks

    if isinstance(pattern, (Causal, Full)):  # SDPA's own (flash) path: no mask tensor
        is_causal = isinstance(pattern, Causal)
        calls["sdpa"] = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
        return
    B, H, L, _ = q.shape
    Bm = B if pattern.batch_dependent else 1
    Hm = 1 if pattern.head_period == 1 else H
    need = Bm * Hm * L * L  # bool bytes of the dense mask
    if need > cap:
        skipped["sdpa"] = (f"dense mask would take {need / 2**30:.2f} GiB > cap {cap / 2**30:.2f} GiB "
                           "(raise it with --mask-cap-gb)")
        return
    progress("building the dense mask for SDPA")
    mask = dense_masks(pattern, B, H, L, L, q.device)  # [Bm, Hm, L, L]
    sdpa = torch.nn.functional.scaled_dot_product_attention
    calls["sdpa"] = lambda: sdpa(q, k, v, attn_mask=mask)


def _setup_flex(pattern, q, k, v, block, how, cap, calls, skipped, progress) -> str:
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as e:
        skipped["flex"] = f"FlexAttention is not available in torch {torch.__version__}: {e}"
        return ""
    B, H, L, _ = q.shape
    Bm = B if pattern.batch_dependent else 1
    Hm = 1 if pattern.head_period == 1 else H
    if how == "create" and Bm * Hm * L * L * CREATE_BLOCK_MASK_BYTES_PER_PAIR > cap:
        how = "layout"
        note = (f" (create_block_mask would need about {Bm * Hm * L * L * CREATE_BLOCK_MASK_BYTES_PER_PAIR / 2**30:.1f}"
                f" GiB > block mask cap {cap / 2**30:g} GiB)")
    else:
        note = ""
    progress(f"building FlexAttention's BlockMask ({how})")
    try:
        if how == "create":
            mod, how_mod = flex_mask_mod(pattern, L, L, q.device)
            bm = create_block_mask(mod, Bm if Bm > 1 else None, Hm if Hm > 1 else None, L, L, device=q.device,
                                   BLOCK_SIZE=block)
            note = f"; BlockMask from create_block_mask, mask_mod = {how_mod}" + note
        else:
            bm = pattern.layout(L, L, block, batch=B, heads=H).to_block_mask()
            if q.device.type != "cpu":
                bm = bm.to(q.device)
            note = "; BlockMask from our layout.to_block_mask()" + note
    except Exception as e:
        skipped["flex"] = f"BlockMask construction failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        return note
    flex = torch.compile(flex_attention)
    calls["flex"] = lambda: flex(q, k, v, block_mask=bm)
    return note


# ---------------------------------------------------------------------------------------------
# Layout benchmark: our analytic layout vs FlexAttention's create_block_mask
# ---------------------------------------------------------------------------------------------

LAYOUT_CONTENDERS = ("attnc", "flex")


@dataclass(frozen=True)
class LayoutEntry:
    """One layout builder at one length (``skipped`` says why it did not finish)."""

    name: str
    seq_len: int
    first_s: float | None = None
    median_s: float | None = None
    peak_rss_bytes: int | None = None
    rss_lower_bound: bool = False  # the build never rose above the worker's earlier RSS high-water
    blocks: int | None = None
    skipped: str | None = None


@dataclass(frozen=True)
class LayoutBenchResult:
    """The result of :func:`run_layout_bench`; ``str()`` is a readable table."""

    pattern: str
    seq_len: int
    block: int
    repeats: int
    entries: tuple[LayoutEntry, ...]
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def __str__(self) -> str:
        lines = [f"bench-layout {self.pattern}", f"  block {self.block}, {self.repeats} builds per length "
                 "(first build and median), each builder in a fresh subprocess after a warm-up build at a tiny "
                 "length (lazy imports excluded)",
                 f"  {'builder':<8} {'L':>9} {'first s':>9} {'median s':>9} {'peak RSS MiB':>13} {'blocks':>10}"]
        for e in self.entries:
            if e.skipped:
                lines.append(f"  {e.name:<8} {e.seq_len:>9} skipped: {e.skipped}")
                continue
            rss = _fmt(None if e.peak_rss_bytes is None else e.peak_rss_bytes / 2**20, ".1f")
            rss = (">=" if e.rss_lower_bound else "") + rss
            lines.append(f"  {e.name:<8} {e.seq_len:>9} {e.first_s:>9.3g} {e.median_s:>9.3g} {rss:>13} "
                         f"{_fmt(e.blocks, 'd'):>10}")
        lines.append("  attnc = pattern.layout (analytic, no L x L evaluation); flex = create_block_mask(mask_mod)")
        lines.append("  peak RSS: the worker's ru_maxrss after the builds minus its RSS just before them")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def run_layout_bench(pattern: Pattern, seq_len: int, *, block: int = 64, repeats: int = 3,
                     builders: tuple[str, ...] = LAYOUT_CONTENDERS, timeout_s: float = 60.0,
                     mem_cap_bytes: int = 8 << 30, flex_max_len: int | None = None, scan_from: int | None = None,
                     progress: Progress = _quiet) -> LayoutBenchResult:
    """Time and peak memory of building our layout vs FlexAttention's ``create_block_mask``.

    Each builder runs in a fresh Python subprocess (so peak RSS is its own and a runaway build
    can be stopped) under a wall-clock ``timeout_s`` and an address-space cap of
    ``mem_cap_bytes`` above what the worker holds before building.

    Args:
        pattern: a mask pattern (it must pickle: traced or built from primitives).
        seq_len: the sequence length (queries = keys).
        block: block size of both layouts.
        repeats: builds per length (the first includes one-time caches such as random tables).
        builders: which of ``LAYOUT_CONTENDERS`` to run.
        timeout_s: wall-clock limit per builder and length.
        mem_cap_bytes: memory cap per builder; ``create_block_mask`` is skipped without running
            when its estimated need (about 24 bytes per (q, k) pair on CPU) exceeds it.
        flex_max_len: skip ``create_block_mask`` above this length.
        scan_from: also try ``create_block_mask`` at scan_from, 2*scan_from, ... < seq_len and
            stop at the first failure, to find the largest length it manages.
    """
    import pickle

    _check_positive(seq_len=seq_len, block=block, repeats=repeats)
    if pattern.family != Family.MASK:
        raise UnsupportedError(f"layouts exist for mask patterns only; {pattern!r} is a {pattern.family} pattern")
    bad = [b for b in builders if b not in LAYOUT_CONTENDERS]
    if bad or not builders:
        raise InputError(f"builders={tuple(builders)!r}: choose from {LAYOUT_CONTENDERS}")
    pattern.validate(seq_len, seq_len)
    try:
        blob = pickle.dumps(pattern)
    except Exception as e:
        raise UnsupportedError(f"{pattern!r} cannot be sent to a worker process ({e}); "
                               "use a traced mask or DSL primitives") from None
    entries: list[LayoutEntry] = []
    notes: list[str] = []
    for name in builders:
        lengths = [seq_len]
        if name == "flex" and scan_from:
            lengths = [n for n in _doublings(scan_from, seq_len)] + [seq_len]
        for n in lengths:
            if name == "flex":
                need = n * n * CREATE_BLOCK_MASK_BYTES_PER_PAIR
                if flex_max_len is not None and n > flex_max_len:
                    entries.append(LayoutEntry(name, n, skipped=f"L > --flex-max-len {flex_max_len}"))
                    break
                if need > mem_cap_bytes:
                    entries.append(LayoutEntry(name, n, skipped=(
                        f"would need about {need / 2**30:.1f} GiB (L^2 x {CREATE_BLOCK_MASK_BYTES_PER_PAIR} B) > "
                        f"memory cap {mem_cap_bytes / 2**30:.1f} GiB")))
                    break
            progress(f"building {name} layout at L={n}")
            entry = _run_worker(blob, name, n, block, repeats, timeout_s, mem_cap_bytes)
            entries.append(entry)
            if entry.skipped:
                break
    return LayoutBenchResult(repr(pattern), seq_len, block, repeats, tuple(entries), tuple(notes))


def _doublings(start: int, stop: int) -> list[int]:
    out, n = [], start
    while n < stop:
        out.append(n)
        n *= 2
    return out


def _run_worker(blob: bytes, name: str, seq_len: int, block: int, repeats: int, timeout_s: float,
                cap: int) -> LayoutEntry:
    import subprocess
    import sys

    cmd = [sys.executable, "-c", "from attncompiler.bench import _layout_worker; _layout_worker()",
           name, str(seq_len), str(block), str(repeats), str(cap)]
    try:
        proc = subprocess.run(cmd, input=blob, capture_output=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return LayoutEntry(name, seq_len, skipped=f"did not finish in {timeout_s:g} s (timeout)")
    lines = proc.stdout.decode(errors="replace").strip().splitlines()
    if proc.returncode != 0 or not lines:
        err = proc.stderr.decode(errors="replace").strip().splitlines()
        why = err[-1] if err else f"exit code {proc.returncode}"
        if "MemoryError" in why or "alloc" in why.lower() or proc.returncode in (-9, 137):
            why = f"out of memory under the {cap / 2**30:.1f} GiB cap ({why[:160]})"
        return LayoutEntry(name, seq_len, skipped=f"failed: {why[:240]}")
    return LayoutEntry(**json.loads(lines[-1]))


def _rss_now() -> int:
    """Current resident set size in bytes (Linux /proc; falls back to the high-water mark)."""
    import os
    import resource

    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _layout_worker() -> None:
    """Subprocess body of :func:`run_layout_bench`: reads a pickled pattern on stdin, prints JSON."""
    import pickle
    import resource
    import sys

    name, seq_len, block, repeats, cap = sys.argv[1], *map(int, sys.argv[2:6])
    pattern = pickle.loads(sys.stdin.buffer.read())
    from .layout import build_layout

    if name == "flex":
        from torch.nn.attention.flex_attention import create_block_mask

        mod, _ = flex_mask_mod(pattern, seq_len, seq_len)
        Hm = None if pattern.head_period == 1 else pattern.head_period

        def build(n=seq_len):
            return create_block_mask(mod, None, Hm, n, n, device="cpu", BLOCK_SIZE=block)

        def count(bm):
            n = bm.kv_num_blocks.sum() + (bm.full_kv_num_blocks.sum() if bm.full_kv_num_blocks is not None else 0)
            return int(n)
    else:
        def build(n=seq_len):  # bypass the layout cache: every build is a real one
            return build_layout.__wrapped__(pattern, n, n, block, block)

        def count(lay):
            return lay.num_blocks
    try:  # a cap on the address space protects the shared machine from a runaway build
        with open("/proc/self/status") as f:
            vm = next(int(x.split()[1]) * 1024 for x in f if x.startswith("VmSize:"))
        resource.setrlimit(resource.RLIMIT_AS, (vm + cap, vm + cap))
    except (OSError, ValueError, StopIteration):
        pass
    try:  # warm-up at a tiny length: lazy imports (vmap, dynamo) are not part of a build
        build(min(seq_len, 2 * block))
    except Exception:
        pass
    before = _rss_now()
    high_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times, blocks = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = build()
        times.append(time.perf_counter() - t0)
        blocks = count(res)
        del res
    high = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(dict(name=name, seq_len=seq_len, first_s=times[0], median_s=statistics.median(times),
                          peak_rss_bytes=max(0, high - before), rss_lower_bound=high <= high_before,
                          blocks=blocks)))
