"""Registers the Triton implementation of ``BlockSparseAttention`` and its autotuner.

``ac.compile(pattern, backend="triton")`` (and ``"auto"`` on CUDA) runs generated kernels:
forward, and a deterministic backward (dk/dv over the transposed block lists, then dq).
Without CUDA the kernels run under ``TRITON_INTERPRET=1`` (slow; for tests).

Autotuning (GPU only): with ``ATTNC_AUTOTUNE=1`` in the environment, or after
``set_autotune(True)``, the first call for a (pattern, shape, dtype) times a few candidate
schedules and keeps the fastest; the winner is remembered per key in memory and in
``autotune.json`` in the kernel cache directory.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Sequence

import torch
import triton  # noqa: F401  (an ImportError here tells the registry the backend is unavailable)

from attncompiler.errors import UnsupportedError
from attncompiler.layout.block_layout import BlockLayout, build_layout
from attncompiler.program.positions import Positions
from attncompiler.program.stages import BlockSparseAttention
from attncompiler.program.schedule import Schedule

from .. import cache
from ..context import RunContext
from .kernels import kernel_tiles, triton_attention
from .score_mod import triton_score_mod_attention
from .common import check_device

_AUTOTUNE: bool | None = None  # None: follow ATTNC_AUTOTUNE
_WINNERS: dict[str, Schedule] = {}

POSITION_LIMIT = 2**31  # query/key positions the rendered predicates are proven for: [0, 2**31 - 1]


def set_autotune(enabled: bool | None) -> None:
    """Turn autotuning on or off for this process (None: follow ``ATTNC_AUTOTUNE``)."""
    global _AUTOTUNE
    _AUTOTUNE = enabled


def autotune_enabled() -> bool:
    """Whether stage calls on CUDA tensors pick their schedule by timing candidates."""
    if _AUTOTUNE is not None:
        return _AUTOTUNE
    return os.environ.get("ATTNC_AUTOTUNE", "0") not in ("", "0")






def candidate_schedules(base: Schedule) -> list[Schedule]:
    """A few schedules worth timing: the given one and common flash-attention shapes."""
    rep = dataclasses.replace
    cands = [base,
             rep(base, block_m=128, block_n=64, kernel_block_m=None, kernel_block_n=None, num_warps=8, num_stages=3),
             rep(base, block_m=128, block_n=64, kernel_block_m=None, kernel_block_n=None, num_warps=4, num_stages=3),
             rep(base, block_m=64, block_n=64, kernel_block_m=None, kernel_block_n=None, num_warps=4, num_stages=3),
             rep(base, block_m=128, block_n=128, kernel_block_m=None, kernel_block_n=64, num_warps=8, num_stages=2)]
    out: list[Schedule] = []
    for c in cands:
        if c not in out:
            out.append(c)
    return out


def tune_key(pattern, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backward: bool, base: Schedule) -> str:
    """What a tuning result is valid for: pattern, shapes, dtype, device and base schedule."""
    return cache.content_key({"pattern": repr(pattern), "q": list(q.shape), "k": list(k.shape), "v": list(v.shape),
                              "dtype": str(q.dtype), "backward": backward, "base": str(base),
                              "device": torch.cuda.get_device_name(q.device) if q.is_cuda else "cpu"})


def _bench_ms(fn: Callable[[], object]) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=5, rep=25))


def autotune(pattern, q, k, v, scale: float, base: Schedule, *, batch: int, heads: int,
             candidates: Sequence[Schedule] | None = None,
             timer: Callable[[Callable[[], object]], float] = _bench_ms) -> Schedule:
    """The fastest schedule among ``candidates`` for this call's shapes (remembered per key).

    Candidates that fail to build or run (e.g. too much shared memory) are skipped.
    """
    backward = q.requires_grad or k.requires_grad or v.requires_grad
    key = tune_key(pattern, q, k, v, backward, base)
    if key in _WINNERS:
        return _WINNERS[key]
    stored = _load_winners().get(key)
    if stored is not None:
        _WINNERS[key] = Schedule(**stored)
        return _WINNERS[key]
    best, best_ms = base, float("inf")
    for cand in candidates or candidate_schedules(base):
        try:
            kernel_tiles(cand)
            layout = pattern.layout(q.shape[2], k.shape[2], cand.block_m, cand.block_n, batch=batch, heads=heads)

            def run(cand=cand, layout=layout):
                qq, kk, vv = (t.detach().requires_grad_(backward) for t in (q, k, v))
                out, _ = triton_attention(qq, kk, vv, layout, cand, scale)
                if backward:
                    out.backward(torch.ones_like(out))

            ms = timer(run)
        except Exception:  # a candidate that cannot run here is simply not chosen
            continue
        if ms < best_ms:
            best, best_ms = cand, ms
    _WINNERS[key] = best
    _store_winner(key, best)
    return best


def _winners_path():
    return cache.cache_dir() / "autotune.json"


def _load_winners() -> dict:
    try:
        return json.loads(_winners_path().read_text())
    except (OSError, ValueError):
        return {}


def _store_winner(key: str, sched: Schedule) -> None:
    data = _load_winners()
    data[key] = dataclasses.asdict(sched)
    cache.atomic_write(_winners_path(), json.dumps(data, indent=1, sort_keys=True))


def run_block_sparse(stage: BlockSparseAttention, env: dict, ctx: RunContext) -> dict:
    """Run one ``BlockSparseAttention`` stage with the generated kernels."""
    q, k, v = (env[n] for n in stage.inputs)
    if q.dtype == torch.float64:
        # Triton has no float64 tensor-core path; the torch backend computes in float64.
        from ..pytorch.stages import run_block_sparse as torch_impl

        return torch_impl(stage, env, ctx)
    check_device(q)
    s = stage.schedule
    if autotune_enabled() and q.is_cuda:
        s = autotune(stage.pattern, q, k, v, ctx.scale, s, batch=ctx.batch, heads=ctx.heads)
    layout = group_layout(stage.pattern, q.shape[2], k.shape[2], s, batch=ctx.batch, heads=ctx.heads,
                          positions=ctx.extra.get("positions"))
    if ctx.extra.get("score_mod") is not None or ctx.extra.get("sinks") is not None:
        out, lse = triton_score_mod_attention(q, k, v, layout, s, ctx.scale, ctx.extra.get("score_mod"),
                                              ctx.extra.get("sinks"), ctx.extra.get("batch_index"))
        return dict(zip(stage.outputs, (out, lse)))
    out, lse = triton_attention(q, k, v, layout, s, ctx.scale)
    return dict(zip(stage.outputs, (out, lse)))


def group_layout(pattern, q_len: int, kv_len: int, s: Schedule, *, batch: int, heads: int,
                 positions: Positions | None) -> BlockLayout:
    """The layout of one batch group: the pattern's own, or for call-time positions the rows at
    ``positions.q_offset`` onwards (``Geometry.q_start``, passed to the kernels at run time).

    Unlike the torch backend, query blocks keep the schedule's height: the kernel tiles divide it,
    and one kernel serves every decode step.

    Runtime documents (``cu_seqlens``) are bound into the layout's pattern here: the kernels read
    the document ids from their runtime table (the predicate's ``doc_id`` buffer) and the kernel
    source names the documents without their lengths, so one kernel serves every ``cu_seqlens``.

    Raises:
        UnsupportedError: query positions past the kernels' proven int32 index domain.
    """
    if positions is None or positions == Positions():
        return pattern.layout(q_len, kv_len, s.block_m, s.block_n, batch=batch, heads=heads)
    if positions.q_offset + q_len > POSITION_LIMIT:
        # The predicate's int32/int64 choice is proven for positions up to 2**31 - 1 (render.py).
        raise UnsupportedError(f"q_offset={positions.q_offset} with Lq={q_len} puts query positions past "
                               f"{POSITION_LIMIT - 1}, beyond what the triton kernels' index arithmetic is "
                               "proven for; use backend='torch'")
    return build_layout(positions.bind(pattern), q_len, kv_len, s.block_m, s.block_n, batch=batch, heads=heads,
                        q_start=positions.q_offset)
