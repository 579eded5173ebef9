"""Registers the PyTorch implementations of program stages."""

from __future__ import annotations

from attncompiler.program.stages import BlockSparseAttention

from . import combiner as torch_combiner  # noqa: F401  (registers the Combiner stages)
from . import diffusion as torch_diffusion  # noqa: F401  (registers the diffusion stages)
from . import memory as torch_memory  # noqa: F401  (registers the ABC memory stages)
from ..registry import RunContext, register_stage
from .attention import block_sparse_attention


@register_stage("torch", BlockSparseAttention)
def run_block_sparse(stage: BlockSparseAttention, env: dict, ctx: RunContext) -> dict:
    q, k, v = (env[n] for n in stage.inputs)
    s = stage.schedule
    layout = stage.pattern.layout(q.shape[2], k.shape[2], s.block_m, s.block_n, batch=ctx.batch, heads=ctx.heads)
    out, lse = block_sparse_attention(q, k, v, layout, s, ctx.scale, ctx.extra.get("need_lse", True))
    return dict(zip(stage.outputs, (out, lse)))
