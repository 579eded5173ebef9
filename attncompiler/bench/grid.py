"""The CPU benchmark grid: every pattern of issue 20 against SDPA and FlexAttention, forward and
forward + backward, at several thread counts, quiet and with one competing busy process.

One process, the same inputs for every contender, contenders alternating (the order rotates
every round), medians. Before any timing each contender's output (and, with backward, its dq)
is checked against a float64 oracle on sampled query rows (the full oracle would be L x L);
a contender that disagrees is reported as failed, never timed. The machine's fp32 matmul peak
is measured in the same process at each thread count, so "% peak" is useful FLOP/s (allowed
(q, k) pairs only, backward counted 2.5x forward) over what a large matmul reaches right then.
"""

from __future__ import annotations

import contextlib
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

from ..dsl.pattern import Pattern, causal
from ..dsl.primitives import dilated_window, document, full, sliding_window
from ..errors import InputError
from ..program.dense import dense_kind
from .measure import JsonReport, Progress, quiet
from .peers import allowed_pairs, setup_flex, setup_sdpa

GRID_CONTENDERS = ("attnc", "attnc_block", "sdpa", "flex")
FULL_LENGTHS, QUICK_LENGTHS = (4096, 16384), (384,)
BACKWARD_FACTOR = 2.5
CHECK_ROWS = 48


def grid_patterns(seq_len: int, quick: bool = False) -> dict[str, Pattern]:
    """The grid's patterns by name at ``seq_len`` (windows scaled down in quick mode)."""
    from ..patterns.sparse import bigbird

    w, cw, dil = (256, 1024, 128) if not quick else (32, 96, 16)
    n = seq_len
    docs = [n // 8, 3 * n // 8, n // 4]
    docs.append(n - sum(docs))
    return {
        "causal": causal(),
        f"sliding_window({w})": sliding_window(w),
        f"causal window({cw})": sliding_window(cw).causal(),
        "document, causal": document(docs).causal(),
        "bigbird": bigbird(block=64 if not quick else 16),
        f"dilated({dil}, 2)": dilated_window(dil, 2),
        "full": full(),
    }


@dataclass(frozen=True)
class GridRow:
    """One cell of the grid: a pattern, length, mode, thread count and load, all contenders."""

    pattern: str
    seq_len: int
    backward: bool
    threads: int
    loaded: bool
    peak_gflops: float
    useful_gflop: float
    medians_ms: dict
    checks: dict  # contender -> max relative error vs the oracle on sampled rows, or a reason string
    skipped: dict

    def ratio(self, peer: str, own: str = "attnc") -> float | None:
        """``peer``'s median over ``own``'s (> 1: ours is faster)."""
        a, b = self.medians_ms.get(own), self.medians_ms.get(peer)
        return None if a is None or b is None else b / a

    def peak_fraction(self, own: str = "attnc") -> float | None:
        """Useful GFLOP/s of ``own`` over the measured matmul peak."""
        t = self.medians_ms.get(own)
        return None if t is None else self.useful_gflop / (t / 1e3) / self.peak_gflops


@dataclass(frozen=True)
class GridResult(JsonReport):
    """All rows of :func:`run_grid`; ``str()`` is a Markdown table."""

    rows: tuple[GridRow, ...]
    batch: int
    heads: int
    head_dim: int
    repeats: int
    contenders: tuple[str, ...]

    def __str__(self) -> str:
        peers = [c for c in self.contenders if c != "attnc"]
        head = ["pattern", "L", "mode", "thr", "load", "attnc ms"] + [f"{p} ms" for p in peers] + \
               [f"x vs {p}" for p in peers] + ["% peak", "oracle"]
        lines = [f"B={self.batch} H={self.heads} D={self.head_dim} float32, {self.repeats} alternating rounds, "
                 "medians; x vs P = P's median / attnc's (> 1: attnc faster); % peak = useful GFLOP/s over "
                 "the fp32 matmul peak measured in this process at that thread count",
                 "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in self.rows:
            def ms(c):
                return f"{r.medians_ms[c]:.1f}" if c in r.medians_ms else "-"

            cells = [r.pattern, str(r.seq_len), "fwd+bwd" if r.backward else "fwd", str(r.threads),
                     "busy" if r.loaded else "quiet", ms("attnc")] + [ms(p) for p in peers]
            cells += ["-" if r.ratio(p) is None else f"{r.ratio(p):.2f}" for p in peers]
            frac = r.peak_fraction()
            cells.append("-" if frac is None else f"{100 * frac:.0f}%")
            bad = [c for c, e in r.checks.items() if not isinstance(e, float)]
            cells.append("ok" if not bad else "FAILED: " + ", ".join(bad))
            lines.append("| " + " | ".join(cells) + " |")
        skips = sorted({f"{c}: {why}" for r in self.rows for c, why in r.skipped.items()})
        lines += [f"- skipped {s}" for s in skips]
        return "\n".join(lines)


def matmul_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    """The fp32 matmul GFLOP/s this process reaches now (median of ``repeats`` ``n x n`` products)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        ts.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(ts) / 1e9


@contextlib.contextmanager
def busy_process(on: bool):
    """One competing process spinning on a core while the block runs (ended by its own pid)."""
    if not on:
        yield
        return
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.2)
        yield
    finally:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def num_threads(n: int):
    """``torch.set_num_threads(n)`` for the block, restored afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def oracle_rows(pattern: Pattern, q, k, v, dout, rows: torch.Tensor, scale: float):
    """Float64 ``(out, dq)`` of ``pattern`` at query ``rows`` (batch 0, every head; the grid's
    patterns are batch- and head-independent), from the rows' mask only."""
    L, Lk = q.shape[2], k.shape[2]
    mask = pattern.evaluate(0, 0, rows[:, None], torch.arange(Lk)[None, :], L, Lk)  # [r, Lk]
    qd, kd, vd = (t[0].detach().double() for t in (q, k, v))
    dod = dout[0].double()[:, rows]
    s = (qd[:, rows] @ kd.transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    out = p @ vd
    dp = dod @ vd.transpose(-1, -2)
    ds = p * (dp - (dod * out).sum(-1, keepdim=True))
    return out, scale * ds @ kd


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Max abs error over max abs value of the oracle."""
    return float((got.detach().double() - want).abs().max() / want.abs().max().clamp_min(1e-30))


def _contenders(pattern, q, k, v, wanted, progress):
    """``(calls, skipped, notes)`` for the wanted contenders on these inputs."""
    from ..runtime.module import CompiledAttention, compile_program

    calls: dict[str, Callable] = {}
    skipped: dict[str, str] = {}
    if "attnc" in wanted:
        attn = CompiledAttention(pattern, "torch")
        calls["attnc"] = lambda: attn(q, k, v)
    if "attnc_block" in wanted and dense_kind(pattern) is not None:
        plain = CompiledAttention(pattern, "torch")
        plain.program = compile_program(pattern, None, ())  # without the dense pass: the block path
        calls["attnc_block"] = lambda: plain(q, k, v)
    if "sdpa" in wanted:
        kind = dense_kind(pattern)
        if kind is not None:  # SDPA's fused path, no mask tensor
            sdpa = torch.nn.functional.scaled_dot_product_attention
            calls["sdpa"] = lambda: sdpa(q, k, v, is_causal=kind == "causal")
        else:
            setup_sdpa(pattern, q, k, v, 4 << 30, calls, skipped, progress)
    if "flex" in wanted:
        if q.requires_grad:
            skipped["flex"] = "FlexAttention has no backward on CPU"
        else:
            setup_flex(pattern, q, k, v, 128, "create", 4 << 30, calls, skipped, progress)
    return calls, skipped


def run_cell(name: str, pattern: Pattern, seq_len: int, *, backward: bool, threads: int, loaded: bool,
             peak: float, contenders=GRID_CONTENDERS, batch: int = 1, heads: int = 4, head_dim: int = 64,
             repeats: int = 5, seed: int = 0, progress: Progress = quiet) -> GridRow:
    """Check every contender once against the oracle, then time them alternating."""
    L, B, H, D = seq_len, batch, heads, head_dim
    gen = torch.Generator().manual_seed(seed)
    q, k, v, dout = (torch.randn(B, H, L, D, generator=gen) for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_(backward)
    calls, skipped = _contenders(pattern, q, k, v, contenders, progress)
    rows = torch.randperm(L, generator=gen)[:CHECK_ROWS].sort().values
    want_out, want_dq = oracle_rows(pattern, q, k, v, dout, rows, D ** -0.5)
    tol = 1e-3 if backward else 2e-4  # fp32 flash-style kernels vs a float64 oracle

    def step(fn):
        def run():
            out = fn()
            if backward:
                out.backward(dout)
            return out
        return run

    checks: dict[str, object] = {}
    steps = {}
    for c, fn in calls.items():
        progress(f"{name} L={L} {'fwd+bwd' if backward else 'fwd'} threads={threads}: checking {c}")
        try:
            with contextlib.nullcontext() if backward else torch.no_grad():
                out = step(fn)()
            err = rel_err(out[0][:, rows], want_out)
            if backward:
                err = max(err, rel_err(q.grad[0][:, rows], want_dq))
        except Exception as e:  # a peer failing must not hide the others' figures
            skipped[c] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
            continue
        finally:
            for t in (q, k, v):
                t.grad = None
        checks[c] = err if err <= tol else f"error {err:.2e} > {tol:.0e}"
        if err <= tol:
            steps[c] = step(fn)
    times: dict[str, list[float]] = {c: [] for c in steps}
    names = list(steps)
    with busy_process(loaded):
        for r in range(repeats):
            shift = r % max(len(names), 1)
            for c in names[shift:] + names[:shift]:
                with contextlib.nullcontext() if backward else torch.no_grad():
                    t0 = time.perf_counter()
                    steps[c]()
                    times[c].append(time.perf_counter() - t0)
                for t in (q, k, v):
                    t.grad = None
    pairs = allowed_pairs(pattern, L, L, batch=B, heads=H)
    flop = 4 * pairs * D * ((1 + BACKWARD_FACTOR) if backward else 1) / 1e9
    return GridRow(name, L, backward, threads, loaded, peak, flop,
                   {c: 1e3 * statistics.median(ts) for c, ts in times.items()}, checks, skipped)


def run_grid(*, lengths=None, quick: bool = False, modes=(False, True), threads=(1, 2), load=(False,),
             contenders=GRID_CONTENDERS, patterns: tuple[str, ...] | None = None, repeats: int = 5,
             batch: int = 1, heads: int = 4, head_dim: int = 64, progress: Progress = quiet) -> GridResult:
    """Run the grid (see the module docstring); ``patterns`` selects by name, with or without the
    parenthesised parameters or the text after a comma (``"sliding_window"`` selects
    ``"sliding_window(256)"``, ``"document"`` selects ``"document, causal"``)."""
    bad = [c for c in contenders if c not in GRID_CONTENDERS]
    if bad or not contenders or "attnc" not in contenders:
        raise InputError(f"contenders={tuple(contenders)!r}: include 'attnc', choose from {GRID_CONTENDERS}")
    lengths = tuple(lengths or (QUICK_LENGTHS if quick else FULL_LENGTHS))
    out = []
    for n in threads:
        with num_threads(n):
            for loaded in load:
                with busy_process(loaded):
                    peak = matmul_peak_gflops(1024 if quick else 2048)
                for L in lengths:
                    for name, pattern in grid_patterns(L, quick).items():
                        if patterns and not any(p in (name, name.split("(")[0], name.split(",")[0]) for p in patterns):
                            continue
                        for backward in modes:
                            out.append(run_cell(name, pattern, L, backward=backward, threads=n, loaded=loaded,
                                                peak=peak, contenders=contenders, batch=batch, heads=heads,
                                                head_dim=head_dim, repeats=repeats, progress=progress))
    return GridResult(tuple(out), batch, heads, head_dim, repeats, tuple(contenders))


def _int_list(text: str) -> tuple[int, ...]:
    """``"1,2"`` -> ``(1, 2)``; positive integers only."""
    try:
        vals = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        vals = ()
    if not vals or min(vals) < 1:
        raise InputError(f"{text!r} must be a comma-separated list of positive integers, e.g. '1,2'")
    return vals


def _per_thread_count(args, threads: tuple[int, ...], progress: Progress) -> GridResult:
    """The grid run once per thread count, each in a child process started at that count, so
    every contender is built under the count it is timed at (FlexAttention's compiled CPU kernel
    fixes its OpenMP team when it is compiled: compiled in a 1-thread process and then run at 2
    threads it ran 10-80x slower); the rows are concatenated in ``threads`` order."""
    import json
    import os
    import tempfile

    rows: list[GridRow] = []
    res = None
    for n in threads:
        fd, path = tempfile.mkstemp(suffix=".json")
        os.close(fd)
        try:
            cmd = [sys.executable, "-m", "attncompiler.bench.grid", "--threads", str(n), "--json-out", path,
                   "--mode", args.mode, "--contenders", args.contenders, "--repeats", str(args.repeats),
                   "--heads", str(args.heads), "--head-dim", str(args.head_dim)]
            cmd += ["--quick"] * args.quick + ["--load"] * args.load + ["--no-flex"] * args.no_flex
            cmd += ["--quiet"] * args.quiet
            cmd += ["--seq-len", args.seq_len] if args.seq_len else []
            cmd += ["--patterns", args.patterns] if args.patterns else []
            progress(f"threads={n}: child process {' '.join(cmd[1:4])} ...")
            done = subprocess.run(cmd, stdout=subprocess.DEVNULL)
            if done.returncode not in (0, 1):  # 1: a contender disagreed, reported in its rows
                raise RuntimeError(f"the grid at {n} thread(s) exited with status {done.returncode}")
            with open(path) as f:
                d = json.load(f)
        finally:
            os.unlink(path)
        rows += [GridRow(**r) for r in d["rows"]]
        res = d
    return GridResult(tuple(rows), res["batch"], res["heads"], res["head_dim"], res["repeats"],
                      tuple(res["contenders"]))


def main(argv=None) -> int:
    """Command line of the grid (``attnc bench --grid``, ``benchmarks/cpu_grid.py``): prints the
    Markdown table; exit status 1 when a contender disagreed with the oracle. Several thread counts
    run in one child process each (see :func:`_per_thread_count`)."""
    import argparse

    ap = argparse.ArgumentParser(prog="attnc bench --grid", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=f"small lengths {QUICK_LENGTHS}, small windows (a smoke run)")
    ap.add_argument("--seq-len", default=None, help=f"comma-separated lengths (default {FULL_LENGTHS})")
    ap.add_argument("--threads", default="1,2", help="comma-separated torch thread counts (default 1,2)")
    ap.add_argument("--load", action="store_true", help="also run every cell with one competing busy process")
    ap.add_argument("--mode", choices=("fwd", "fwd+bwd", "both"), default="both")
    ap.add_argument("--patterns", default=None, help="comma-separated pattern names, parameters optional (default: all)")
    ap.add_argument("--contenders", default=",".join(GRID_CONTENDERS), help=f"subset of {GRID_CONTENDERS}")
    ap.add_argument("--no-flex", action="store_true", help="skip FlexAttention (torch.compile takes minutes on CPU)")
    ap.add_argument("--repeats", type=int, default=5, help="alternating timed rounds (default 5)")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--out", default=None, help="also write the table to this file")
    ap.add_argument("--json-out", default=None, help="also write the rows as JSON to this file")
    ap.add_argument("--in-process", action="store_true",
                    help="run every thread count in this process (default: one child process per count)")
    ap.add_argument("--quiet", action="store_true", help="no progress messages on stderr")
    args = ap.parse_args(argv)
    contenders = tuple(c for c in args.contenders.split(",") if c and not (args.no_flex and c == "flex"))
    modes = {"fwd": (False,), "fwd+bwd": (True,), "both": (False, True)}[args.mode]
    progress = quiet if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    threads = _int_list(args.threads)
    lengths = _int_list(args.seq_len) if args.seq_len else None
    if len(threads) > 1 and not args.in_process:
        res = _per_thread_count(args, threads, progress)
    else:
        res = run_grid(lengths=lengths, quick=args.quick, modes=modes, threads=threads,
                       load=(False, True) if args.load else (False,), contenders=contenders,
                       patterns=tuple(args.patterns.split(",")) if args.patterns else None,
                       repeats=args.repeats, heads=args.heads, head_dim=args.head_dim, progress=progress)
    if args.json_out:
        with open(args.json_out, "w") as f:
            f.write(res.to_json())
    text = str(res)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 1 if "FAILED" in text else 0


if __name__ == "__main__":
    sys.exit(main())
