"""Combiner program stages and lowering.

Per factorization: pool the spans (:class:`SpanPool`), compute each summary's local expectation
(:class:`SpanAttention`), lay the summaries after the keys (:class:`ConcatSummaries`), then one
joint block-sparse softmax over ``[keys ; summaries]`` (the shared
:class:`~attncompiler.program.stages.BlockSparseAttention` with a :class:`~attncompiler.families.combiner.joint.JointMask`);
mixtures average the factorizations' outputs (:class:`MixOutputs`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .joint import JointMask
from .pattern import FAMILY, Combiner
from ...program.stages import BlockSparseAttention, Program, Stage
from ...program.schedule import Schedule


@dataclass(frozen=True)
class SpanPool(Stage):
    """``q_sum, k_sum [B, H(kv), S, D]``: each summary's pooled query and key (max or mean)."""

    inputs: tuple[str, ...] = ("q", "k")
    outputs: tuple[str, ...] = ("q_sum", "k_sum")
    factorization: Combiner | None = None

    def describe(self) -> str:
        return f"SpanPool[{self.factorization.pool}]({self.factorization!r})"


@dataclass(frozen=True)
class SpanAttention(Stage):
    """``v_sum [B, H, S, Dv]``: each summary's local expectation
    ``sum_j softmax_j(scale q_S . k_j) v_j`` over its span."""

    inputs: tuple[str, ...] = ("q_sum", "k", "v")
    outputs: tuple[str, ...] = ("v_sum",)
    factorization: Combiner | None = None

    def describe(self) -> str:
        return f"SpanAttention({self.factorization!r})"


@dataclass(frozen=True)
class ConcatSummaries(Stage):
    """``k_cat = [k ; 0 ; k_sum[slots]]``, ``v_cat = [v ; 0 ; v_sum[slots]]`` with the summary
    slots starting at ``L`` rounded up to ``align`` (key/value heads expanded to the query
    heads). The slots are those of ``joint``'s :func:`~attncompiler.families.combiner.joint.slot_plan`
    (padding slots are zero); without ``joint``, one slot per summary in id order."""

    inputs: tuple[str, ...] = ("k", "v", "k_sum", "v_sum")
    outputs: tuple[str, ...] = ("k_cat", "v_cat")
    align: int = 128
    joint: JointMask | None = None

    def describe(self) -> str:
        slots = "" if self.joint is None or self.joint.pack is None else f", slots for blocks {self.joint.pack}"
        return f"ConcatSummaries(align={self.align}{slots})"


@dataclass(frozen=True)
class ReorderTokens(Stage):
    """Put the first ``L`` positions of each input (along the sequence) into the
    factorization's token order, or (``inverse``) back; the rest (padding, summaries) stays."""

    inputs: tuple[str, ...] = ("q", "k_cat", "v_cat")
    outputs: tuple[str, ...] = ("q_ord", "k_ord", "v_ord")
    factorization: Combiner | None = None
    inverse: bool = False

    def describe(self) -> str:
        return f"ReorderTokens({'inverse, ' if self.inverse else ''}{self.factorization!r})"


@dataclass(frozen=True)
class MixOutputs(Stage):
    """``out = mean(outputs of the factorizations)`` (Combiner-Mixture)."""

    inputs: tuple[str, ...] = ("out_0", "out_1")
    outputs: tuple[str, ...] = ("out",)

    def describe(self) -> str:
        return f"MixOutputs(M={len(self.inputs)})"


def lower_combiner(pattern: Combiner, schedule: Schedule) -> Program:
    """Summaries (pool, local expectation), then one joint block-sparse softmax per
    factorization over ``[keys ; summary slots]`` (slots arranged for the schedule's blocks);
    mixtures average the outputs."""
    align = math.lcm(schedule.block_n, 128)
    parts = pattern.factorizations()
    stages: list[Stage] = []
    for i, f in enumerate(parts):
        n = (lambda x: x) if len(parts) == 1 else (lambda x, i=i: f"{x}_{i}")
        joint = JointMask(f, align, (schedule.block_m, schedule.block_n))
        stages += [
            SpanPool(("q", "k"), (n("q_sum"), n("k_sum")), f),
            SpanAttention((n("q_sum"), "k", "v"), (n("v_sum"),), f),
            ConcatSummaries(("k", "v", n("k_sum"), n("v_sum")), (n("k_cat"), n("v_cat")), align, joint),
        ]
        if f.token_order(1) is None:
            stages.append(BlockSparseAttention(("q", n("k_cat"), n("v_cat")), (n("out"), n("lse")), joint, schedule))
        else:  # attend in the factorization's token order, then restore the original order
            ordered = (n("q_ord"), n("k_ord"), n("v_ord"))
            stages += [
                ReorderTokens(("q", n("k_cat"), n("v_cat")), ordered, f),
                BlockSparseAttention(ordered, (n("out_ord"), n("lse_ord")), joint, schedule),
                ReorderTokens((n("out_ord"), n("lse_ord")), (n("out"), n("lse")), f, inverse=True),
            ]
    if len(parts) > 1:
        stages.append(MixOutputs(tuple(f"out_{i}" for i in range(len(parts))), ("out",)))
    return Program(pattern, tuple(stages))


LOWERINGS = {FAMILY: lower_combiner}  # read by program.stages.lower
