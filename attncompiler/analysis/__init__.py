"""Pattern analysis: attention graphs, reachability, expansion and cost.

``analyze(pattern, seq_len)`` is the entry point. Other families plug in through two
registries: :func:`register_graph_builder` (reach and expansion work on any graph, with the
layer semantics of :mod:`.graph` for summary/memory nodes) and :func:`register_cost`
(closed-form cost).
"""

from . import mask_graph as _mask_graph  # noqa: F401  (registers the "mask" graph builder)
from .cost import BlockCost, SymbolicCost, asymptotic_class, block_cost, register_cost, symbolic_cost
from .expansion import ExpansionResult, expansion
from .graph import (ATTEND, EDGE_KIND_NAMES, HOP, MEMORY, NODE_KIND_NAMES, READ, SUMMARY, TOKEN, WRITE,
                    AttentionGraph, attention_graph, layer_operator, layer_path, register_graph_builder)
from .quotient import Quotient, from_graph
from .reach import ReachResult, causality_witness, legal_pairs, reach, receptive_field
from .report import AnalysisReport, CostReport, analyze, compare_table

__all__ = ["AnalysisReport", "AttentionGraph", "BlockCost", "CostReport", "ExpansionResult", "Quotient",
           "ReachResult", "SymbolicCost", "analyze", "asymptotic_class", "attention_graph", "block_cost",
           "causality_witness", "compare_table", "expansion", "from_graph", "layer_operator", "layer_path",
           "legal_pairs", "reach", "receptive_field", "register_cost", "register_graph_builder", "symbolic_cost",
           "ATTEND", "WRITE", "READ", "HOP", "TOKEN", "SUMMARY", "MEMORY", "EDGE_KIND_NAMES", "NODE_KIND_NAMES"]

# Graph builders and costs of the structural families (after the registries above exist).
from . import combiner as _combiner  # noqa: E402,F401
from . import diffusion as _diffusion  # noqa: E402,F401
from . import memory as _memory  # noqa: E402,F401
