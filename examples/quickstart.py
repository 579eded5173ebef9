"""Quickstart: declare a pattern, look at its layout, analyze it, compile it, run it on CPU, check it.

    python examples/quickstart.py [--seq-len 1024] [--heads 4] [--head-dim 64]

Runs in a few seconds on a laptop CPU.
"""

from __future__ import annotations

import argparse
import time

import torch

import attncompiler as ac
from attncompiler import patterns
from attncompiler.layout.picture import render_text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    args = ap.parse_args(argv)
    L, H, D = args.seq_len, args.heads, args.head_dim

    # 1. Declare: a local window plus four global tokens, made causal; and a catalogue entry.
    local = (ac.sliding_window(128) | ac.global_tokens([0, 1, 2, 3])).causal()
    bigbird = patterns.bigbird(block=64, window_blocks=3, global_blocks=2, random_blocks=3, seed=0)

    for name, pattern in (("local + global, causal", local), ("BigBird", bigbird)):
        print(f"== {name}: {pattern!r}")

        # 2. Look at it: the block layout the compiler derived analytically, and a picture.
        layout = pattern.layout(L, L, 64)
        print(f"layout: {layout.num_q_blocks} x {layout.num_kv_blocks} blocks of 64, "
              f"{layout.num_full} full + {layout.num_partial} partial computed "
              f"(block density {layout.block_density:.3f}); exact density {layout.density():.4f}")
        print(render_text(pattern, L, width=32))

        # 3. Analyze: how well does it connect tokens, and what does it cost?
        rep = ac.analyze(pattern, seq_len=L)
        print(f"analysis: density {rep.density:.4f}, every legal key reaches every query after "
              f"{rep.hops_to_full} layer(s), spectral gap {rep.spectral_gap:.4f}")

        # 4. Compile and run on random inputs (CPU: the torch backend).
        attn = ac.compile(pattern, backend="auto")
        q, k, v = (torch.randn(1, H, L, D) for _ in range(3))  # [B, H, L, D]
        t0 = time.perf_counter()
        out = attn(q, k, v)  # [B, H, L, D]
        elapsed = time.perf_counter() - t0

        # 5. Verify against the float64 dense reference.
        ref = attn.reference(q, k, v)  # [B, H, L, D] float64
        err = (out.double() - ref).abs().max().item()
        status = "ok" if err < 1e-4 else "MISMATCH"
        print(f"run: out {list(out.shape)} {out.dtype} in {elapsed * 1e3:.1f} ms; "
              f"max |out - reference| = {err:.2e} ({status})\n")
        if status != "ok":
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
