"""Diffusion attention vs a plain torch.sparse CSR implementation of the same equations.

The peer is what the paper's graph-library code (DGL ``u_dot_v`` + ``edge_softmax`` +
``update_all`` x K) amounts to in PyTorch: one block-diagonal CSR pattern for all
(batch, head) pairs, scores by ``torch.sparse.sampled_addmm`` (SDDMM), an edge softmax by
segment reductions, then K ``torch.sparse.mm`` hops with the PPR update. Both contenders run
on the same inputs, one thread each, forward (no grad) and forward+backward.

Times: both contenders are built in one process on the same inputs, warmed, then alternated
run by run; medians of wall-clock and of thread CPU time are reported, with the spread of the
per-round ratios (ratios measured side by side are the figures on a shared machine). Peak memory: each contender runs in a fresh subprocess (``MALLOC_MMAP_THRESHOLD_`` set
so freed tensors leave the resident set) that warms up, resets the resident-set high-water
mark (``/proc/self/clear_refs``) and reports the peak above the pre-run level of one run.

Usage (from the repository root)::

    python benchmarks/diffusion_bench.py --lengths 4096 16384 --heads 2 --reps 5

(or ``python -m attncompiler.bench.diffusion ...``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
import warnings

import numpy as np
import torch

from ..layout.block_layout import partial_masks
from ..patterns.diffuser import diffuser
from ..program.schedule import Schedule
from ..runtime.compile import compile as compile_pattern

MODULE = "attncompiler.bench.diffusion"
"""This module's name: the memory children run ``python -m MODULE --child ...``."""

warnings.filterwarnings("ignore", message=".*[Ss]parse.*")


# ---------------------------------------------------------------------------------------------
# The peer: torch.sparse CSR
# ---------------------------------------------------------------------------------------------

def edge_list(base, L: int) -> tuple[np.ndarray, np.ndarray]:
    """Allowed (query, key) pairs of a mask pattern, row-major (from its block layout)."""
    blocks = base.layout(L, L, 128, 128).groups[0]
    g = blocks.geom
    rows, cols = [], []
    for i in range(0, blocks.num_blocks, 256):
        which = np.arange(i, min(i + 256, blocks.num_blocks))
        m = partial_masks(blocks, which).numpy()  # [n, 128, 128] (full blocks evaluate to all True)
        n, r, c = np.nonzero(m)
        rows.append(g.q_lo(blocks.rows[which][n]) + r)
        cols.append(g.k_lo(blocks.cols[which][n]) + c)
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    order = np.lexsort((cols, rows))
    return rows[order], cols[order]


class CSRDiffusion:
    """PPR diffusion with torch.sparse CSR tensors (block-diagonal over batch * heads)."""

    def __init__(self, base, L: int, BH: int, hops: int, alpha: float):
        r, c = edge_list(base, L)
        E = len(r)
        off = np.repeat(np.arange(BH) * L, E)
        self.row = torch.from_numpy(np.tile(r, BH) + off)
        self.col = torch.from_numpy(np.tile(c, BH) + off)
        self.lengths = torch.from_numpy(np.tile(np.bincount(r, minlength=L), BH))
        self.crow = torch.cat([torch.zeros(1, dtype=torch.long), self.lengths.cumsum(0)])
        N = BH * L
        self.N, self.hops, self.alpha = N, hops, alpha
        self.pattern = torch.sparse_csr_tensor(self.crow, self.col, torch.zeros(len(self.col)), (N, N))

    def __call__(self, q, k, v, scale):
        B, H, L, D = q.shape
        qf, kf, vf = q.reshape(-1, D), k.reshape(-1, D), v.reshape(-1, v.shape[-1])
        s = torch.sparse.sampled_addmm(self.pattern, qf, kf.t(), beta=0.0, alpha=scale).values()  # [BH*E]
        m = torch.segment_reduce(s.detach(), "max", lengths=self.lengths)  # [N]
        e = torch.exp(s - m[self.row])
        den = torch.segment_reduce(e, "sum", lengths=self.lengths)
        p = e / den[self.row]
        P = torch.sparse_csr_tensor(self.crow, self.col, p, (self.N, self.N))
        z = vf
        for _ in range(self.hops):
            z = (1 - self.alpha) * torch.sparse.mm(P, z) + self.alpha * vf
        return z.view(B, H, L, -1)


# ---------------------------------------------------------------------------------------------
# One measurement (child process)
# ---------------------------------------------------------------------------------------------

def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _contender(impl: str, L: int, B: int, H: int, D: int, hops: int, mode: str, block: int):
    """``once()`` running one contender on fresh inputs (forward, or forward+backward)."""
    pattern = diffuser(hops=hops)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, generator=gen) for _ in range(3))
    grad = mode == "fwd+bwd"
    if grad:
        for t in (q, k, v):
            t.requires_grad_(True)
    scale = D ** -0.5
    if impl == "ours":
        attn = compile_pattern(pattern, backend="torch", schedule=Schedule(block_m=block, block_n=block),
                          check_finite=False)
        fn = lambda: attn(q, k, v, scale)  # noqa: E731
    else:
        csr = CSRDiffusion(pattern.base, L, B * H, hops, pattern.alpha)
        fn = lambda: csr(q, k, v, scale)  # noqa: E731

    def once():
        if grad:
            out = fn()
            out.backward(torch.ones_like(out))
            for t in (q, k, v):
                t.grad = None
        else:
            with torch.no_grad():
                fn()

    return once


def measure_memory(impl: str, L: int, B: int, H: int, D: int, hops: int, mode: str, block: int) -> dict:
    """Peak resident MiB of one run above the pre-run level (call in a fresh process)."""
    torch.set_num_threads(1)
    once = _contender(impl, L, B, H, D, hops, mode, block)
    once()  # warm: layouts, plans, mask caches
    gc.collect()
    before = _rss_kib("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM
    except OSError:
        return {"impl": impl, "peak_mib": float("nan")}
    once()
    return {"impl": impl, "peak_mib": (_rss_kib("VmHWM") - before) / 1024}


def time_both(L: int, B: int, H: int, D: int, hops: int, mode: str, block: int, reps: int) -> dict:
    """Per contender: wall-clock and thread CPU seconds of each run, built in this process and
    alternated run by run. CPU time (``time.thread_time``; torch runs one thread here) does not
    count the time other processes hold the core, so it is the steadier figure on a shared
    machine; cache contention still shows in both."""
    torch.set_num_threads(1)
    runs = {impl: _contender(impl, L, B, H, D, hops, mode, block) for impl in ("ours", "csr")}
    times: dict[str, dict[str, list[float]]] = {impl: {"wall": [], "cpu": []} for impl in runs}
    for once in runs.values():
        once()  # warm
    for _ in range(reps):
        for impl, once in runs.items():
            t0, c0 = time.perf_counter(), time.thread_time()
            once()
            times[impl]["cpu"].append(time.thread_time() - c0)
            times[impl]["wall"].append(time.perf_counter() - t0)
    return times


def run_child(*args) -> dict:
    """Run one memory measurement (``--child`` plus ``args``) in a fresh single-thread subprocess, so
    peak resident memory is its own, and return its JSON result."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", MODULE, "--child", *map(str, args)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    """Print the comparison table; ``--child IMPL L B H D HOPS MODE BLOCK`` (the memory children)
    prints one :func:`measure_memory` result as JSON instead."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--child"]:
        impl, L, B, H, D, hops, mode, block = argv[1:9]
        print(json.dumps(measure_memory(impl, int(L), int(B), int(H), int(D), int(hops), mode, int(block))))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--hops", type=int, default=5)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--block", type=int, default=32, help="layout block size of our torch backend")
    ap.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"])
    args = ap.parse_args(argv)
    print(f"diffuser(hops={args.hops}) B={args.batch} H={args.heads} D={args.head_dim}, 1 thread, "
          f"block={args.block}, median of {args.reps} alternated runs (wall and thread CPU time; "
          "speedup range: min-max of the per-round ratios); peak RSS in fresh processes")
    print(f"{'L':>6} {'mode':>8} | {'clock':>5} {'ours s':>8} {'csr s':>8} {'speedup':>7} {'range':>11} | "
          f"{'ours MiB':>8} {'csr MiB':>8} {'ratio':>6}")
    for L in args.lengths:
        for mode in args.modes:
            t = time_both(L, args.batch, args.heads, args.head_dim, args.hops, mode, args.block, args.reps)
            m = {impl: run_child(impl, L, args.batch, args.heads, args.head_dim, args.hops, mode, args.block)["peak_mib"]
                 for impl in ("ours", "csr")}
            for clock in ("wall", "cpu"):
                ours, csr = t["ours"][clock], t["csr"][clock]
                ratios = [c / o for o, c in zip(ours, csr)]
                mo, mc = statistics.median(ours), statistics.median(csr)
                mem = f"{m['ours']:8.1f} {m['csr']:8.1f} {m['ours'] / m['csr']:6.2f}" if clock == "wall" else ""
                print(f"{L:>6} {mode:>8} | {clock:>5} {mo:8.3f} {mc:8.3f} {mc / mo:6.2f}x "
                      f"{min(ratios):5.2f}-{max(ratios):<5.2f} | {mem}", flush=True)


if __name__ == "__main__":
    main()
