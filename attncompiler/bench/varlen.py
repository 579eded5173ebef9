"""Runtime-varlen layout benchmark: the layout of a call with new ``cu_seqlens``, and a repeat.

A pattern ``ac.document() & ac.sliding_window(window)`` takes its documents per call; each new
``cu_seqlens`` builds an analytic layout (time proportional to its visible blocks), and a call
with the same documents finds it in the cache (keyed by content). Documents are cut at random
points (fixed seeds). Run: ``python -m attncompiler.bench.varlen`` (``--help`` lists the options).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ..dsl.primitives import document, sliding_window
from ..program.inputs import check_qkv
from ..program.positions import batch_groups, group_layout


def random_cu_seqlens(seq_len: int, docs: int, seed: int) -> torch.Tensor:
    """``[docs + 1]`` int32 boundaries: 0, ``docs - 1`` distinct random cuts, ``seq_len``."""
    g = torch.Generator().manual_seed(seed)
    cuts = torch.sort(torch.randperm(seq_len - 1, generator=g)[:docs - 1] + 1).values
    return torch.cat([torch.tensor([0]), cuts, torch.tensor([seq_len])]).to(torch.int32)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=131072)
    ap.add_argument("--docs", type=int, default=64)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    L, blk = args.seq_len, args.block
    pattern = document() & sliding_window(args.window)
    dims = check_qkv(*(torch.zeros(1, 1, L, 8),) * 3)

    def layout(cu):
        grp = batch_groups(pattern, dims, cu_seqlens=cu)[0]
        return group_layout(pattern, L, L, blk, blk, batch=1, heads=1, positions=grp.positions)

    layout(random_cu_seqlens(L, args.docs, 10_000))  # warm-up: one-time imports
    new, cached = [], []
    for seed in range(args.repeats):
        cu = random_cu_seqlens(L, args.docs, seed)
        t0 = time.perf_counter()
        lay = layout(cu)
        new.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        again = layout(cu.clone())  # same content, another tensor
        cached.append(time.perf_counter() - t0)
        assert again is lay, "a repeated cu_seqlens must hit the layout cache"
    print(f"{pattern!r}, L={L}, {args.docs} documents, block {blk}: new cu_seqlens "
          f"{statistics.median(new) * 1e3:.1f} ms (median of {args.repeats}), cached "
          f"{statistics.median(cached) * 1e3:.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
