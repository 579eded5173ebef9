"""The dense rewrite: a mask pattern that is exactly ``full()`` or exactly causal lowers to a
:class:`DenseAttention` stage, which a backend may run with a fused dense kernel.

The recogniser is structural and conservative: it proves the mask equal to "every key" or to
"key k visible iff k <= q" from the pattern tree alone (``full()``, ``causal()``, ``&``, ``|``
and per-head lists of those, and traced ``ac.mask`` functions that the DSL's rewrite table
recognises as such). Anything else keeps its block-sparse stage.

:class:`DenseAttention` is a :class:`~attncompiler.program.stages.BlockSparseAttention` (same
pattern, same schedule, same semantics), so every backend may run it with its block-sparse
implementation, and code that inspects block-sparse stages keeps working.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..dsl.mask_mod import Mask
from ..dsl.pattern import Causal, Family, Intersection, Pattern, PerHead, Union
from ..dsl.primitives import Full
from .stages import BlockSparseAttention, Program

FULL, CAUSAL = "full", "causal"


@dataclass(frozen=True)
class DenseAttention(BlockSparseAttention):
    """Block-sparse attention whose pattern is provably dense: ``full()`` (``causal=False``) or
    top-left causal (``causal=True``, key k visible to query q iff k <= q). A backend with a
    fused dense kernel (SDPA's flash kernel on CPU) runs it there; any other backend, dtype or
    call-time positions run the block-sparse implementation of ``pattern``."""

    causal: bool = False

    def describe(self) -> str:
        kind = CAUSAL if self.causal else FULL
        return f"DenseAttention({kind}: {self.pattern!r}) with {self.schedule}"


def dense_kind(pattern: Pattern) -> str | None:
    """``"full"`` or ``"causal"`` when ``pattern`` provably equals ``full()`` / ``causal()`` as
    a mask for every length, batch entry and head; None when the recogniser cannot prove it."""
    if getattr(pattern, "family", None) != Family.MASK:
        return None
    if isinstance(pattern, Full):
        return FULL
    if isinstance(pattern, Causal):
        return CAUSAL
    if isinstance(pattern, Mask):
        if pattern.expr is None or pattern.expr.variables() & {"b", "h"}:
            return None
        structure = pattern.structure()
        return None if structure is None or isinstance(structure, Mask) else dense_kind(structure)
    if isinstance(pattern, (Intersection, Union, PerHead)):
        kinds = [dense_kind(p) for p in pattern.children()]
        if not kinds or None in kinds:
            return None
        if isinstance(pattern, PerHead):
            return kinds[0] if len(set(kinds)) == 1 else None
        if isinstance(pattern, Intersection):  # full & x == x; causal & causal == causal
            return CAUSAL if CAUSAL in kinds else FULL
        return FULL if FULL in kinds else CAUSAL  # full | x == full; causal | causal == causal
    return None


def fuse_dense(program: Program) -> Program:
    """The pass: every plain ``BlockSparseAttention`` stage of a mask program (reading q, k, v)
    whose pattern is exactly full or causal becomes a :class:`DenseAttention` stage."""
    if program.pattern.family != Family.MASK:
        return program
    stages = []
    for s in program.stages:
        kind = (dense_kind(s.pattern) if type(s) is BlockSparseAttention and s.pattern is not None
                and s.inputs == ("q", "k", "v") else None)
        if kind is not None:
            s = DenseAttention(**{f.name: getattr(s, f.name) for f in dataclasses.fields(s)},
                               causal=kind == CAUSAL)
        stages.append(s)
    return dataclasses.replace(program, stages=tuple(stages))
