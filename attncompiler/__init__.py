"""attncompiler: declare attention patterns, analyze them, compile them to fast kernels."""

from .errors import (AttnCompilerError, CodegenError, InputError, LayoutError, LoweringError, PatternError,
                     ScheduleError, UnexpectedArgumentError, UnsupportedError)
from .ir.expr import Expr, maximum, minimum, where
from .dsl.pattern import Pattern, intersection, per_head, union
from .dsl.primitives import (block_local, block_window, causal, dilated_window, document, full, global_tokens, mask,
                             prefix_lm, random_blocks, sliding_window, strided)
from .layout.block_layout import BlockLayout, build_layout
from .program.schedule import Schedule
from .program.stages import Program, lower
from .program.reference import reference
from .runtime.module import CompiledAttention, compile
from .families.diffusion.diffusion import diffuse
from .families.combiner.pattern import combiner_axial, combiner_fixed, combiner_logsparse, combiner_mixture
from .families.memory.memory import (ClusterControl, LinformerControl, MemoryAttention, MLPControl, WindowControl,
                                     memory)

__version__ = "0.1.0"
from .analysis.report import AnalysisReport, analyze
from . import nn
from .families.reuse.plan import ReusePlan, reuse_savings
from .families.reuse.similarity import attention_similarity, suggest_reuse
