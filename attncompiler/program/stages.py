"""The program IR: a pattern lowered to a short list of stages, each with a schedule.

A stage is a compute definition over named values (``q``, ``k``, ``v`` in; ``out``, ``lse``
out) with symbolic shapes. Lowering is registered per pattern family, so structural families
(summaries, diffusion, memory) add their stages without touching this module. Passes are plain
``Program -> Program`` functions run by :func:`run_passes`; ``ATTNC_DEBUG=1`` checks every
pass's output, ``ATTNC_DEBUG=2`` also prints it.
"""

from __future__ import annotations

import importlib

import dataclasses
import os
from dataclasses import dataclass
from typing import Callable, ClassVar, Sequence

from ..errors import LoweringError
from ..dsl.pattern import Family, Pattern
from .schedule import Schedule


@dataclass(frozen=True)
class Stage:
    """Base class of program stages."""

    inputs: tuple[str, ...] = ("q", "k", "v")
    outputs: tuple[str, ...] = ("out", "lse")
    optional_inputs: ClassVar[tuple[str, ...]] = ()
    """Names the stage reads when the caller passes them (e.g. ABC's ``control`` logits)."""

    def describe(self) -> str:
        return type(self).__name__


@dataclass(frozen=True)
class BlockSparseAttention(Stage):
    """``out, lse = softmax(scale * q k^T + mask) v`` over a block layout (online softmax).

    Shapes: q ``[B, H, Lq, D]``, k ``[B, Hkv, Lk, D]``, v ``[B, Hkv, Lk, Dv]`` ->
    out ``[B, H, Lq, Dv]``, lse ``[B, H, Lq]``. Full blocks skip the mask; partial blocks
    evaluate the pattern's predicate.
    """

    pattern: Pattern | None = None
    schedule: Schedule = Schedule()

    def describe(self) -> str:
        return f"BlockSparseAttention({self.pattern!r}) with {self.schedule}"


@dataclass(frozen=True)
class Program:
    """A lowered pattern: its stages in execution order."""

    pattern: Pattern
    stages: tuple[Stage, ...]

    def __str__(self) -> str:
        lines = [f"program for {self.pattern!r}:"]
        for i, s in enumerate(self.stages):
            lines.append(f"  [{i}] {', '.join(s.outputs)} = {s.describe()}({', '.join(s.inputs)})")
        return "\n".join(lines)

    def call_inputs(self) -> tuple[str, ...]:
        """Names a call supplies besides q, k, v: what a stage reads (required or optional) that no
        earlier stage produces. ``param:*`` names are supplied by the module holding the parameter.
        A forward call accepts exactly these keywords (plus ``scale`` and ``return_lse``)."""
        have, need = {"q", "k", "v"}, []
        for s in self.stages:
            need += [x for x in (*s.inputs, *s.optional_inputs) if x not in have and x not in need]
            have.update(s.outputs)
        return tuple(need)

    def with_schedule(self, schedule: Schedule) -> Program:
        """The same program with every schedulable stage using ``schedule``."""
        return dataclasses.replace(self, stages=tuple(
            dataclasses.replace(s, schedule=schedule) if hasattr(s, "schedule") else s for s in self.stages))


# The families beyond masks, by module: each exports ``LOWERINGS`` (family -> lowering), read on
# first use (the families build on this layer, so the table names them instead of importing them).
LOWERING_MODULES = ("attncompiler.families.combiner.program", "attncompiler.families.diffusion.program",
                    "attncompiler.families.memory.program")


def lower_mask(pattern: Pattern, schedule: Schedule) -> Program:
    """A mask pattern is one block-sparse attention stage."""
    return Program(pattern, (BlockSparseAttention(pattern=pattern, schedule=schedule),))


_LOWERINGS: dict[str, Callable[[Pattern, Schedule], Program]] = {Family.MASK: lower_mask}
_LOADED: list[bool] = []


def register_lowering(family: str):
    """Register ``fn(pattern, schedule) -> Program`` as the lowering of a family defined outside
    the package (the package's own families are listed in :data:`LOWERING_MODULES`)."""

    def deco(fn):
        _LOWERINGS[family] = fn
        return fn

    return deco


def lowering(family: str) -> Callable[[Pattern, Schedule], Program] | None:
    """The lowering of ``family``, loading :data:`LOWERING_MODULES` on first use."""
    if not _LOADED:
        for name in LOWERING_MODULES:
            for fam, fn in importlib.import_module(name).LOWERINGS.items():
                _LOWERINGS.setdefault(fam, fn)
        _LOADED.append(True)
    return _LOWERINGS.get(family)


def lower(pattern: Pattern, schedule: Schedule | None = None) -> Program:
    """Lower a pattern to its program (the first pass of every pipeline)."""
    if not isinstance(pattern, Pattern):
        raise LoweringError(f"expected an attention pattern, got {type(pattern).__name__} {pattern!r}")
    fn = lowering(pattern.family)
    if fn is None:
        raise LoweringError(f"no lowering registered for {pattern.family} patterns ({pattern!r})")
    return fn(pattern, schedule or Schedule())


def check_program(program: Program) -> None:
    """Internal invariants: every stage input is produced earlier or is a program input."""
    have = {"q", "k", "v"}
    for s in program.stages:
        missing = [x for x in s.inputs if x not in have and not x.startswith("param:")]
        if missing:
            raise LoweringError(f"stage {s.describe()} reads {missing} that no earlier stage produces")
        have.update(s.outputs)
    if "out" not in have:
        raise LoweringError(f"program for {program.pattern!r} never produces 'out'")


def run_passes(program: Program, passes: Sequence[tuple[str, Callable[[Program], Program]]]) -> Program:
    """Run named ``Program -> Program`` passes in order (checked/printed under ATTNC_DEBUG)."""
    debug = int(os.environ.get("ATTNC_DEBUG", "0") or 0)
    for name, fn in passes:
        program = fn(program)
        if debug >= 1:
            check_program(program)
        if debug >= 2:
            print(f"--- after pass {name} ---\n{program}")
    return program
