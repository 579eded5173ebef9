"""Block-sparse attention through the fused C kernels on the CPU (``codegen/cpu/attention.py``).

The plan path of :mod:`.attention` issues several ATen ops per chunk and head, each its own
parallel region; the kernels run a whole stage as one parallel region over (batch x head,
query block) work items (key blocks for dk/dv), handed out dynamically so a thread slowed by
another process simply takes fewer items. They read the layout as ranges plus a small table of
partial-block masks (:mod:`attncompiler.codegen.cpu.tables`).

They apply to CPU tensors of float32, bfloat16 and float16 (the half types are computed in
float32, as the plan path does) when the kernels are built (x86-64 with AVX2, a C compiler,
``ATTNC_CPU_KERNELS`` not 0; on other CPUs the portable generic build, NEON on aarch64, runs
with ``ATTNC_CPU_KERNELS=generic``) and every group's masks fit the table budget. float64 and anything
else keep the plan path, which stays the portable fallback.

Score mods: the built-in ``ac.softcap`` and ``ac.alibi`` (and their compositions) run inside
the kernels (:func:`kernel_mods`); every other score_mod keeps the torch edge-weight path.
"""

from __future__ import annotations

import contextlib
import threading

import torch

from attncompiler.dsl.score_mod import Alibi, Composed, Softcap
from attncompiler.errors import InputError
from attncompiler.layout.block_layout import BlockLayout

from ..cpu import attention as kernels
from ..cpu.tables import kernel_tables
from .common import group_calls

FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_DISABLED = [0]  # open disabled() blocks: process-wide, so worker threads of a call see it too
_DISABLED_LOCK = threading.Lock()


@contextlib.contextmanager
def disabled():
    """Run the plan path instead of the kernels while this block is open (in every thread of the
    process): for counting the plan's ATen FLOPs, or comparing the two paths."""
    with _DISABLED_LOCK:
        _DISABLED[0] += 1
    try:
        yield
    finally:
        with _DISABLED_LOCK:
            _DISABLED[0] -= 1


def enabled() -> bool:
    """The kernels are built and not switched off by :func:`disabled`."""
    return not _DISABLED[0] and kernels.available()


def operands_fit(*tensors: torch.Tensor, dtypes=FUSED_DTYPES) -> bool:
    """CPU tensors of one dtype among ``dtypes``, none empty, and the kernels enabled."""
    dt = tensors[0].dtype
    if any(t.device.type != "cpu" or t.dtype != dt or 0 in t.shape for t in tensors) or dt not in dtypes:
        return False
    return enabled()


def applies(layout: BlockLayout, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the fused kernels run this call (see the module docstring)."""
    return operands_fit(q, k, v) and all(kernel_tables(g) is not None for g in layout.groups)


def kernel_mods(score_mod) -> kernels.ScoreMods | None:
    """The kernels' form of a score_mod built from ``ac.softcap`` and constant ``ac.alibi``
    slopes (composed in any order), or None when the kernels cannot apply it: any other
    function, or slopes that need a gradient (the torch path accumulates it)."""
    ops, slopes = [], None

    def walk(m) -> bool:
        nonlocal slopes
        if isinstance(m, Composed):
            return all(walk(p) for p in reversed(m.mods))  # compose(f, g)(s) = f(g(s)): g first
        if isinstance(m, Softcap):
            ops.append(("softcap", float(m.cap)))
            return True
        if isinstance(m, Alibi) and not m.slopes.requires_grad and slopes is None:
            slopes = m.slopes.detach().to(torch.float32).contiguous()
            ops.append(("alibi", 0.0))
            return True
        return False

    if score_mod is None:
        return kernels.ScoreMods()
    return kernels.ScoreMods(ops=tuple(ops), slopes=slopes) if walk(score_mod) else None


def _mods_for(mods: kernels.ScoreMods, blocks, heads: slice) -> kernels.ScoreMods:
    """``mods`` for one group: its query position offset and its heads' slopes."""
    slopes = None if mods.slopes is None else mods.slopes[heads]
    return kernels.ScoreMods(ops=mods.ops, slopes=slopes, q_pos0=int(blocks.geom.q_start))


@contextlib.contextmanager
def _aten_on_one_thread():
    """The call's thread count (for the kernels), with ATen's own ops (dtype casts, delta, the dq
    buffers' sum) on one intra-op thread meanwhile: each of those small ops would otherwise be an
    OpenMP region whose barrier waits for a thread another process has descheduled (measured:
    forward+backward at 2 threads under load went from 0.70-0.98x to about 1.05x of 1 thread)."""
    n = torch.get_num_threads()
    if n > 1:
        torch.set_num_threads(1)  # per OS thread: the kernels' pool threads are not affected
    try:
        yield n
    finally:
        if n > 1:
            torch.set_num_threads(n)


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 else t.to(torch.float32)


def _check_slopes(mods: kernels.ScoreMods, H: int) -> None:
    if mods.slopes is not None and mods.slopes.shape != (H,):
        raise InputError(f"alibi slopes have shape {tuple(mods.slopes.shape)}, but the call has {H} query heads; "
                         "hint: one slope per query head")


def forward(q, k, v, layout: BlockLayout, scale: float, need_lse: bool = True, mods=None):
    """``(out [B,H,Lq,Dv] in q's dtype, lse [B,H,Lq] float32 or None)``; not differentiable
    (the stage's autograd Function calls :func:`backward`)."""
    mods = kernels.ScoreMods() if mods is None else mods
    _check_slopes(mods, q.shape[1])
    with _aten_on_one_thread() as threads:
        return _forward(q, k, v, layout, scale, need_lse, mods, threads)


def _forward(q, k, v, layout, scale, need_lse, mods, threads):
    B, H, Lq, _ = q.shape
    G = H // k.shape[1]
    qf, kf, vf = _f32(q), _f32(k), _f32(v)
    if len(layout.groups) == 1:
        blocks = layout.groups[0]
        out, lse = kernels.forward(qf, kf, vf, kernel_tables(blocks), scale, _mods_for(mods, blocks, slice(None)),
                                   need_lse=need_lse, threads=threads)
        return out.to(q.dtype), lse
    out = torch.empty(B, H, Lq, v.shape[-1], dtype=torch.float32)
    lse = torch.empty(B, H, Lq, dtype=torch.float32) if need_lse else None
    for blocks, _, _, bs, hs, ks, _ in group_calls(layout, B, H, G):
        o, l = kernels.forward(qf[bs, hs], kf[bs, ks], vf[bs, ks], kernel_tables(blocks), scale,
                               _mods_for(mods, blocks, hs), need_lse=need_lse, threads=threads)
        out[bs, hs] = o
        if need_lse:
            lse[bs, hs] = l
    return out.to(q.dtype), lse


def backward(q, k, v, out, lse, dout, layout: BlockLayout, scale: float, mods=None, dlse=None):
    """``(dq, dk, dv)`` in the dtypes of q, k, v, from the saved ``out`` and ``lse``.

    ``dlse`` (optional, ``[B,H,Lq]``) is a gradient flowing into lse itself (attention sinks
    make lse part of the output); it enters as ``delta - dlse``."""
    mods = kernels.ScoreMods() if mods is None else mods
    _check_slopes(mods, q.shape[1])
    with _aten_on_one_thread() as threads:
        return _backward(q, k, v, out, lse, dout, layout, scale, mods, dlse, threads)


def _backward(q, k, v, out, lse, dout, layout, scale, mods, dlse, threads):
    B, H, _, _ = q.shape
    G = H // k.shape[1]
    qf, kf, vf, of, dof = _f32(q), _f32(k), _f32(v), _f32(out), _f32(dout)
    lf = _f32(lse)
    dlf = None if dlse is None else _f32(dlse)
    if len(layout.groups) == 1:
        blocks = layout.groups[0]
        dq, dk, dv = kernels.backward(qf, kf, vf, of, lf, dof, kernel_tables(blocks), scale,
                                      _mods_for(mods, blocks, slice(None)), threads=threads, dlse=dlf)
    else:
        dq, dk, dv = torch.zeros_like(qf), torch.zeros_like(kf), torch.zeros_like(vf)
        for blocks, _, _, bs, hs, ks, _ in group_calls(layout, B, H, G):
            a, b_, c = kernels.backward(qf[bs, hs], kf[bs, ks], vf[bs, ks], of[bs, hs], lf[bs, hs], dof[bs, hs],
                                        kernel_tables(blocks), scale, _mods_for(mods, blocks, hs),
                                        threads=threads, dlse=None if dlf is None else dlf[bs, hs])
            dq[bs, hs] = a
            dk[bs, ks] += b_
            dv[bs, ks] += c
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
