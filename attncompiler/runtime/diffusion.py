"""The compiled diffusion module and its runtime decisions (hops schedule, heads per slice).

The pattern, stages, lowering and reference live in :mod:`attncompiler.families.diffusion`;
this module runs a lowered program on a backend, slice of heads by slice of heads.
"""

from __future__ import annotations

import math

import torch

from ..errors import InputError, PatternError
from ..families.diffusion.pattern import DIFFUSION, Diffusion
from ..families.diffusion.program import SparseProbs, choose_block, split_global_tokens
from ..program.schedule import Schedule
from ..program.stages import Program
from ..program.head_slices import choose_head_block, run_by_head_slices
from ..program.inputs import check_qkv, default_scale
from .edge_weights import check_backend, edge_weights
from .module import CompiledAttention, compile_program, resolve_backend

# ---------------------------------------------------------------------------------------------
# Runtime module
# ---------------------------------------------------------------------------------------------

class DiffusionAttention(CompiledAttention):
    """Compiled diffusion attention: ``forward(q, k, v, scale=None) -> out [B, H, L, Dv]``.

    ``hops_mode`` picks the schedule: ``"materialize"`` (P stored once, SpMM hops: the fast path
    on CPU), ``"recompute"`` (fused attention per hop, see :func:`recompute_hops`), or
    ``"auto"`` (:func:`choose_hops_mode` decides per backend and head dim). Both schedules run
    on both backends. ``head_block`` (``"auto"`` or an int) is how many query heads of one batch
    entry run through the whole program together, ``batch * heads`` or more for all at once
    (:func:`choose_diffusion_head_block`: on CPU, as many as keep their stored P in cache across
    the hops). Diffusion has no log-sum-exp output.

    A ``score_mod`` (torch backend) modifies the base attention's scaled scores before the mask,
    ``P = softmax(score_mod(scale q k^T, b, h, i, j) + mask)``, under both schedules; the hops
    then use that P. Such a module runs all heads at once (the score_mod sees global ``b, h``).
    """

    def __init__(self, pattern, backend="auto", schedule=None, check_finite=False, score_mod=None, sinks=None):
        super().__init__(pattern, backend, schedule, check_finite, score_mod=score_mod, sinks=sinks)
        self.auto_block = schedule is None
        self.hops_mode = "auto"
        self.head_block: int | str = "auto"
        self._head_blocks: dict = {}  # head_block="auto" decisions per program and input shape

    def program_for(self, backend: str, seq_len: int | None = None, head_dim: int | None = None) -> Program:
        """The program run on ``backend`` under the current ``hops_mode`` (and, without an explicit
        schedule, the block size :func:`choose_block` picks for ``seq_len``)."""
        mode = self.hops_mode
        if mode == "auto":
            mode = choose_hops_mode(self.pattern, backend, head_dim)
        if mode not in ("materialize", "recompute"):
            raise InputError(f"hops_mode={self.hops_mode!r} must be 'auto', 'materialize' or 'recompute'")
        passes = ("recompute_hops",) if mode == "recompute" else ()
        if self.auto_block and seq_len is not None and self.pattern.hops:
            b = choose_block(self.pattern, seq_len)
            return compile_program(self.pattern, Schedule(block_m=b, block_n=b), passes)
        return compile_program(self.pattern, next(
            (st.schedule for st in self.program.stages if hasattr(st, "schedule")), None), passes)

    def forward(self, q, k, v, scale: float | None = None, *, return_lse: bool = False, **stage_inputs):
        """``out [B, H, L, Dv]`` (q's dtype). ``stage_inputs`` are the program's call inputs (none for
        diffusion); any other keyword raises :class:`~attncompiler.errors.UnexpectedArgumentError`."""
        if return_lse:
            raise InputError("diffusion attention has no log-sum-exp; call it without return_lse")
        dims = check_qkv(q, k, v, check_finite=self.check_finite)
        self.pattern.validate(dims.q_len, dims.kv_len)
        backend = resolve_backend(self.backend, q.device)
        check_backend(DIFFUSION, backend, self.score_mod, self.sinks)
        self.program = program = self.program_for(backend, dims.q_len, dims.head_dim)
        self.check_call_keywords("forward", stage_inputs, program)
        from ..codegen.context import RunContext
        from ..codegen.registry import stage_impl

        scale = default_scale(dims.head_dim, scale)
        last_use = {name: i for i, st in enumerate(program.stages) for name in st.inputs}

        def run(qq, kk, vv):
            extra = {"need_lse": False}
            if self.edge_weights is not None:
                extra.update(edge_weights(self.score_mod, self.sinks, backend, None))
            ctx = RunContext(scale=scale, batch=qq.shape[0], heads=qq.shape[1], extra=extra)
            env = {"q": qq, "k": kk, "v": vv, **stage_inputs}
            for i, stage in enumerate(program.stages):
                env.update(stage_impl(backend, type(stage))(stage, env, ctx))
                for name in [n for n, j in last_use.items() if j == i and n != "out"]:
                    env.pop(name, None)  # z_k dies after the hop that reads it: O(L D) live, not O(K L D)
            return env["out"]

        base = self.pattern.base
        if stage_inputs or base.batch_dependent or base.head_period != 1 or self.edge_weights is not None:
            return run(q, k, v).to(q.dtype)  # a slice would see the layout of batch 0 / heads 0..
        return run_by_head_slices(run, q, k, v, self._head_block_for(program, backend, q, k, v)).to(q.dtype)

    def _head_block_for(self, program: Program, backend: str, q, k, v) -> int:
        """``head_block`` as an int: ``"auto"`` asks :func:`choose_diffusion_head_block` once per
        schedule and input shape."""
        block = self.head_block
        if block != "auto":
            if not isinstance(block, int) or isinstance(block, bool) or block < 1:
                raise InputError(f"head_block={block!r} must be 'auto' or a positive int")
            return block
        probs = next((st for st in program.stages if isinstance(st, SparseProbs)), None)
        key = (probs and (probs.schedule, probs.split_globals), backend, q.device.type, q.dtype, tuple(q.shape),
               tuple(k.shape), v.shape[-1])
        if key not in self._head_blocks:
            if len(self._head_blocks) > 64:
                self._head_blocks.clear()
            self._head_blocks[key] = choose_diffusion_head_block(self.pattern, program, backend, q, k, v)
        return self._head_blocks[key]


def choose_diffusion_head_block(pattern: Diffusion, program: Program, backend: str, q, k, v) -> int:
    """Schedule decision (torch backend on CPU, stored P): query heads per slice so that a slice's
    stored P and hop vectors stay in cache across the hops (:mod:`attncompiler.program.head_slices`).
    Everything at once on other backends and devices and under the recompute schedule."""
    B, H, L = q.shape[:3]
    probs = next((st for st in program.stages if isinstance(st, SparseProbs)), None)
    if backend != "torch" or q.device.type != "cpu" or probs is None:
        return B * H
    split = split_global_tokens(probs.pattern) if probs.split_globals else None
    light = split.light if split is not None else probs.pattern
    bm, bn = probs.schedule.block_m, probs.schedule.block_n
    layout = light.layout(L, k.shape[2], bm, bn)
    stored = layout.groups[0].num_blocks * bm * bn + (len(split.tokens) * k.shape[2] if split is not None else 0)
    itemsize = 8 if q.dtype == torch.float64 else 4
    return choose_head_block((stored + 4 * L * v.shape[-1]) * itemsize, B, H, k.shape[1])


# Recomputing a score costs 2 * head_dim flops (plus the exp); storing it costs reading 4 bytes
# of P per hop. On a GPU (tensor cores against HBM) a byte of traffic is worth about this many
# flops (H100: ~400 TFLOP/s tf32-class matmul against ~3.3 TB/s); on CPU the torch backend's
# SpMM hops beat per-hop attention by far (measured, benchmarks/diffusion_bench.py).
_GPU_FLOPS_PER_BYTE = 100


def choose_hops_mode(pattern: Diffusion, backend: str, head_dim: int | None = None) -> str:
    """Schedule decision: ``"materialize"`` (store P, SpMM hops) or ``"recompute"`` (P per hop).

    torch backend: materialize (one score pass instead of K). triton backend: recompute while
    recomputing a score (``2 * head_dim`` flops) is cheaper than reading its stored 4 bytes,
    i.e. ``head_dim < 2 * _GPU_FLOPS_PER_BYTE``; larger heads store P. Zero hops: no P at all.
    """
    if backend != "triton" or not pattern.hops:
        return "materialize"
    d = head_dim if head_dim is not None else 64
    return "recompute" if 2 * d < 4 * _GPU_FLOPS_PER_BYTE else "materialize"


# Candidate layout block sizes and the per-block cost of a tile (loop and small-matmul overhead),
# in element-equivalents; measured on CPU with the diffuser catalogue graph.
