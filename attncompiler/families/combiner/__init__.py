"""Combiner (Ren et al., NeurIPS 2021, arXiv 2107.05768): factorized full attention.

Every query ``i`` attends directly to a set ``D_i`` of keys and, through one *summary node*
per region, to a set ``R_i`` of span summaries, under one joint softmax:

    out_i = sum_{j in D_i} p_j v_j + sum_{S in R_i} p_S v_S,
    p = softmax([scale q_i.k_j for j in D_i ; scale q_i.k_S for S in R_i]).

A span summary pools its members: ``k_S = pool_j k_j``, ``q_S = pool_j q_j`` (max or mean)
and ``v_S = sum_j softmax_j(scale q_S.k_j) v_j`` (the "local expectation", shared by all
queries). ``D_i`` and the spans of ``R_i`` partition the keys ``i`` may see (all keys, or
``[0, i]`` when causal), so every query reaches every legal key in one layer.

With a ``score_mod`` (``ac.compile(p, score_mod=fn)``, torch backend) the joint softmax becomes

    p = softmax([fn(scale q_i.k_j, b, h, i, j) for j in D_i ; scale q_i.k_S for S in R_i])

with ``i``, ``j`` the real positions. The summary scores ``scale q_i.k_S`` and the local
expectations ``softmax_j(scale q_S.k_j)`` are left unmodified: ``k_S`` and ``q_S`` pool several
tokens and have no position to hand to ``fn``. Sinks join the joint softmax's denominator.

This module is the public face of the family; the parts live in modules with one job each:

* :mod:`~attncompiler.families.combiner.tables`: span tables (which summaries exist at a length, which
  query reads which summary);
* :mod:`~attncompiler.families.combiner.pattern`: the pattern nodes, their tables and the constructors;
* :mod:`~attncompiler.families.combiner.joint`: the joint mask over ``[keys ; padding ; summary slots]``
  that lets the shared :class:`~attncompiler.program.stages.BlockSparseAttention` stage compute the
  joint softmax, and the arrangement of the summary slots;
* :mod:`~attncompiler.families.combiner.program`: the program stages and the lowering;
* :mod:`~attncompiler.families.combiner.reference`: the float64 reference.
"""

from .joint import JointMask, SlotPlan, slot_plan
from .pattern import (AXIAL_VARIANTS, FAMILY, POOLS, Combiner, CombinerAxial, CombinerFixed, CombinerLogsparse,
                      CombinerMixture, combiner_axial, combiner_fixed, combiner_logsparse, combiner_mixture,
                      span_table)
from .program import ConcatSummaries, MixOutputs, ReorderTokens, SpanAttention, SpanPool, lower_combiner
from .reference import combiner_reference, summary_membership, summary_readers
from .tables import SpanGroup, SpanTable

__all__ = [
    "AXIAL_VARIANTS", "FAMILY", "POOLS", "Combiner", "CombinerAxial", "CombinerFixed", "CombinerLogsparse",
    "CombinerMixture", "ConcatSummaries", "JointMask", "MixOutputs", "ReorderTokens", "SpanAttention",
    "SlotPlan", "SpanGroup", "SpanPool", "SpanTable", "combiner_axial", "combiner_fixed", "combiner_logsparse",
    "combiner_mixture", "combiner_reference", "lower_combiner", "slot_plan", "span_table", "summary_membership",
    "summary_readers",
]
