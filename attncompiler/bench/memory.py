"""Benchmarks of ABC bounded-memory attention (issue 7 targets), on CPU in fp32.

1. Forward speed: causal ABC-MLP (torch backend) vs causal ``scaled_dot_product_attention``,
   alternated on the same inputs, medians and their ratio.
2. Forward + backward peak memory: ABC-MLP vs a cumulative-sum implementation that
   materializes the per-token memory ``[T, n, D]``; each run in a fresh subprocess, peak
   resident memory above the process's baseline (Linux ``VmHWM``).
3. Decoding: ``attn.step`` for many tokens (constant state) vs SDPA over a growing KV cache.

4. GPU (``--device cuda``): the Triton chunked path (write scan, read and their backward
   kernels) against causal SDPA and the cumulative-sum peer, forward and forward + backward
   times (alternated, medians) and peak CUDA memory of forward + backward.

Run: ``python benchmarks/memory_bench.py`` (targets: L=16384, H=4, D=64, n=64, 4096 steps) or
``python benchmarks/memory_bench.py --small`` for a quick check; on a GPU,
``python benchmarks/memory_bench.py --device cuda`` (section 4 only). Absolute times on a shared
machine are noise; the ratios measured side by side are the figures (the load is printed).
``python -m attncompiler.bench.memory`` runs the same.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from ..families.memory.pattern import MLPControl, memory
from ..runtime.compile import compile as compile_pattern

MODULE = "attncompiler.bench.memory"
"""This module's name: the peak-memory children run ``python -m MODULE --peak-child ...``."""


def _inputs(L: int, H: int, D: int, seed: int = 0, device: str = "cpu"):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, H, L, D, generator=g).to(device) for _ in range(3))


def _timed(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def forward_speed(L: int, H: int = 4, D: int = 64, n: int = 64, reps: int = 3, device: str = "cpu",
                  backend: str = "torch") -> dict:
    """Median forward seconds of causal ABC-MLP and causal SDPA, alternated (fp32)."""
    q, k, v = _inputs(L, H, D, device=device)
    attn = compile_pattern(memory(n, MLPControl(), causal=True), backend=backend, check_finite=False)
    ours, peer = [], []
    with torch.no_grad():
        attn(q, k, v)  # materializes W, compiles kernels, warms caches
        F.scaled_dot_product_attention(q, k, v, is_causal=True)
        for _ in range(reps):
            ours.append(_timed(lambda: attn(q, k, v), device))
            peer.append(_timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), device))
    a, b = statistics.median(ours), statistics.median(peer)
    return {"L": L, "device": device, "backend": backend, "abc_mlp_s": a, "sdpa_causal_s": b, "speedup": b / a}


def cumsum_abc(q, k, v, W, scale):
    """Causal ABC-MLP the obvious way: the per-token memory ``[T, n, D]`` by cumulative sums."""
    s = k @ W  # [B, H, T, n]
    phi = torch.exp(s - s.amax(2, keepdim=True))  # stable here: test logits are small
    z = phi.cumsum(2)  # [B, H, T, n]
    kt = (phi[..., None] * k[:, :, :, None, :]).cumsum(2) / z[..., None]  # [B, H, T, n, D]
    vt = (phi[..., None] * v[:, :, :, None, :]).cumsum(2) / z[..., None]
    p = torch.softmax(torch.einsum("bhtd,bhtnd->bhtn", q * scale, kt), -1)
    return torch.einsum("bhtn,bhtnd->bhtd", p, vt)


def _peak_child(which: str, L: int, H: int, D: int, n: int) -> None:
    """Run one forward + backward and print the peak resident memory above the baseline (bytes)."""
    torch.manual_seed(0)
    q, k, v = (t.requires_grad_() for t in _inputs(L, H, D))
    attn = compile_pattern(memory(n, MLPControl(), causal=True), backend="torch", check_finite=False)
    attn.materialize(D)
    W = attn.control_param.detach()
    base = _status("VmRSS")
    try:  # reset the high-water mark so only this run counts
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    out = attn(q, k, v) if which == "abc" else cumsum_abc(q, k, v, W, D ** -0.5)
    out.sum().backward()
    print(json.dumps({"peak_bytes": _status("VmHWM") - base}))


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def peak_memory(L: int, H: int = 4, D: int = 64, n: int = 64) -> dict:
    """Forward + backward peak memory of ABC-MLP and the cumulative-sum implementation."""
    res = {"L": L}
    for which in ("abc", "cumsum"):
        cmd = [sys.executable, "-m", MODULE, "--peak-child", which, str(L), str(H), str(D), str(n)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        res[f"{which}_peak_mib"] = json.loads(out.strip().splitlines()[-1])["peak_bytes"] / 2 ** 20
    res["ratio"] = res["cumsum_peak_mib"] / res["abc_peak_mib"]
    return res


def decoding(steps: int, H: int = 4, D: int = 64, n: int = 64) -> dict:
    """``attn.step`` through ``steps`` tokens vs SDPA over a KV cache that grows each step."""
    q, k, v = _inputs(steps, H, D)
    attn = compile_pattern(memory(n, MLPControl(), causal=True), backend="torch", check_finite=False)
    state = attn.init_state(1)
    state_sizes = []
    with torch.no_grad():
        t = time.perf_counter()
        for i in range(steps):
            _, state = attn.step(q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1], state)
            state_sizes.append(state.nbytes())
        ours = time.perf_counter() - t
        kc = vc = None
        t = time.perf_counter()
        for i in range(steps):
            kc = k[:, :, i:i + 1] if kc is None else torch.cat([kc, k[:, :, i:i + 1]], 2)
            vc = v[:, :, i:i + 1] if vc is None else torch.cat([vc, v[:, :, i:i + 1]], 2)
            F.scaled_dot_product_attention(q[:, :, i:i + 1], kc, vc)
        peer = time.perf_counter() - t
    cache = (kc.numel() + vc.numel()) * kc.element_size()
    return {"steps": steps, "state_bytes_first": state_sizes[0], "state_bytes_last": state_sizes[-1],
            "state_constant": len(set(state_sizes)) == 1, "kv_cache_bytes_last": cache,
            "abc_ms_per_token": 1e3 * ours / steps, "kv_cache_sdpa_ms_per_token": 1e3 * peer / steps}


def _peak(fn, device: str) -> float:
    """Peak device memory (MiB) allocated by ``fn`` above what was live before it (CUDA only)."""
    if not str(device).startswith("cuda"):
        return float("nan")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def gpu_compare(L: int, H: int = 4, D: int = 64, n: int = 64, reps: int = 5, device: str = "cuda",
                backend: str = "triton") -> list[dict]:
    """Causal ABC-MLP on ``backend`` vs causal SDPA and :func:`cumsum_abc`, fp32 on ``device``.

    Forward and forward + backward medians (the contenders alternated in each repetition),
    ratios to ABC, and peak memory of one forward + backward. The cumulative-sum peer is
    skipped (reported as None) when its ``[T, n, D]`` tensors would not fit.
    """
    q, k, v = (t.requires_grad_() for t in _inputs(L, H, D, device=device))
    attn = compile_pattern(memory(n, MLPControl(), causal=True), backend=backend, check_finite=False).to(device)
    attn.materialize(D, device)
    W = attn.control_param.detach()
    scale = D ** -0.5
    cumsum_bytes = 6 * H * L * n * D * 4  # kt, vt, their products and cumsums (saved for backward)
    on_cuda = str(device).startswith("cuda")
    free = torch.cuda.mem_get_info()[0] if on_cuda else 0
    runs = {"abc_" + backend: lambda: attn(q, k, v),
            "sdpa_causal": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)}
    if not on_cuda or cumsum_bytes < 0.8 * free:
        runs["cumsum"] = lambda: cumsum_abc(q, k, v, W, scale)
    g = torch.randn(1, H, L, D, device=device)

    def fwd_bwd(fn):
        return lambda: torch.autograd.grad(fn(), (q, k, v), g)

    results = []
    for mode in ("forward", "forward+backward"):
        wrap = (lambda fn: lambda: fn()) if mode == "forward" else fwd_bwd
        times = {name: [] for name in runs}
        ctx = torch.no_grad() if mode == "forward" else torch.enable_grad()
        with ctx:
            for fn in runs.values():
                wrap(fn)()  # compile kernels, warm caches
            for _ in range(reps):
                for name, fn in runs.items():
                    times[name].append(_timed(wrap(fn), device))
        med = {name: statistics.median(t) for name, t in times.items()}
        ours = med["abc_" + backend]
        res = {"mode": mode, "L": L, "device": device, **{f"{k}_s": v for k, v in med.items()},
               **{f"{k}_spread_s": [min(t), max(t)] for k, t in times.items()},
               "sdpa_over_abc": med["sdpa_causal"] / ours,
               "cumsum_over_abc": med["cumsum"] / ours if "cumsum" in med else None}
        if mode == "forward+backward":
            res.update({f"{k}_peak_mib": _peak(fwd_bwd(fn), device) for k, fn in runs.items()})
        results.append(res)
    return results


def main(argv=None) -> None:
    """Command-line entry: run the bounded-memory benchmarks (or, on cuda, the GPU comparison) and
    print each result as a JSON line; ``--peak-child`` runs one subprocess peak measurement."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="quick check: L=2048, memory at 1024, 256 steps")
    ap.add_argument("--seq-len", type=int, default=16384)
    ap.add_argument("--mem-seq-len", type=int, default=None, help="L of the memory comparison (default: --seq-len)")
    ap.add_argument("--steps", type=int, default=4096)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda for the GPU speed comparison")
    ap.add_argument("--backend", default="torch", help="torch or triton (on cuda: triton unless told otherwise)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (on an oversubscribed machine, 1 avoids spin-waits in small ops)")
    ap.add_argument("--peak-child", nargs=5, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.peak_child:
        which, *dims = a.peak_child
        return _peak_child(which, *map(int, dims))
    L, ML, steps = (2048, 1024, 256) if a.small else (a.seq_len, a.mem_seq_len or a.seq_len, a.steps)
    print(json.dumps({"load_avg": os.getloadavg(), "threads": torch.get_num_threads(), "torch": torch.__version__}))
    if a.device != "cpu":
        for res in gpu_compare(L, device=a.device, backend=a.backend if a.backend != "torch" else "triton"):
            print(json.dumps(res))
        return
    print(json.dumps(forward_speed(L, device=a.device, backend=a.backend)))
    print(json.dumps(peak_memory(ML)))
    print(json.dumps(decoding(steps)))


if __name__ == "__main__":
    main()
