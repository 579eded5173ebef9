"""Layout benchmark: our analytic layout vs FlexAttention's ``create_block_mask``.

Each build runs in a fresh subprocess so its peak RSS is its own and a runaway build can be
stopped (wall-clock timeout, address-space cap).
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass

from .measure import JsonReport, Progress, check_positive, fmt, quiet
from .peers import CREATE_BLOCK_MASK_BYTES_PER_PAIR, flex_mask_mod
from ..errors import InputError, UnsupportedError
from ..dsl.pattern import Family, Pattern, causal
from ..dsl.primitives import block_local, document, global_tokens, prefix_lm, sliding_window, strided

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
class LayoutBenchResult(JsonReport):
    """The result of :func:`run_layout_bench`; ``str()`` is a readable table."""

    pattern: str
    seq_len: int
    block: int
    repeats: int
    entries: tuple[LayoutEntry, ...]
    notes: tuple[str, ...] = ()

    def __str__(self) -> str:
        lines = [f"bench-layout {self.pattern}", f"  block {self.block}, {self.repeats} builds per length "
                 "(first build and median), each builder in a fresh subprocess after a warm-up build at a tiny "
                 "length (lazy imports excluded)",
                 f"  {'builder':<8} {'L':>9} {'first s':>9} {'median s':>9} {'peak RSS MiB':>13} {'blocks':>10}"]
        for e in self.entries:
            if e.skipped:
                lines.append(f"  {e.name:<8} {e.seq_len:>9} skipped: {e.skipped}")
                continue
            rss = fmt(None if e.peak_rss_bytes is None else e.peak_rss_bytes / 2**20, ".1f")
            rss = (">=" if e.rss_lower_bound else "") + rss
            lines.append(f"  {e.name:<8} {e.seq_len:>9} {e.first_s:>9.3g} {e.median_s:>9.3g} {rss:>13} "
                         f"{fmt(e.blocks, 'd'):>10}")
        lines.append("  attnc = pattern.layout (analytic, no L x L evaluation); flex = create_block_mask(mask_mod)")
        lines.append("  peak RSS: the worker's ru_maxrss after the builds minus its RSS just before them")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def run_layout_bench(pattern: Pattern, seq_len: int, *, block: int = 64, repeats: int = 3,
                     builders: tuple[str, ...] = LAYOUT_CONTENDERS, timeout_s: float = 60.0,
                     mem_cap_bytes: int = 8 << 30, flex_max_len: int | None = None, scan_from: int | None = None,
                     progress: Progress = quiet) -> LayoutBenchResult:
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

    check_positive(seq_len=seq_len, block=block, repeats=repeats)
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

    cmd = [sys.executable, "-c", "from attncompiler.bench.layout import _layout_worker; _layout_worker()",
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
    from ..layout.block_layout import build_layout

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
        import torch  # and one element evaluation: torch imports sympy lazily on the first one

        pattern.evaluate(0, 0, torch.arange(2)[:, None], torch.arange(2)[None, :], seq_len, seq_len)
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


def scaling_patterns() -> dict[str, Pattern]:
    """The layout-scaling table: banded unions, causal compositions, intersections with
    complements and a strided pattern (built from DSL primitives, so they pickle)."""
    return {
        "sliding_window(256)": sliding_window(256),
        "sliding_window(256) | global_tokens([0,1,2,3])": sliding_window(256) | global_tokens([0, 1, 2, 3]),
        "sliding_window(256).causal()": sliding_window(256).causal(),
        "document([1000] * 1048 + [576]).causal()": document([1000] * 1048 + [576]).causal(),
        "block_local(4096).causal()": block_local(4096).causal(),
        "causal()": causal(),
        "strided(4096)": strided(4096),
        "prefix_lm(1000)": prefix_lm(1000),
        "sliding_window(256) & ~block_local(1000)": sliding_window(256) & ~block_local(1000),
        "(sliding_window(256) | global_tokens([0,1,2,3])).causal()":
            (sliding_window(256) | global_tokens([0, 1, 2, 3])).causal(),
    }


def run_layout_table(seq_len: int = 1 << 20, block: int = 64, repeats: int = 1, timeout_s: float = 120.0,
                     progress: Progress = quiet) -> str:
    """Build every pattern of :func:`scaling_patterns` in a fresh process; a Markdown table."""
    rows = ["| pattern | time (s) | peak RSS (MiB) | blocks |", "|---|---|---|---|"]
    for name, pat in scaling_patterns().items():
        progress(f"building {name} at L={seq_len}")
        res = run_layout_bench(pat, seq_len, block=block, repeats=repeats, builders=("attnc",), timeout_s=timeout_s)
        e, cell = res.entries[0], name.replace("|", "\\|")  # a table cell may not hold a bare pipe
        if e.skipped:
            rows.append(f"| `{cell}` | {e.skipped} | | |")
            continue
        rss = (">=" if e.rss_lower_bound else "") + f"{e.peak_rss_bytes / 2**20:.1f}"
        rows.append(f"| `{cell}` | {e.first_s:.3f} | {rss} | {e.blocks:,} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    """``python -c "from attncompiler.bench.layout import main; main()" [--seq-len N] [--block B]``:
    the layout-scaling table."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--seq-len", type=int, default=1 << 20)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=1)
    opts = ap.parse_args(argv)
    print(f"layout build at L={opts.seq_len}, block {opts.block}, one fresh process per pattern "
          "(time of the first build after a warm-up at a tiny length; peak RSS above the worker's baseline)")
    print(run_layout_table(opts.seq_len, opts.block, opts.repeats))


if __name__ == "__main__":
    main()
