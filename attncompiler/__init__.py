"""attncompiler: declare attention patterns, analyze them, compile them to fast kernels.

Every public name (``ac.sliding_window``, ``ac.compile``, ``ac.analyze``, ``ac.nn``, ...) is
loaded on first use from the module that defines it (PEP 562), so ``import attncompiler`` and
``attnc --help`` stay fast: torch, sympy, networkx and triton load only when something needs them.
"""

from __future__ import annotations

import importlib

from .errors import (AttnCompilerError, CodegenError, InputError, LayoutError, LoweringError, PatternError,
                     ScheduleError, UnexpectedArgumentError, UnsupportedError)
from .version import __version__

# public name -> defining module (relative to this package)
_LAZY: dict[str, str] = {
    **dict.fromkeys(("Expr", "maximum", "minimum", "where"), ".ir.expr"),
    **dict.fromkeys(("Pattern", "intersection", "per_head", "union", "causal"), ".dsl.pattern"),
    **dict.fromkeys(("block_local", "block_window", "dilated_window", "document", "full", "global_tokens",
                     "prefix_lm", "random_blocks", "sliding_window", "strided"), ".dsl.primitives"),
    "mask": ".dsl.mask_mod",
    **dict.fromkeys(("ScoreMod", "alibi", "alibi_slopes", "bias", "compose", "relative_bias", "softcap"),
                    ".dsl.score_mod"),
    **dict.fromkeys(("BlockLayout", "build_layout"), ".layout.block_layout"),
    "Schedule": ".program.schedule",
    **dict.fromkeys(("Program", "lower"), ".program.stages"),
    "reference": ".program.reference",
    "CompiledAttention": ".runtime.module",
    "compile": ".runtime.compile",
    "diffuse": ".families.diffusion.pattern",
    **dict.fromkeys(("combiner_axial", "combiner_fixed", "combiner_logsparse", "combiner_mixture"),
                    ".families.combiner.pattern"),
    **dict.fromkeys(("ClusterControl", "LinformerControl", "MLPControl", "WindowControl", "memory"),
                    ".families.memory.pattern"),
    "MemoryAttention": ".runtime.memory",
    **dict.fromkeys(("ReusePlan", "reuse_savings"), ".families.reuse.plan"),
    **dict.fromkeys(("attention_similarity", "suggest_reuse"), ".families.reuse.similarity"),
    **dict.fromkeys(("analyze", "AnalysisReport"), ".analysis.report"),
}
# subpackages reachable as attributes (``ac.nn``, ``ac.analysis``, ...)
_SUBMODULES = frozenset({"nn", "analysis", "patterns", "codegen", "distributed", "integrations", "bench", "cli"})


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    elif name in _SUBMODULES:
        try:
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module 'attncompiler' has no attribute {name!r}") from None
    else:
        raise AttributeError(f"module 'attncompiler' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | _SUBMODULES)
