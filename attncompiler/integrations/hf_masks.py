"""What a transformers mask hook is asked for, read back as attncompiler patterns and call data.

transformers builds a FlexAttention-style ``mask_function`` from a few known pieces
(``causal_mask_function``, ``sliding_window_overlay``, packed-sequence pieces, ...) and calls the
registered mask hook once per mask kind and forward. :func:`build_layout` takes that call apart:
the pieces become an :class:`HFLayout` (the model's pattern, the 2D padding as one valid key range
per row, packed documents as per-row document lengths, the cache offsets), which every layer's
attention call then uses without building anything again. A piece it does not know raises
:class:`~attncompiler.errors.UnsupportedError` rather than being dropped: a mask silently ignored
would be a wrong answer without an error.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..dsl.pattern import Pattern, causal
from ..dsl.primitives import full, sliding_window
from ..errors import UnsupportedError

CAUSAL = "causal"
BIDIRECTIONAL = "bidirectional"


@dataclass(frozen=True, eq=False)
class HFLayout:
    """Everything one forward's attention calls need, built once by the mask hook.

    Key ``j`` of a layer's key tensor sits at absolute position ``kv_offset + j``; query row ``i``
    at ``q_offset + i``. ``starts``/``ends`` (int64 ``[B]``, or None without padding) bound the
    valid keys of each row of the key tensor (the 2D padding mask must be one run of ones per
    row). ``documents`` (one tuple of document lengths per row, or None) are packed sequences.
    ``base`` is ``"causal"`` or ``"bidirectional"``; ``window`` is transformers' sliding window:
    ``q - k < window`` for causal masks, ``|q - k| <= window`` for bidirectional ones.
    """

    batch: int
    q_length: int
    kv_length: int
    q_offset: int
    kv_offset: int
    base: str
    window: int | None
    starts: np.ndarray | None
    ends: np.ndarray | None
    documents: tuple[tuple[int, ...], ...] | None

    @property
    def pattern(self) -> Pattern:
        """The model's own mask as an attncompiler pattern (positions relative to the keys)."""
        return layout_pattern(self.base, self.window)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """The 4D shape of the dense mask this layout stands for (``[B, 1, Lq, Lk]``)."""
        return (self.batch, 1, self.q_length, self.kv_length)


@functools.lru_cache(maxsize=64)
def layout_pattern(base: str, window: int | None) -> Pattern:
    """:attr:`HFLayout.pattern`, built once per mask kind (every layer call asks; ``window`` is an int
    read by :func:`build_layout`)."""
    return model_pattern(base == CAUSAL, window, bidirectional_inclusive=True)


def model_pattern(is_causal: bool, window: int | None, *, bidirectional_inclusive: bool) -> Pattern:
    """The pattern of a causal or bidirectional layer with an optional sliding window.

    A causal window ``W`` means ``q - k < W`` (transformers' ``sliding_window``). A bidirectional
    window means ``|q - k| <= W`` when ``bidirectional_inclusive`` (the mask functions of
    masking_utils) and ``|q - k| < W`` otherwise (the ``sliding_window`` keyword of attention calls).
    """
    if window is None:
        return causal() if is_causal else full()
    if is_causal:
        if window < 1:
            raise UnsupportedError(f"sliding_window={window} must be >= 1 (it counts the query itself)")
        return causal() & sliding_window(window - 1)
    return sliding_window(window if bidirectional_inclusive else window - 1)


def build_layout(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0,
                 mask_function: Callable | None = None, attention_mask: torch.Tensor | None = None) -> HFLayout:
    """Read one mask-hook call (see transformers' ``sdpa_mask``) into an :class:`HFLayout`."""
    pieces = flatten_and(mask_function) if mask_function is not None else []
    base, window, packed = None, None, None
    names = [piece_name(p) for p in pieces]
    for fn, name in zip(pieces, names):
        if name == "causal_mask_function":
            base = CAUSAL
        elif name == "bidirectional_mask_function":
            base = base or BIDIRECTIONAL
        elif name in ("sliding_window_overlay.<locals>.inner_mask",
                      "sliding_window_bidirectional_overlay.<locals>.inner_mask"):
            window = int(cell(fn, "sliding_window"))
        elif name == "packed_sequence_mask_function.<locals>.inner_mask":
            packed = cell(fn, "packed_sequence_mask")
        else:
            raise UnsupportedError(
                f"the transformers mask piece {name!r} has no attncompiler equivalent here (known: causal, "
                "bidirectional, sliding windows, packed sequences, padding); use attn_implementation='sdpa' for "
                "this model, or give its layers explicit patterns with set_patterns")
    if base is None:
        base = BIDIRECTIONAL
    if window is not None and base == CAUSAL and "sliding_window_bidirectional_overlay.<locals>.inner_mask" in names:
        raise UnsupportedError("a bidirectional sliding window on a causal mask is not a transformers mask kind")
    q_offset, kv_offset = int(q_offset), int(kv_offset)
    starts, ends = padding_ranges(attention_mask, batch_size, kv_length, kv_offset)
    documents = None
    if packed is not None:
        if q_offset or kv_offset or q_length != kv_length:
            raise UnsupportedError(f"packed sequences with a KV cache (q_offset={q_offset}, kv_offset={kv_offset}); "
                                   "pack only without a cache, as transformers does")
        documents = packed_documents(packed, batch_size)
    return HFLayout(batch_size, q_length, kv_length, q_offset, kv_offset, base, window, starts, ends, documents)


def flatten_and(fn: Callable) -> list[Callable]:
    """The conjuncts of an ``and_masks`` tree; a packed-sequence position remap is looked through
    (within one packed document it shifts query and key alike, so relative masks are unchanged)."""
    name = piece_name(fn)
    if name == "and_masks.<locals>.and_mask":
        return [p for sub in cell(fn, "mask_functions") for p in flatten_and(sub)]
    if name == "remap_positions_for_packed_sequence.<locals>.inner_mask":
        return flatten_and(cell(fn, "mask_function"))
    return [fn]


def piece_name(fn: Callable) -> str:
    """The qualified name of a mask piece (module-level functions and the closures of masking_utils)."""
    return getattr(fn, "__qualname__", type(fn).__name__)


def cell(fn: Callable, name: str):
    """The value a closure captured under ``name``."""
    code = fn.__code__
    if name not in code.co_freevars:
        raise UnsupportedError(f"mask piece {piece_name(fn)!r} has no captured {name!r}; this transformers "
                               "version builds masks differently from what attncompiler reads")
    return fn.__closure__[code.co_freevars.index(name)].cell_contents


def padding_ranges(attention_mask: torch.Tensor | None, batch: int, kv_length: int,
                   kv_offset: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Valid key range ``[start, end)`` of each row in the layer's key window, or ``(None, None)``.

    Raises:
        UnsupportedError: a row whose padding mask is not one run of ones (holes in the middle).
    """
    if attention_mask is None:
        return None, None
    if attention_mask.dim() != 2:
        raise UnsupportedError(f"a {attention_mask.dim()}D attention_mask reached the mask hook; pass a 2D padding "
                               "mask [batch, length] (a prepared 4D mask is not read by attncompiler)")
    m = attention_mask.detach().to("cpu", torch.bool).numpy()
    need = kv_offset + kv_length
    if m.shape[1] < need:  # transformers pads the mask with zeros (unwritten static-cache slots)
        m = np.pad(m, ((0, 0), (0, need - m.shape[1])))
    m = m[:, kv_offset:need]
    if m.shape[0] != batch:
        m = np.broadcast_to(m, (batch, kv_length))
    if m.all():
        return None, None
    count = m.sum(1)
    first = np.where(count > 0, m.argmax(1), 0)
    last = np.where(count > 0, kv_length - m[:, ::-1].argmax(1), 0)
    holes = np.flatnonzero(count != last - first)
    if len(holes):
        b = int(holes[0])
        raise UnsupportedError(f"the padding mask of batch row {b} is not one run of ones (valid keys "
                               f"{np.flatnonzero(m[b])[:8].tolist()}...); attncompiler reads left/right padding only")
    return first.astype(np.int64), last.astype(np.int64)


def packed_documents(packed: torch.Tensor, batch: int) -> tuple[tuple[int, ...], ...]:
    """Per row, the lengths of the packed documents (transformers' sequence ids ``[B, L]``)."""
    ids = packed.detach().to("cpu").numpy()
    if ids.shape[0] != batch:
        ids = np.broadcast_to(ids, (batch, ids.shape[1]))
    out = []
    for row in ids:
        cuts = np.flatnonzero(np.diff(row) != 0) + 1
        bounds = np.concatenate([[0], cuts, [len(row)]])
        out.append(tuple(int(n) for n in np.diff(bounds)))
    return tuple(out)
