"""The PyTorch backend's table: which function runs which program stage (read by the registry)."""

from __future__ import annotations

from attncompiler.program.positions import group_layout
from attncompiler.program.dense import DenseAttention
from attncompiler.program.stages import BlockSparseAttention

from . import combiner, diffusion, memory
from ..context import RunContext
from .attention import block_sparse_attention, fused_applies
from .dense import run_dense
from .score_mod import score_mod_attention
from .threads import split_heads


def run_block_sparse(stage: BlockSparseAttention, env: dict, ctx: RunContext) -> dict:
    """Run one ``BlockSparseAttention`` stage with the chunked PyTorch implementation."""
    q, k, v = (env[n] for n in stage.inputs)
    s = stage.schedule
    layout = group_layout(stage.pattern, q.shape[2], k.shape[2], s.block_m, s.block_n, batch=ctx.batch,
                          heads=ctx.heads, positions=ctx.extra.get("positions"))
    if ctx.extra.get("score_mod") is not None or ctx.extra.get("sinks") is not None:
        out, lse = score_mod_attention(q, k, v, layout, s, ctx.scale, ctx.extra.get("score_mod"),
                                       ctx.extra.get("sinks"), ctx.extra.get("batch_index"),
                                       ctx.extra.get("need_lse", True))
        return dict(zip(stage.outputs, (out, lse)))
    if fused_applies(layout, q, k, v):  # the fused kernels split their own work across threads
        out, lse = block_sparse_attention(q, k, v, layout, s, ctx.scale, ctx.extra.get("need_lse", True))
        return dict(zip(stage.outputs, (out, lse)))
    # inference: (batch, kv-head) slices in parallel, one intra-op thread each (see threads.py)
    out, lse = split_heads(block_sparse_attention, q, k, v, layout, s, ctx.scale, ctx.extra.get("need_lse", True))
    return dict(zip(stage.outputs, (out, lse)))


def run_dense_attention(stage: DenseAttention, env: dict, ctx: RunContext) -> dict:
    """Run a ``DenseAttention`` stage: SDPA's fused CPU kernel, or the block-sparse stage when the
    call has edge weights (the fused kernel takes no score_mod or sinks)."""
    if ctx.extra.get("score_mod") is not None or ctx.extra.get("sinks") is not None:
        return run_block_sparse(stage, env, ctx)
    return run_dense(stage, env, ctx)


STAGES = {BlockSparseAttention: run_block_sparse, DenseAttention: run_dense_attention,  # dense: SDPA's fused CPU kernel
          **combiner.STAGES, **diffusion.STAGES, **memory.STAGES}
SOURCES: dict = {}  # every torch stage runs as PyTorch ops: no generated files
