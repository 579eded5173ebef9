"""ABC memory program stages (SlotControl, SlotWrite, SlotRead), the lowering, and the control
weights phi shared by the reference, the backends and decoding.
"""

from __future__ import annotations

import torch
from dataclasses import dataclass
from typing import ClassVar

from ...errors import InputError
from ...program.schedule import Schedule
from ...program.stages import BlockSparseAttention, Program, Stage
from .pattern import Control, LinformerControl, MEMORY, MLPControl, Memory, WindowControl

# ---------------------------------------------------------------------------------------------
# Program stages and lowering
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SlotControl(Stage):
    """``slot_weights [B, Hkv, Lk, n]``: control logits (normalized controls) or raw weights.

    Reads ``k`` and the learned parameter ``param:control``; an MLP control takes caller
    logits from the ``control`` input instead when one is passed.
    """

    control: Control = MLPControl()
    slots: int = 1
    inputs: tuple[str, ...] = ("k", "param:control")
    outputs: tuple[str, ...] = ("slot_weights",)
    optional_inputs: ClassVar[tuple[str, ...]] = ("control",)

    def describe(self) -> str:
        return f"SlotControl({self.control!r}, slots={self.slots})"


@dataclass(frozen=True)
class SlotWrite(Stage):
    """Write keys/values into the slots: a chunked prefix scan (causal) or one sum.

    Causal: chunks of ``C = schedule.block_m`` tokens; within a chunk everything is parallel,
    across chunks a per-slot state (``[n, D + Dv]`` sums, normalizer and running max) is
    carried with running log-sum-exp rescaling. Only chunk-boundary states are stored
    (``[T / C, n, D]``), never a per-token ``[T, n, D]`` memory.
    """

    slots: int = 1
    causal: bool = False
    normalized: bool = True
    schedule: Schedule = Schedule()
    inputs: tuple[str, ...] = ("k", "v", "slot_weights")
    outputs: tuple[str, ...] = ("memory",)

    def describe(self) -> str:
        kind = "causal prefix scan" if self.causal else "sum"
        return f"SlotWrite({kind}, slots={self.slots}, chunk={self.schedule.block_m})"


@dataclass(frozen=True)
class SlotRead(Stage):
    """``out_i = softmax_n(scale q_i K~_i^T) V~_i`` (empty slots excluded); ``lse`` over slots.

    ``memory`` (from SlotWrite) carries the chunked keys, values and write weights that the
    within-chunk part of a causal read needs, so the read takes only ``q`` besides it.
    """

    causal: bool = False
    normalized: bool = True
    schedule: Schedule = Schedule()
    inputs: tuple[str, ...] = ("q", "memory")
    outputs: tuple[str, ...] = ("out", "lse")

    def describe(self) -> str:
        return f"SlotRead({'causal' if self.causal else 'bidirectional'})"


def _lower_memory(pattern: Memory, schedule: Schedule) -> Program:
    if isinstance(pattern.control, WindowControl):
        # A FIFO memory of n tokens is causal sliding-window attention: reuse the mask stage.
        return Program(pattern, (BlockSparseAttention(pattern=pattern.window_pattern(), schedule=schedule),))
    norm = pattern.control.normalized
    return Program(pattern, (
        SlotControl(control=pattern.control, slots=pattern.slots),
        SlotWrite(slots=pattern.slots, causal=pattern.is_causal, normalized=norm, schedule=schedule),
        SlotRead(causal=pattern.is_causal, normalized=norm, schedule=schedule),
    ))


# ---------------------------------------------------------------------------------------------
# Control weights (shared by the reference, the backends and decoding)
# ---------------------------------------------------------------------------------------------

def control_weights(pattern: Memory, k: torch.Tensor, param: torch.Tensor | None,
                    control: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, Hkv, Lk, n]`` logits (MLP, cluster: -inf off the chosen slot) or weights (Linformer).

    Args:
        pattern: the memory pattern.
        k: keys ``[B, Hkv, Lk, D]`` (their dtype is kept).
        param: the control's learned parameter (see :meth:`Control.param_shape`).
        control: caller logits ``[B, Hkv, Lk, n]`` (MLP control only).
    """
    B, Hkv, Lk, D = k.shape
    n, c = pattern.slots, pattern.control
    if control is not None:
        if not isinstance(c, MLPControl):
            raise InputError(f"control= logits are only accepted by ac.MLPControl(), not {c!r}")
        if not isinstance(control, torch.Tensor) or tuple(control.shape) != (B, Hkv, Lk, n):
            got = tuple(control.shape) if isinstance(control, torch.Tensor) else type(control).__name__
            raise InputError(f"control logits must be [B, Hkv, Lk, n] = {(B, Hkv, Lk, n)}, got {got}")
        if not bool(torch.isfinite(control).all()):
            raise InputError("control logits contain NaN or inf; pass finite logits")
        return control.to(k.dtype)
    shape = c.param_shape(n, D)
    if param is None or tuple(param.shape) != shape:
        got = None if param is None else tuple(param.shape)
        raise InputError(f"{c!r} needs a parameter of shape {shape}, got {got} "
                         "(use ac.compile(pattern), which holds it, or pass param=)")
    param = param.to(k.dtype)
    if isinstance(c, MLPControl):
        return k @ param  # [B, Hkv, Lk, n]
    if isinstance(c, LinformerControl):
        pattern.validate(Lk, Lk)
        return param[:, :Lk].t().expand(B, Hkv, Lk, n)  # phi_j = E[:, j]
    # Cluster: nearest centroid by squared distance; the assignment carries no gradient.
    with torch.no_grad():
        d2 = (param * param).sum(-1) - 2 * (k @ param.t())  # [B, Hkv, Lk, n] (|k|^2 is constant per row)
        hit = torch.nn.functional.one_hot(d2.argmin(-1), n).bool()
    return torch.zeros_like(d2).masked_fill(~hit, float("-inf"))


LOWERINGS = {MEMORY: _lower_memory}  # read by program.stages.lower
