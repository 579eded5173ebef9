"""Mask-pattern attention as registered custom operators, for ``torch.compile`` and ``torch.export``.

Under ``torch.compile(fullgraph=True)`` and ``torch.export``, ``CompiledAttention.forward`` of a
mask pattern calls ``torch.ops.attncompiler.mask_attention`` (and autograd calls
``torch.ops.attncompiler.mask_attention_backward``). Dynamo sees one opaque operator whose fake
implementation computes only shapes (out ``[B, H, Lq, Dv]`` in q's dtype, lse ``[B, H, Lq]`` in
float32, float64 for float64 inputs). Everything that reads values runs in the real
implementation, at run time, outside the traced graph: the layout (built and cached as in eager
mode), the validation of the call-time positions and the grouping of batch entries by them. So
the graph never guards on data, and with ``dynamic=True`` a new sequence length reuses it.

The operators are self-contained (an exported program needs no Python object): the pattern is
named by a text key, the schedule by its JSON, and the backend and scale are plain arguments.
A pattern's key is its ``repr`` when :func:`~attncompiler.patterns.text.parse_pattern` reads it
back to an equal pattern, so a program exported in one process runs in another; a pattern whose
text does not identify it (a traced mask reading a captured tensor) gets a process-local key and
runs only where its module was constructed (elsewhere the operator raises, naming the pattern).

Host reads: the hot path (no positions) reads no tensor values. ``q_offset``/``kv_lens``/
``cu_seqlens`` tensors are read on the host inside the real implementation to group batch entries
and build their layouts (a device sync for CUDA tensors; pass them on the CPU to avoid it).

Backward: the backward operator takes ``(q, k, v, out, lse, dout)`` and the forward's keys and
runs the backend's flash-style backward per batch group (keys sliced to the group's valid length),
so grouped positions are not recomputed. Double backward raises (no formula is registered for
the backward operator).

Families: only mask patterns run as operators, and with them ``attncompiler.nn.MultiheadAttention``
and ``TransformerStack`` without reuse. Under ``torch.compile(fullgraph=True)`` the other families
do not trace yet (their stages build layouts and plans in Python code that dynamo cannot follow or
that reads tensor values): Combiner, Diffuser, ABC and cross-layer reuse stacks run in eager mode
only (without ``fullgraph`` dynamo falls back to eager around them); ``tests/test_compile_export.py``
records the torch error each one raises today.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Optional

import torch

from ..codegen.context import RunContext
from ..codegen.registry import stage_impl
from ..dsl.pattern import Pattern
from ..errors import AttnCompilerError, UnsupportedError
from ..patterns.text import parse_pattern
from ..program.inputs import Dims, check_qkv, default_scale
from ..program.positions import BatchGroup, Positions, batch_groups, group_layout, is_default, operator_positions
from ..program.schedule import Schedule
from ..program.dense import DenseAttention, fuse_dense
from .edge_weights import edge_weights
from ..program.stages import Program, lower, run_passes

LOCAL_PREFIX = "<process-local "
"""Start of the key of a pattern whose text does not identify it (it cannot be read back)."""

_PATTERNS: dict[str, Pattern] = {}
_KEYS: dict[Pattern, str] = {}


def register_pattern(pattern: Pattern) -> str:
    """The operator key of ``pattern``, registered in this process (done when a module is built).

    The key is ``repr(pattern)`` when the text reads back to an equal pattern (portable: a fresh
    process parses it); otherwise a process-local key that only this process resolves.
    """
    key = _KEYS.get(pattern)
    if key is not None:
        return key
    text = repr(pattern)
    try:
        portable = parse_pattern(text) == pattern
    except (AttnCompilerError, RecursionError):
        portable = False
    if portable and _PATTERNS.get(text, pattern) == pattern:
        key = text
    else:
        key = f"{LOCAL_PREFIX}{len(_PATTERNS)}> {text}"
    _PATTERNS[key] = pattern
    _KEYS[pattern] = key
    return key


def pattern_from_key(key: str) -> Pattern:
    """The pattern an operator key names: registered in this process, or parsed from its text.

    Raises:
        UnsupportedError: a process-local key from another process, or text that does not parse.
    """
    pattern = _PATTERNS.get(key)
    if pattern is not None:
        return pattern
    if key.startswith(LOCAL_PREFIX):
        raise UnsupportedError(
            f"the pattern {key.split('> ', 1)[-1]} was registered in another process and its text does not "
            "identify it (e.g. a traced mask reading a captured tensor); build the module with "
            "ac.compile(pattern) in this process before running the exported program, or use a pattern "
            "written with the DSL")
    try:
        pattern = parse_pattern(key)
    except AttnCompilerError as e:
        raise UnsupportedError(f"cannot rebuild the pattern {key[:200]} from its text: {e}") from e
    _PATTERNS[key] = pattern
    _KEYS.setdefault(pattern, key)
    return pattern


def schedule_key(schedule: Schedule) -> str:
    """A schedule as the JSON text the operators take."""
    return json.dumps(dataclasses.asdict(schedule), sort_keys=True)


@functools.lru_cache(maxsize=256)
def schedule_from_key(key: str) -> Schedule:
    """The schedule of :func:`schedule_key` text."""
    return Schedule(**json.loads(key))


@functools.lru_cache(maxsize=256)
def mask_program(pattern_key: str, sched_key: str) -> Program:
    """The (cached) program of a mask pattern's key and schedule key, with the dense rewrite
    that :class:`~attncompiler.runtime.module.CompiledAttention` runs for mask patterns."""
    program = lower(pattern_from_key(pattern_key), schedule_from_key(sched_key))
    return run_passes(program, [("fuse_dense", fuse_dense)])


# --- running a program (shared by the eager path of CompiledAttention and the operators) --------

def run_stages(program: Program, q, k, v, dims: Dims, scale, need_lse: bool, stage_inputs: dict, backend: str,
               group: BatchGroup | None, weights: tuple | None = None):
    """Run the program's stages once: ``(out, lse or None)``. ``weights`` is ``(score_mod, sinks)``
    of a module with edge weights (None: plain attention)."""
    extra = {"need_lse": need_lse}
    if group is not None:
        extra["positions"] = group.positions
    if weights is not None:
        extra.update(edge_weights(*weights, backend, group))
    ctx = RunContext(scale=default_scale(dims.head_dim, scale), batch=q.shape[0], heads=dims.heads, extra=extra)
    env = {"q": q, "k": k, "v": v, **stage_inputs}
    for stage in program.stages:
        env.update(stage_impl(backend, type(stage))(stage, env, ctx))
    return env["out"], env.get("lse")


def group_rows(grp: BatchGroup, batch: int, device) -> tuple[list[int], torch.Tensor | None]:
    """The batch entries of ``grp`` and their index tensor (None: every entry, in order)."""
    idx = list(range(batch)) if grp.index is None else list(grp.index)
    return idx, None if grp.index is None else torch.tensor(idx, device=device)


def run_batch_groups(program: Program, q, k, v, dims: Dims, scale, stage_inputs: dict, groups: list[BatchGroup],
                     backend: str, weights: tuple | None = None):
    """Run each batch group with its own positions (keys sliced to its valid length) and put the
    results back in batch order (differentiable: a concatenation and a gather). Returns (out, lse).
    ``weights``: as in :func:`run_stages`."""
    outs, lses, order = [], [], []
    for grp in groups:
        idx, sel = group_rows(grp, dims.batch, q.device)
        qg, kg, vg = (t if sel is None else t.index_select(0, sel) for t in (q, k, v))
        if grp.kv_len == 0:  # no valid key: zeros and lse -inf
            o = qg.new_zeros(qg.shape[:3] + (v.shape[-1],))
            lse = torch.full(qg.shape[:3], float("-inf"), dtype=torch.float32, device=q.device)
        else:
            o, lse = run_stages(program, qg, kg[:, :, :grp.kv_len], vg[:, :, :grp.kv_len], dims, scale, True,
                                stage_inputs, backend, grp, weights)
        outs.append(o.to(q.dtype))
        lses.append(lse.float() if q.dtype != torch.float64 else lse.double())
        order += idx
    if len(groups) == 1 and groups[0].index is None:
        return outs[0], lses[0]
    inverse = torch.empty(dims.batch, dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(dims.batch)
    inverse = inverse.to(q.device)
    return torch.cat(outs).index_select(0, inverse), torch.cat(lses).index_select(0, inverse)


def lse_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """The documented log-sum-exp dtype: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def position_kwargs(q_offset, q_offset_int: int, align: str, kv_lens, cu_seqlens) -> dict:
    """The operator's position arguments back as :func:`batch_groups` keywords."""
    return dict(q_offset=q_offset_int if q_offset is None else q_offset, align=align or None, kv_lens=kv_lens,
                cu_seqlens=cu_seqlens)


# --- the operators -----------------------------------------------------------------------------

@torch.library.custom_op("attncompiler::mask_attention", mutates_args=())
def mask_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern_key: str, sched_key: str,
                   backend: str, scale: Optional[float], need_lse: bool, check_finite: bool,
                   q_offset: Optional[torch.Tensor], q_offset_int: int, align: str,
                   kv_lens: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [B, H, Lq, Dv], lse [B, H, Lq])`` of a mask pattern (lse is empty ``[0]`` unless
    ``need_lse``); ``pattern_key``/``sched_key`` come from :func:`register_pattern` and
    :func:`schedule_key`. The layout is built (cached) and the positions validated here."""
    program = mask_program(pattern_key, sched_key)
    dims = check_qkv(q, k, v, check_finite=check_finite)
    groups = batch_groups(program.pattern, dims, **position_kwargs(q_offset, q_offset_int, align, kv_lens,
                                                                   cu_seqlens))
    with torch.no_grad():
        if is_default(groups, dims):
            out, lse = run_stages(program, q, k, v, dims, scale, need_lse, {}, backend, None)
        else:
            out, lse = run_batch_groups(program, q, k, v, dims, scale, {}, groups, backend)
    # The fake implementation promises fresh contiguous tensors (inductor lays out what follows by it).
    out = out.to(q.dtype).contiguous()
    if not need_lse:
        return out, q.new_empty((0,), dtype=lse_dtype_for(q.dtype))
    return out, lse.to(lse_dtype_for(q.dtype)).contiguous()


@mask_attention.register_fake
def _mask_attention_fake(q, k, v, pattern_key, sched_key, backend, scale, need_lse, check_finite, q_offset,
                         q_offset_int, align, kv_lens, cu_seqlens):
    B, H, Lq, _ = q.shape
    lse_shape = (B, H, Lq) if need_lse else (0,)
    return q.new_empty((B, H, Lq, v.shape[-1])), q.new_empty(lse_shape, dtype=lse_dtype_for(q.dtype))


@torch.library.custom_op("attncompiler::mask_attention_backward", mutates_args=())
def mask_attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                            lse: torch.Tensor, dout: torch.Tensor, pattern_key: str, sched_key: str, backend: str,
                            scale: Optional[float], q_offset: Optional[torch.Tensor], q_offset_int: int, align: str,
                            kv_lens: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor]
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` of :func:`mask_attention` from its ``out`` and ``lse``: the backend's
    flash-style backward per batch group (keys past a group's valid length get zero gradient)."""
    program = mask_program(pattern_key, sched_key)
    dims = check_qkv(q, k, v, check_finite=False)
    groups = batch_groups(program.pattern, dims, **position_kwargs(q_offset, q_offset_int, align, kv_lens,
                                                                   cu_seqlens))
    sc = default_scale(dims.head_dim, scale)
    (stage,) = program.stages
    if len(groups) == 1 and groups[0].index is None and groups[0].kv_len == dims.kv_len:
        dq, dk, dv = group_backward(stage, q, k, v, out, lse, dout, sc, backend, groups[0])
        return dq.contiguous(), dk.contiguous(), dv.contiguous()
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for grp in groups:
        if grp.kv_len == 0:  # nothing visible: zero gradients
            continue
        idx, sel = group_rows(grp, dims.batch, q.device)
        pick = (lambda t: t) if sel is None else (lambda t: t.index_select(0, sel))
        n = grp.kv_len
        g = group_backward(stage, pick(q), pick(k)[:, :, :n], pick(v)[:, :, :n], pick(out), pick(lse), pick(dout),
                           sc, backend, grp)
        rows = slice(None) if sel is None else sel
        dq[rows] = g[0]
        if sel is None:
            dk[:, :, :n], dv[:, :, :n] = g[1], g[2]
        else:
            dk[sel, :, :n], dv[sel, :, :n] = g[1], g[2]
    return dq, dk, dv


@mask_attention_backward.register_fake
def _mask_attention_backward_fake(q, k, v, out, lse, dout, pattern_key, sched_key, backend, scale, q_offset,
                                  q_offset_int, align, kv_lens, cu_seqlens):
    # Contiguous, as the real implementation returns (not empty_like: q/k/v may be strided views).
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def group_backward(stage, q, k, v, out, lse, dout, scale: float, backend: str, grp: BatchGroup):
    """``(dq, dk, dv)`` of one batch group on ``backend`` (the layout its forward used)."""
    s, (B, H, Lq, _), Lk = stage.schedule, q.shape, k.shape[2]
    positions = None if grp.positions == Positions() else grp.positions
    if backend == "triton" and q.dtype != torch.float64:  # float64 runs on the torch backend
        from ..codegen.triton.backend import group_layout as triton_layout
        from ..codegen.triton.kernels import triton_attention_backward

        layout = triton_layout(stage.pattern, Lq, Lk, s, batch=B, heads=H, positions=positions)
        return triton_attention_backward(q, k, v, out, lse, dout, layout, s, scale)
    from ..codegen.pytorch.dense import dense_attention_backward, fused_applies, fused_causal

    if isinstance(stage, DenseAttention) and fused_applies(stage.causal, q, k, v, positions):
        causal = fused_causal(stage.causal, Lk, positions)  # as the forward ran
        return dense_attention_backward(q, k, v, out, lse, dout, causal, scale)
    from ..codegen.pytorch.attention import block_sparse_attention_backward

    layout = group_layout(stage.pattern, Lq, Lk, s.block_m, s.block_n, batch=B, heads=H, positions=positions)
    return block_sparse_attention_backward(q, k, v, out, lse, dout, layout, s, scale)


def _setup_context(ctx, inputs, output):
    q, k, v, pattern_key, sched_key, backend, scale, _need, _check, q_offset, q_offset_int, align, kv_lens, \
        cu_seqlens = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], q_offset, kv_lens, cu_seqlens)
    ctx.keys = (pattern_key, sched_key, backend, scale, q_offset_int, align)
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, q_offset, kv_lens, cu_seqlens = ctx.saved_tensors
    pattern_key, sched_key, backend, scale, q_offset_int, align = ctx.keys
    if lse.dim() != 3:
        raise UnsupportedError("mask_attention was run with need_lse=False; its backward needs the log-sum-exp")
    dq, dk, dv = mask_attention_backward(q, k, v, out, lse, dout, pattern_key, sched_key, backend, scale, q_offset,
                                         q_offset_int, align, kv_lens, cu_seqlens)
    return (dq, dk, dv) + (None,) * 11


mask_attention.register_autograd(_backward, setup_context=_setup_context)


def call_mask_attention(pattern_key: str, sched_key: str, backend: str, q, k, v, scale, need_lse: bool,
                        check_finite: bool, positions: dict):
    """Call :func:`mask_attention` with the call-time ``positions`` (``q_offset``, ``align``,
    ``kv_lens``, ``cu_seqlens`` keywords), checked here by type and shape only (values are checked
    by the operator at run time, so the traced graph never reads them)."""
    if scale is not None:
        default_scale(q.shape[-1], scale)  # type check: a finite number
    q_offset, q_offset_int, align, kv_lens, cu_seqlens = operator_positions(**positions)
    return torch.ops.attncompiler.mask_attention(q, k, v, pattern_key, sched_key, backend,
                                                 None if scale is None else float(scale), need_lse, check_finite,
                                                 q_offset, q_offset_int, align, kv_lens, cu_seqlens)


__all__ = ["call_mask_attention", "mask_attention", "mask_attention_backward", "pattern_from_key",
           "register_pattern", "run_batch_groups", "run_stages", "schedule_from_key", "schedule_key"]
