"""Decode-step benchmark: one query row against a long KV cache, with call-time positions.

Compares, in one process and alternating call by call (medians of ``--repeats`` calls, at 1 and
2 threads by default):

* ``ac``: ``ac.compile(pattern, backend="torch")`` called with ``align="bottom_right"``;
* ``sdpa_sliced``: SDPA on exactly the visible keys, sliced by hand (the floor to beat);
* ``sdpa_masked``: SDPA over the whole cache with a dense boolean mask.

The pattern is ``ac.sliding_window(window).causal()`` (``--pattern window``): the last query sees
keys ``[Lk - window, Lk)`` (read from the pattern itself). ``--pattern window_global`` adds
``ac.global_tokens(range(64))`` (visible keys in two ranges, outside the fused single-range path);
``sdpa_sliced`` then runs on the visible keys gathered once, outside the timing.
Run: ``python -m attncompiler.bench.decode`` (``--help`` lists the options).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from ..dsl.primitives import global_tokens, sliding_window
from ..runtime.module import CompiledAttention


def _time(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


PATTERNS = {"window": lambda w: sliding_window(w).causal(),
            "window_global": lambda w: (sliding_window(w) | global_tokens(range(64))).causal()}


def visible_keys(pattern, lk: int) -> torch.Tensor:
    """Indices of the keys the last query row (at position ``lk - 1``) sees."""
    m = pattern.evaluate(0, 0, torch.tensor([[lk - 1]]), torch.arange(lk)[None, :], lk, lk).reshape(-1)
    return torch.nonzero(m).reshape(-1)


def visible_range(pattern, lq: int, lk: int) -> tuple[int, int]:
    """``[k0, k1)`` keys the last query row (at position ``lk - 1``) sees, from the pattern itself."""
    q = torch.tensor([[lk - 1]])
    k = torch.arange(lk)[None, :]
    m = pattern.evaluate(0, 0, q, k, lk, lk).reshape(-1)
    idx = torch.nonzero(m).reshape(-1)
    k0, k1 = int(idx[0]), int(idx[-1]) + 1
    if int(m[k0:k1].sum()) != k1 - k0:
        raise ValueError("the visible keys are not one contiguous range")
    return k0, k1


def run(lk: int, heads: int, kv_heads: int, dim: int, window: int, repeats: int, threads: list[int],
        masked: bool, pattern_name: str = "window") -> list[dict]:
    """Median seconds per call of each peer at each thread count."""
    torch.manual_seed(0)
    pattern = PATTERNS[pattern_name](window)
    q = torch.randn(1, heads, 1, dim)
    k = torch.randn(1, kv_heads, lk, dim)
    v = torch.randn(1, kv_heads, lk, dim)
    mod = CompiledAttention(pattern, backend="torch")
    idx = visible_keys(pattern, lk)
    G = heads // kv_heads
    sdpa = torch.nn.functional.scaled_dot_product_attention
    if int(idx[-1]) - int(idx[0]) + 1 == len(idx):  # one range: a view, as a hand-written decode would
        ks, vs = k[:, :, int(idx[0]):int(idx[-1]) + 1], v[:, :, int(idx[0]):int(idx[-1]) + 1]
    else:
        ks, vs = k[:, :, idx].contiguous(), v[:, :, idx].contiguous()
    calls = {
        "ac": lambda: mod(q, k, v, align="bottom_right"),
        "sdpa_sliced": lambda: sdpa(q, ks, vs, enable_gqa=G > 1),
    }
    if masked:
        mask = torch.zeros(1, lk, dtype=torch.bool)
        mask[0, idx] = True
        calls["sdpa_masked"] = lambda: sdpa(q, k, v, attn_mask=mask, enable_gqa=G > 1)
    err = (calls["ac"]() - calls["sdpa_sliced"]()).abs().max().item()
    rows = []
    old = torch.get_num_threads()
    try:
        for t in threads:
            torch.set_num_threads(t)
            for fn in calls.values():  # warm up
                fn()
            times: dict[str, list[float]] = {n: [] for n in calls}
            for _ in range(repeats):
                for name, fn in calls.items():
                    times[name].append(_time(fn))
            med = {n: statistics.median(ts) for n, ts in times.items()}
            rows.append({"threads": t, **{f"{n}_ms": 1e3 * s for n, s in med.items()},
                         "ac_over_sliced": med["ac"] / med["sdpa_sliced"],
                         "masked_over_ac": med["sdpa_masked"] / med["ac"] if masked else None,
                         "max_abs_diff": err})
    finally:
        torch.set_num_threads(old)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    """Parse ``argv``, run, print one line per thread count; returns the rows."""
    p = argparse.ArgumentParser(prog="python -m attncompiler.bench.decode", description=__doc__.splitlines()[0])
    p.add_argument("--lk", type=int, default=131072, help="key (cache) length")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--window", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=9, help="calls per peer (median); at least 7")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--pattern", choices=sorted(PATTERNS), default="window")
    p.add_argument("--no-masked", action="store_true", help="skip SDPA over the whole cache with a mask")
    a = p.parse_args(argv)
    if a.repeats < 7:
        p.error(f"--repeats must be >= 7, got {a.repeats}")
    rows = run(a.lk, a.heads, a.kv_heads, a.dim, a.window, a.repeats, a.threads, not a.no_masked, a.pattern)
    for r in rows:
        masked = f"  sdpa_masked {r['sdpa_masked_ms']:8.2f} ms ({r['masked_over_ac']:.1f}x ac)" \
            if r["masked_over_ac"] is not None else ""
        print(f"threads {r['threads']}: ac {r['ac_ms']:7.2f} ms  sdpa_sliced {r['sdpa_sliced_ms']:7.2f} ms  "
              f"ratio {r['ac_over_sliced']:.2f}{masked}  max|diff| {r['max_abs_diff']:.1e}")
    return rows


if __name__ == "__main__":
    main()
