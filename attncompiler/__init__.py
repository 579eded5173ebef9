"""attncompiler: declare attention patterns, analyze them, compile them to fast kernels."""

from .errors import (AttnCompilerError, CodegenError, InputError, LayoutError, LoweringError,
                     PatternError, ScheduleError, UnexpectedArgumentError, UnsupportedError)
from .expr import Expr, maximum, minimum, where
from .pattern import (Pattern, block_local, block_window, causal, dilated_window, document, full,
                      global_tokens, intersection, mask, per_head, prefix_lm, random_blocks,
                      sliding_window, strided, union)
from .layout import BlockLayout, build_layout
from .schedule import Schedule
from .program import Program, lower
from .reference import reference
from .module import CompiledAttention, compile
from .diffusion import diffuse
from .combiner import combiner_axial, combiner_fixed, combiner_logsparse, combiner_mixture
from .memory_slots import (ClusterControl, LinformerControl, MemoryAttention, MLPControl, WindowControl,
                     memory)

__version__ = "0.1.0"
from .analysis import AnalysisReport, analyze
from . import nn
from .reuse import ReusePlan, attention_similarity, reuse_savings, suggest_reuse
