"""attncompiler: declare attention patterns, analyze them, compile them to fast kernels."""

from .errors import (AttnCompilerError, CodegenError, InputError, LayoutError, LoweringError, PatternError,
                     ScheduleError, UnexpectedArgumentError, UnsupportedError)
from .ir.expr import Expr, maximum, minimum, where
from .dsl.pattern import Pattern, intersection, per_head, union
from .dsl.primitives import (block_local, block_window, dilated_window, document, full, global_tokens, prefix_lm,
                             random_blocks, sliding_window, strided)
from .dsl.mask_mod import mask
from .dsl.pattern import causal
from .layout.block_layout import BlockLayout, build_layout
from .program.schedule import Schedule
from .program.stages import Program, lower
from .program.reference import reference
from .runtime.module import CompiledAttention
from .runtime.compile import compile
from .families.diffusion.pattern import diffuse
from .families.combiner.pattern import combiner_axial, combiner_fixed, combiner_logsparse, combiner_mixture
from .families.memory.pattern import ClusterControl, LinformerControl, MLPControl, WindowControl, memory
from .runtime.memory import MemoryAttention

from .version import __version__
from . import nn
from .families.reuse.plan import ReusePlan, reuse_savings
from .families.reuse.similarity import attention_similarity, suggest_reuse

# The analysis (scipy, sympy) loads on first use: ``ac.analyze``, ``from attncompiler import analyze``.
_LAZY = {"analyze": "attncompiler.analysis.report", "AnalysisReport": "attncompiler.analysis.report",
         "analysis": "attncompiler.analysis"}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'attncompiler' has no attribute {name!r}")
    import importlib

    module = importlib.import_module(_LAZY[name])
    value = module if module.__name__.endswith("." + name) else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
