"""Bounded-memory attention (ABC, Peng et al., ACL 2022, arXiv 2110.02488): memory slots.

ABC reads attention from a memory of ``n`` slots instead of all ``L`` keys. Writing is
``K~ = sum_j phi_j k_j^T``, ``V~ = sum_j phi_j v_j^T`` (``[n, D]`` each); reading is
``o_i = softmax_n(scale q_i K~^T) V~``. Efficient attentions differ only in the *control*
``phi`` that says how tokens enter the slots; this module makes that a small closed set of
types:

* :class:`MLPControl` (ABC-MLP): ``phi_{j,m} = exp(s_{j,m}) / sum_{j'} exp(s_{j',m})`` over all
  tokens (bidirectional) or over ``j' <= i`` (causal), with logits ``s = k W`` from a learned
  ``W [D, n]`` or passed by the caller (``attn(q, k, v, control=s)``).
* :class:`LinformerControl`: ``phi_j = E[:, j]`` with a learned ``E [n, max_len]``; causal
  form by prefix sums.
* :class:`ClusterControl`: each key goes to the slot of its nearest of ``n`` learned
  centroids; slots hold running means. Empty slots are left out of the read softmax.
* :class:`WindowControl`: a first-in-first-out memory of the last ``n`` tokens, which is
  exactly causal ``sliding_window(n - 1)`` attention, so it lowers to the shared
  ``BlockSparseAttention`` stage.

``ac.compile(memory(...))`` builds a :class:`MemoryAttention` holding the learned control
parameter, with step-by-step decoding (``init_state`` / ``step``, O(n D) state per head).

MLP and cluster controls are both "softmax over tokens" writes (cluster logits are 0 for the
chosen slot and -inf elsewhere), so they share one normalized, chunked write; Linformer's
write is an unnormalized prefix sum.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.parameter import UninitializedParameter

from ...errors import InputError, PatternError
from ...program.inputs import check_keywords, check_qkv, default_scale
from ...dsl.pattern import Pattern, check_int
from ...dsl.primitives import causal as _causal, sliding_window as _sliding_window
from ...program.stages import BlockSparseAttention, Program, Stage, register_lowering
from ...program.reference import register_reference
from ...program.schedule import Schedule

MEMORY = "memory"
"""The ``Pattern.family`` of memory-slot patterns."""


# ---------------------------------------------------------------------------------------------
# Control strategies (a closed set of frozen types)
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Control:
    """How tokens are written into memory slots. Use one of the four subclasses."""

    normalized = True  # phi is a softmax over tokens (running log-sum-exp); else raw weights

    def param_shape(self, slots: int, head_dim: int) -> tuple[int, ...] | None:
        """Shape of the learned parameter this control needs, or None."""
        return None


@dataclass(frozen=True)
class MLPControl(Control):
    """ABC-MLP: learned, contextualized control; logits ``s = k @ W`` with ``W [D, n]``."""

    def param_shape(self, slots, head_dim):
        return (head_dim, slots)

    def __repr__(self) -> str:
        return "ac.MLPControl()"


@dataclass(frozen=True)
class LinformerControl(Control):
    """Linformer as ABC: ``phi_j = E[:, j]`` with a learned ``E [n, max_len]`` (unnormalized)."""

    max_len: int = 4096
    normalized = False

    def __post_init__(self):
        check_int("max_len", self.max_len, 1)

    def param_shape(self, slots, head_dim):
        return (slots, self.max_len)

    def __repr__(self) -> str:
        return f"ac.LinformerControl(max_len={self.max_len})"


@dataclass(frozen=True)
class ClusterControl(Control):
    """Clustering: each key goes to its nearest of ``n`` learned centroids ``[n, D]``; slots
    hold the running mean of their keys and values."""

    def param_shape(self, slots, head_dim):
        return (slots, head_dim)

    def __repr__(self) -> str:
        return "ac.ClusterControl()"


@dataclass(frozen=True)
class WindowControl(Control):
    """A first-in-first-out memory of the last ``n`` tokens (causal only)."""

    def __repr__(self) -> str:
        return "ac.WindowControl()"


CONTROLS = (MLPControl, LinformerControl, ClusterControl, WindowControl)


# ---------------------------------------------------------------------------------------------
# Pattern node
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Memory(Pattern):
    """Attention through ``slots`` memory slots written by ``control``; see the module docstring."""

    slots: int
    control: Control
    is_causal: bool = False

    family = MEMORY

    def window_pattern(self) -> Pattern:
        """The mask pattern a FIFO memory equals: ``sliding_window(n - 1) & causal()``."""
        return _sliding_window(self.slots - 1) & _causal()

    def validate(self, q_len: int, kv_len: int) -> None:
        if isinstance(self.control, LinformerControl) and kv_len > self.control.max_len:
            raise InputError(f"{kv_len=} exceeds the Linformer projection's max_len={self.control.max_len}; "
                             "build the pattern with a larger max_len")

    def __repr__(self) -> str:
        c = ", causal=True" if self.is_causal else ""
        return f"ac.memory(slots={self.slots}, control={self.control!r}{c})"


def memory(slots: int, control: Control | None = None, causal: bool = False) -> Pattern:
    """Bounded-memory attention (ABC): queries read from ``slots`` memory slots.

    Args:
        slots: the number of memory slots n (>= 1).
        control: how tokens are written: :class:`MLPControl` (default), :class:`LinformerControl`,
            :class:`ClusterControl` or :class:`WindowControl`.
        causal: query i reads a memory holding only tokens j <= i. A window memory is causal
            by definition and requires ``causal=True``.
    """
    n = check_int("slots", slots, 1)
    control = MLPControl() if control is None else control
    if not isinstance(control, Control) or type(control) not in CONTROLS:
        raise PatternError(f"control={control!r} must be one of "
                           f"{', '.join('ac.' + c.__name__ + '()' for c in CONTROLS)}")
    if not isinstance(causal, bool):
        raise PatternError(f"causal={causal!r} must be True or False")
    if isinstance(control, WindowControl) and not causal:
        raise PatternError("a window memory (first in, first out) only exists causally; pass causal=True, "
                           "or use ac.sliding_window(w) for a centered window")
    return Memory(n, control, causal)


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


@register_lowering(MEMORY)
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


# ---------------------------------------------------------------------------------------------
# Float64 reference: the equations, densely
# ---------------------------------------------------------------------------------------------

@register_reference(MEMORY)
def _memory_reference(pattern: Memory, q, k, v, scale, *, param=None, control=None):
    B, H, Lq, D = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    if isinstance(pattern.control, WindowControl):
        kt, vt, valid = _fifo_slots(k, v, pattern.slots, Lq)  # [B, Hkv, Lq, n, D], [Lq, n]
    else:
        s = control_weights(pattern, k, None if param is None else param.double(),
                            None if control is None else control.double())  # [B, Hkv, Lk, n]
        kt, vt, valid = _written_slots(pattern, s, k, v, Lq)
    kt, vt = kt.repeat_interleave(G, 1), vt.repeat_interleave(G, 1)  # GQA: [B, H, Lq, n, *]
    scores = torch.einsum("bhid,bhimd->bhim", q, kt) * scale  # [B, H, Lq, n]
    scores = scores.masked_fill(~valid.repeat_interleave(G, 1), float("-inf"))
    lse = torch.logsumexp(scores, -1)  # [B, H, Lq]
    p = torch.exp(scores - torch.where(torch.isinf(lse), 0, lse)[..., None])  # empty rows: 0
    return torch.einsum("bhim,bhime->bhie", p, vt), lse


def _written_slots(pattern: Memory, s, k, v, Lq):
    """Per-query memories ``K~_i, V~_i [B, Hkv, Lq, n, D]`` and which slots hold anything."""
    Lk = k.shape[2]
    if pattern.control.normalized:
        top = s.amax(2, keepdim=True)  # [B, Hkv, 1, n]; float64 keeps exp(s - top) in range
        w = torch.exp(s - torch.where(torch.isinf(top), 0, top))  # exp(s_{j,m}) up to a per-slot factor
    else:
        w = s
    kw = w[..., None] * k[:, :, :, None, :]  # [B, Hkv, Lk, n, D]: phi_{j,m} k_j
    vw = w[..., None] * v[:, :, :, None, :]
    z = w
    if pattern.is_causal:  # query i reads the prefix j <= i
        kw, vw, z = kw.cumsum(2), vw.cumsum(2), z.cumsum(2)
        at = torch.arange(Lq).clamp(max=Lk - 1)
        kw, vw, z = kw[:, :, at], vw[:, :, at], z[:, :, at]  # [B, Hkv, Lq, n, *]
    else:
        kw, vw, z = (t.sum(2, keepdim=True).expand(*t.shape[:2], Lq, *t.shape[3:]) for t in (kw, vw, z))
    if not pattern.control.normalized:
        return kw, vw, torch.ones(z.shape, dtype=torch.bool)
    valid = z > 0  # cluster slots with no key yet hold nothing
    zs = torch.where(valid, z, 1)[..., None]
    return kw / zs, vw / zs, valid


def _fifo_slots(k, v, n, Lq):
    """FIFO memory: slot m of query i holds token ``i - n + 1 + m`` when that token exists."""
    Lk = k.shape[2]
    j = torch.arange(Lq)[:, None] - n + 1 + torch.arange(n)  # [Lq, n]
    valid = (j >= 0) & (j < Lk)
    jc = j.clamp(0, Lk - 1)
    return k[:, :, jc], v[:, :, jc], valid.expand(k.shape[0], k.shape[1], Lq, n)
