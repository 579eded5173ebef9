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

from ...dsl.pattern import Pattern, check_int
from ...dsl.pattern import causal as _causal
from ...dsl.primitives import sliding_window as _sliding_window
from ...errors import InputError, PatternError

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
