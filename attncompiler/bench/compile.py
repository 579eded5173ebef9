"""``torch.compile(fullgraph=True)`` of a small model with compiled attention, against eager.

A 2-layer pre-norm model (QKV projection, attention of the given pattern, output projection)
runs eagerly and compiled with the default inductor backend and ``fullgraph=True``, alternating
call by call; prints the largest output difference, medians and the ratio, for inference and
forward+backward (issue 17's target: no slower than eager). Run:
``python -m attncompiler.bench.compile``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ..dsl.primitives import sliding_window
from ..runtime.compile import compile as compile_pattern


class TwoLayer(torch.nn.Module):
    """Two attention blocks ``x + proj(attn(qkv(norm(x))))`` sharing one compiled pattern."""

    def __init__(self, pattern, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.attn = compile_pattern(pattern, "torch")
        self.norms = torch.nn.ModuleList(torch.nn.LayerNorm(width) for _ in range(2))
        self.qkv = torch.nn.ModuleList(torch.nn.Linear(width, 3 * width) for _ in range(2))
        self.proj = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(2))

    def forward(self, x):
        B, L, E = x.shape
        for norm, qkv, proj in zip(self.norms, self.qkv, self.proj):
            q, k, v = qkv(norm(x)).view(B, L, 3, self.heads, E // self.heads).permute(2, 0, 3, 1, 4)
            x = x + proj(self.attn(q, k, v).transpose(1, 2).reshape(B, L, E))
        return x


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = TwoLayer(sliding_window(args.window), args.width, args.heads)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(1, args.seq_len, args.width, requires_grad=True)
    with torch.no_grad():
        diff = (compiled(x) - model(x)).abs().max().item()
    for mode in ("inference", "fwd+bwd"):
        times = {"eager": [], "compiled": []}
        for _ in range(args.repeats + 1):  # the first round warms up (and compiles the backward)
            for name, m in (("eager", model), ("compiled", compiled)):
                t0 = time.perf_counter()
                if mode == "inference":
                    with torch.no_grad():
                        m(x)
                else:
                    m(x).sum().backward()
                times[name].append(time.perf_counter() - t0)
        e, c = (statistics.median(times[n][1:]) for n in ("eager", "compiled"))
        print(f"{mode}: eager {e * 1e3:.1f} ms, compiled {c * 1e3:.1f} ms (compiled/eager {c / e:.3f})")
    print(f"max |compiled - eager| output difference: {diff:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
