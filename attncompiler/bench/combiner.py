"""Combiner vs the sparse pattern it factorizes vs dense attention, on the torch backend.

For each length: Combiner-Fixed (span ~ sqrt(L), causal) against Sparse Transformer's fixed
pattern (merged head: own block + the last ``summary`` positions of every block, causal, the
same stride) and against dense causal attention (our torch backend and PyTorch SDPA with
``is_causal``). Optionally (``--all``) also Combiner-Logsparse vs LogSparse and
Combiner-Axial vs axial. ``--shared-slots`` adds, for each Combiner contender, the same
program with one shared slot per summary (``name/shared``: the joint layout before packed
summary slots, see :mod:`attncompiler.families.combiner.joint`), for a before/after comparison in one
process. Contenders alternate on the same inputs after one warm-up call; reported: median
(and min-max) forward and forward+backward time, the ratio to the sparse pattern, peak tensor
memory of one forward (:func:`attncompiler.bench.measure.peak_memory`), and whether every query reaches
every key in one layer.

Usage (from the repository root)::

    python benchmarks/combiner_bench.py --lengths 4096 16384 --heads 4 --reps 5
    python benchmarks/combiner_bench.py --lengths 4096 16384 --all --shared-slots --no-dense --threads 1

(or ``python -m attncompiler.bench.combiner ...``).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import time

import torch

from ..dsl.pattern import causal
from ..families.combiner.joint import JointMask
from ..families.combiner.pattern import Combiner, combiner_axial, combiner_fixed, combiner_logsparse
from ..families.combiner.program import ConcatSummaries
from ..patterns.sparse import axial, logsparse, sparse_transformer_fixed
from ..program.stages import BlockSparseAttention
from ..runtime.compile import compile as compile_pattern
from .measure import peak_memory


def _contenders(L: int, everything: bool, dense: bool = True):
    span = 1 << round(math.log2(math.sqrt(L)))
    yield "combiner_fixed", combiner_fixed(span, causal=True), "fixed"
    yield "sparse_fixed(merged)", sparse_transformer_fixed(stride=span, summary=8, merged=True), "fixed"
    if dense:
        yield "dense_causal", causal(), None
    if everything:
        yield "combiner_logsparse", combiner_logsparse(causal=True), "logsparse"
        yield "logsparse", logsparse(), "logsparse"
        yield "combiner_axial", combiner_axial(span, causal=True), "axial"
        yield "axial", axial(span, causal=True), "axial"


def with_shared_slots(attn: torch.nn.Module) -> torch.nn.Module:
    """``attn`` (a compiled Combiner) switched to one shared slot per summary, in id order."""
    stages = []
    for st in attn.program.stages:
        if isinstance(st, BlockSparseAttention) and isinstance(st.pattern, JointMask):
            st = dataclasses.replace(st, pattern=dataclasses.replace(st.pattern, pack=None))
        elif isinstance(st, ConcatSummaries):
            st = dataclasses.replace(st, joint=None)
        stages.append(st)
    attn.program = dataclasses.replace(attn.program, stages=tuple(stages))
    return attn


def _one_layer_full(pattern, L: int) -> str:
    if isinstance(pattern, Combiner):
        return "yes (by construction; checked by tests at small L)"
    return "no" if pattern != causal() else "yes"


def run(lengths, heads: int, head_dim: int, reps: int, everything: bool, backward: bool,
        dense: bool = True, shared_slots: bool = False, only: tuple[str, ...] = ()) -> list[dict]:
    """Time (forward, optionally forward + backward) and measure the peak memory of each contender at
    each length in ``lengths``; one result dict per (L, contender), times in ms, memory in MB."""
    rows = []
    for L in lengths:
        q, k, v = (torch.randn(1, heads, L, head_dim) for _ in range(3))
        fns = {}
        for name, p, fam in _contenders(L, everything, dense):
            if only and name not in only:
                continue
            attn = compile_pattern(p, backend="torch")
            fns[name] = (attn, fam, p)
            if shared_slots and isinstance(p, Combiner):
                fns[f"{name}/shared"] = (with_shared_slots(compile_pattern(p, backend="torch")), fam, p)
        if dense:
            fns["sdpa_causal"] = (lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=True), None, None)
        times = {n: [] for n in fns}
        btimes = {n: [] for n in fns}
        for n, (f, _, _) in fns.items():  # warm-up: layouts, plans, span tables
            f(q, k, v)
        for r in range(reps):
            order = list(fns)[r % len(fns):] + list(fns)[:r % len(fns)]
            for n in order:
                f = fns[n][0]
                t0 = time.perf_counter()
                with torch.no_grad():
                    f(q, k, v)
                times[n].append(time.perf_counter() - t0)
                if backward:
                    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
                    t0 = time.perf_counter()
                    f(qg, kg, vg).sum().backward()
                    btimes[n].append(time.perf_counter() - t0)
        med = {n: statistics.median(t) for n, t in times.items()}
        for n, (f, fam, p) in fns.items():
            peer = {"fixed": "sparse_fixed(merged)", "logsparse": "logsparse", "axial": "axial"}.get(fam)
            peer = peer if peer in med else None
            with torch.no_grad():
                mem = peak_memory(lambda: f(q, k, v), q.device)
            row = dict(L=L, name=n, fwd_ms=1e3 * med[n], mem_mb=mem / 2 ** 20,
                       fwd_range_ms=(1e3 * min(times[n]), 1e3 * max(times[n])),
                       fwdbwd_ms=1e3 * statistics.median(btimes[n]) if backward else None,
                       fwdbwd_range_ms=(1e3 * min(btimes[n]), 1e3 * max(btimes[n])) if backward else None,
                       vs_sparse=(med[n] / med[peer]) if peer and peer != n else None,
                       one_layer_full=_one_layer_full(p, L) if p is not None else "yes")
            rows.append(row)
    return rows


def main(argv=None) -> None:
    """Command-line entry: run the Combiner benchmark and print its table of medians."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--all", action="store_true", help="also logsparse and axial")
    ap.add_argument("--no-backward", action="store_true")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense contenders (long lengths)")
    ap.add_argument("--shared-slots", action="store_true",
                    help="also run each Combiner with shared summary slots (the layout before packing)")
    ap.add_argument("--only", nargs="+", default=(), metavar="NAME",
                    help="run only these contenders (e.g. combiner_logsparse logsparse; with --all for those)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, heads {a.heads}, head_dim {a.head_dim}, "
          f"reps {a.reps} (medians)")
    print(f"{'L':>6} {'contender':<29} {'fwd ms':>9} {'fwd min-max':>15} {'fwd+bwd ms':>11} {'f+b min-max':>15} "
          f"{'x sparse':>9} {'peak MB':>8}  one-layer full")
    for r in run(a.lengths, a.heads, a.head_dim, a.reps, a.all, not a.no_backward, not a.no_dense, a.shared_slots,
                 tuple(a.only)):
        fb = f"{r['fwdbwd_ms']:.1f}" if r["fwdbwd_ms"] is not None else "-"
        vs = f"{r['vs_sparse']:.2f}" if r["vs_sparse"] is not None else "-"
        rng = "{:.0f}-{:.0f}".format(*r["fwd_range_ms"])
        brng = "{:.0f}-{:.0f}".format(*r["fwdbwd_range_ms"]) if r["fwdbwd_range_ms"] else "-"
        print(f"{r['L']:>6} {r['name']:<29} {r['fwd_ms']:>9.1f} {rng:>15} {fb:>11} {brng:>15} {vs:>9} "
              f"{r['mem_mb']:>8.1f}  {r['one_layer_full']}")


if __name__ == "__main__":
    main()
