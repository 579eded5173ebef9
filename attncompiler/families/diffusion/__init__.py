"""Attention diffusion (Diffuser): the pattern node (:mod:`.pattern`), program stages and lowering
(:mod:`.program`), and the float64 reference (:mod:`.reference`)."""

from .pattern import DIFFUSION, MAX_HOPS, Diffusion, Kernel, diffuse
from .program import (Axpby, DiffusionHop, ExpandHeads, GlobalSplit, PassThrough, SparseProbs, choose_block,
                      lower_diffusion, recompute_hops, split_global_tokens)
from .reference import dense_probs, expand_heads

__all__ = ["DIFFUSION", "MAX_HOPS", "Axpby", "Diffusion", "DiffusionHop", "ExpandHeads", "GlobalSplit", "Kernel",
           "PassThrough", "SparseProbs", "choose_block", "dense_probs", "diffuse", "expand_heads", "lower_diffusion",
           "recompute_hops", "split_global_tokens"]
