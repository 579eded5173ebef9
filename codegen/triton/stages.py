"""The Triton backend's table: which function runs which program stage, and which stages have a
generated kernel file of their own (read by the registry; importing it needs ``triton``)."""

from __future__ import annotations

from attncompiler.program.dense import DenseAttention
from attncompiler.program.stages import BlockSparseAttention

from ..pytorch import diffusion as torch_diffusion
from . import combiner, diffusion, memory
from .backend import run_block_sparse

STAGES = {BlockSparseAttention: run_block_sparse,
          DenseAttention: run_block_sparse,  # same semantics: the pattern's block-sparse kernels
          **torch_diffusion.SHARED_STAGES,  # plain tensor algebra, any device (recompute-schedule hops)
          **diffusion.STAGES, **combiner.STAGES, **memory.STAGES}
SOURCES = {**diffusion.SOURCES, **memory.SOURCES}
