"""Call-time positions of an attention call: ``q_offset``, ``align``, ``cu_seqlens``, ``kv_lens``.

Query row i of batch entry b sits at absolute position ``q_offset[b] + i``, key j at j, and the
pattern is evaluated there (as if its query length were ``q_offset[b] + Lq``).
``align="bottom_right"`` means ``q_offset[b] = kv_len[b] - Lq`` (decoding against a KV cache).
``kv_lens[b]`` keys are valid in batch entry b (the rest is padding, never visible): the entry
is computed as if its key length were ``kv_lens[b]``. ``cu_seqlens`` (``[0, end_0, ..., Lk]``,
FlashAttention's convention) gives the documents of an ``ac.document()`` without lengths; a
``[B, n + 1]`` tensor gives each batch entry its own documents.

Batch entries with equal positions form one :class:`BatchGroup`, run with one layout. The small
tensors are read on the host (a CPU tensor avoids a device sync); validated values are cached
by content, and layouts by value (bounded LRU caches), so a decode loop builds one small layout
per step and never a new pattern, program or kernel.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from ..dsl.pattern import INT_LIMIT, Pattern
from ..dsl.primitives import bind_documents, has_runtime_documents
from ..errors import InputError, UnsupportedError
from ..layout.block_layout import BlockLayout, build_layout
from .inputs import Dims

POSITION_KEYWORDS = ("q_offset", "align", "cu_seqlens", "kv_lens")
ALIGNS = ("top_left", "bottom_right")
INT_DTYPES = (torch.int32, torch.int64)


@dataclass(frozen=True)
class Positions:
    """Where one batch group's rows sit: query row i at ``q_offset + i``; the documents bound to
    an ``ac.document()`` without lengths (zero-length documents dropped), or None."""

    q_offset: int = 0
    doc_lengths: tuple[int, ...] | None = None

    def bind(self, pattern: Pattern) -> Pattern:
        """``pattern`` with its call-time documents filled in."""
        return pattern if self.doc_lengths is None else bind_documents(pattern, self.doc_lengths)


DEFAULT_POSITIONS = Positions()


@dataclass(frozen=True)
class BatchGroup:
    """Batch entries ``index`` (None: every entry, in order) sharing one key length and positions."""

    index: tuple[int, ...] | None
    kv_len: int
    positions: Positions


def is_default(groups: list[BatchGroup], dims: Dims) -> bool:
    """Whether the call is the plain one (every row at its own index, every key valid, no documents)."""
    return (len(groups) == 1 and groups[0].index is None and groups[0].kv_len == dims.kv_len
            and groups[0].positions == DEFAULT_POSITIONS)


def batch_groups(pattern: Pattern, dims: Dims, *, q_offset=0, align: str | None = None, cu_seqlens=None,
                 kv_lens=None) -> list[BatchGroup]:
    """Validate the call-time positions and group batch entries with equal ones.

    Raises:
        InputError: a malformed ``q_offset``, ``align``, ``cu_seqlens`` or ``kv_lens`` (named, with
            the offending values), ``cu_seqlens`` for a pattern without ``ac.document()`` or the
            reverse, or ``align="bottom_right"`` with more queries than keys.
        UnsupportedError: per-batch positions for a pattern whose mask depends on the batch entry.
    """
    if kv_lens is None and cu_seqlens is None and type(q_offset) is int and (align is None or type(align) is str):
        # The common call (a decode step: one int offset or align, no padding, no documents) depends
        # on these values only: validated once per (pattern, shapes, positions), then cached.
        return list(scalar_groups(pattern, dims.batch, dims.q_len, dims.kv_len, q_offset, align))
    return _groups(pattern, dims.batch, dims.q_len, dims.kv_len, q_offset, align, cu_seqlens, kv_lens)


@functools.lru_cache(maxsize=1024)
def scalar_groups(pattern: Pattern, batch: int, q_len: int, kv_len: int, q_offset: int,
                  align: str | None) -> tuple[BatchGroup, ...]:
    """:func:`batch_groups` of an int ``q_offset`` (exactly ``int``, never a bool) or ``align``, without
    ``kv_lens`` or ``cu_seqlens`` (bounded LRU cache; a call that raises is not cached)."""
    if align == "bottom_right" and q_offset == 0 and q_len <= kv_len:
        off = kv_len - q_len
    elif align in (None, "top_left") and 0 <= q_offset <= INT_LIMIT - q_len:
        off = q_offset
    else:  # out of range: the general path raises, naming the values
        return tuple(_groups(pattern, batch, q_len, kv_len, q_offset, align, None, None))
    return (BatchGroup(None, kv_len, Positions(off, _documents(pattern, None, kv_len))),)


def _groups(pattern: Pattern, B: int, Lq: int, Lk: int, q_offset, align, cu_seqlens, kv_lens) -> list[BatchGroup]:
    if align is not None and align not in ALIGNS:
        raise InputError(f"align={align!r} must be one of {ALIGNS} (or None: top_left)")
    kv = small_ints("kv_lens", kv_lens, B, 0, Lk) if kv_lens is not None else np.full(B, Lk, np.int64)
    if align == "bottom_right":
        if not _is_zero(q_offset):
            raise InputError(f"pass either align='bottom_right' or q_offset, not both (q_offset={q_offset!r})")
        off = kv - Lq
        if (off < 0).any():
            raise InputError(f"align='bottom_right' needs Lq <= the key length of every batch entry; got Lq={Lq}, "
                             f"key lengths {kv.tolist()}: use top_left positions (align=None) or a q_offset")
    else:
        off = small_ints("q_offset", q_offset, B, 0, INT_LIMIT - Lq)  # positions stay within int64 arithmetic
    docs = batch_documents(pattern, cu_seqlens, Lk, B)
    keys = list(zip(off.tolist(), kv.tolist(), docs))
    if len(set(keys)) == 1:
        return [BatchGroup(None, keys[0][1], Positions(keys[0][0], keys[0][2]))]
    if pattern.batch_dependent:
        raise UnsupportedError(f"per-batch q_offset / kv_lens / cu_seqlens with a batch-dependent pattern "
                               f"({pattern!r}); call once per batch entry instead")
    groups: dict[tuple, list[int]] = {}
    for b, key in enumerate(keys):
        groups.setdefault(key, []).append(b)
    return [BatchGroup(tuple(idx), kvl, Positions(o, d)) for (o, kvl, d), idx in groups.items()]


def _is_zero(x) -> bool:
    if isinstance(x, torch.Tensor):
        return x.numel() == 1 and int(x.reshape(-1)[0]) == 0
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool) and x == 0


def small_ints(name: str, value, batch: int, minimum: int, maximum: int | None) -> np.ndarray:
    """``value`` (an int, or an integer tensor/sequence ``[batch]``) as ``int64 [batch]`` within bounds."""
    if isinstance(value, bool):
        raise InputError(f"{name}={value!r} must be an int or an integer tensor [batch], not a bool")
    if isinstance(value, (int, np.integer)):
        arr = np.full(batch, int(value), dtype=np.int64)
    else:
        if isinstance(value, torch.Tensor):
            if value.dtype not in INT_DTYPES + (torch.int16, torch.int8, torch.uint8):
                raise InputError(f"{name} has dtype {value.dtype}; use an integer tensor (int32 or int64)")
            arr = value.detach().cpu().numpy().astype(np.int64)
        elif isinstance(value, (list, tuple)) and all(isinstance(x, (int, np.integer)) and not isinstance(x, bool)
                                                     for x in value):
            arr = np.asarray(value, dtype=np.int64)
        else:
            raise InputError(f"{name}={value!r} must be an int or an integer tensor [batch]")
        if arr.ndim == 0:
            arr = np.full(batch, int(arr), dtype=np.int64)
        if arr.shape != (batch,):
            raise InputError(f"{name} must have shape [batch] = [{batch}], got {list(arr.shape)}")
    bad = (arr < minimum) | ((arr > maximum) if maximum is not None else False)
    if bad.any():
        hi = "" if maximum is None else f", <= {maximum}"
        raise InputError(f"{name} values must be >= {minimum}{hi}; got {arr.tolist()}")
    return arr


# Validated cu_seqlens by content (dtype, bytes) -> document lengths: bounded LRU.
_DOC_CACHE: OrderedDict[tuple, tuple[int, ...]] = OrderedDict()
_DOC_CACHE_SIZE = 256


def batch_documents(pattern: Pattern, cu_seqlens, kv_len: int, batch: int) -> list[tuple[int, ...] | None]:
    """Per batch entry, the document lengths of ``cu_seqlens`` (zero-length documents dropped), or
    None without runtime documents. ``cu_seqlens`` is ``[num_docs + 1]`` (shared by every entry) or
    ``[batch, num_docs + 1]`` (one row per entry, the same number of entries in each row, as a
    padded tensor: empty documents pad a row with fewer documents)."""
    if isinstance(cu_seqlens, torch.Tensor) and cu_seqlens.dim() == 2:
        if not has_runtime_documents(pattern):
            _documents(pattern, cu_seqlens, kv_len)  # raises, naming the pattern
        if cu_seqlens.shape[0] != batch:
            raise InputError(f"per-batch cu_seqlens must have shape [batch, num_docs + 1] = [{batch}, n + 1], got "
                             f"{list(cu_seqlens.shape)}")
        rows, host = [], cu_seqlens.detach().cpu()  # one host copy for every row
        for b in range(batch):
            try:
                rows.append(_documents(pattern, host[b], kv_len))
            except InputError as err:
                raise InputError(f"cu_seqlens[{b}]: {err}") from None
        return rows
    return [_documents(pattern, cu_seqlens, kv_len)] * batch


def _documents(pattern: Pattern, cu_seqlens, kv_len: int) -> tuple[int, ...] | None:
    """The document lengths of a 1-D ``cu_seqlens`` (zero-length documents dropped), or None."""
    runtime = has_runtime_documents(pattern)
    if cu_seqlens is None:
        if runtime:
            raise InputError(f"{pattern!r} has ac.document() without lengths: pass cu_seqlens "
                             f"(int32/int64 [num_docs + 1], 0 first, {kv_len} last)")
        return None
    if not runtime:
        raise InputError(f"cu_seqlens given, but {pattern!r} has no ac.document() without lengths to take them")
    if not isinstance(cu_seqlens, torch.Tensor):
        raise InputError(f"cu_seqlens must be a torch.Tensor (int32 or int64), got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in INT_DTYPES:
        raise InputError(f"cu_seqlens has dtype {cu_seqlens.dtype}; use int32 or int64 (FlashAttention's convention)")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise InputError(f"cu_seqlens must be [num_docs + 1] (or [batch, num_docs + 1] per batch entry) with at "
                         f"least 2 entries per row, got shape {list(cu_seqlens.shape)}")
    arr = cu_seqlens.detach().cpu().numpy()
    key = (arr.dtype.str, arr.tobytes(), kv_len)
    hit = _DOC_CACHE.get(key)
    if hit is not None:
        _DOC_CACHE.move_to_end(key)
        return hit
    lengths = _check_cu_seqlens(arr.astype(np.int64), kv_len)
    _DOC_CACHE[key] = lengths
    if len(_DOC_CACHE) > _DOC_CACHE_SIZE:
        _DOC_CACHE.popitem(last=False)
    return lengths


def _check_cu_seqlens(cu: np.ndarray, kv_len: int) -> tuple[int, ...]:
    if cu[0] != 0:
        raise InputError(f"cu_seqlens must start at 0, got {int(cu[0])} (first entries {cu[:4].tolist()})")
    if (cu < 0).any():
        raise InputError(f"cu_seqlens has negative entries: {cu[cu < 0][:4].tolist()}")
    steps = np.diff(cu)
    if (steps < 0).any():
        i = int(np.flatnonzero(steps < 0)[0])
        raise InputError(f"cu_seqlens must be non-decreasing; cu_seqlens[{i}]={int(cu[i])} > "
                         f"cu_seqlens[{i + 1}]={int(cu[i + 1])}")
    if cu[-1] != kv_len:
        raise InputError(f"cu_seqlens must end at the sequence length (key length) {kv_len}, got {int(cu[-1])}")
    return tuple(int(n) for n in steps[steps > 0])


def group_layout(pattern: Pattern, q_len: int, kv_len: int, block_m: int, block_n: int, *, batch: int = 1,
                 heads: int = 1, positions: Positions | None = None) -> BlockLayout:
    """The (cached) layout of one batch group: rows at ``positions.q_offset`` onwards, documents bound."""
    if positions is None or positions == Positions():  # the pattern's own layout (families may override it)
        return pattern.layout(q_len, kv_len, block_m, block_n, batch=batch, heads=heads)
    # A decode step (a few rows) uses query blocks of its own height: padding one row to a whole
    # block would multiply the work by the block height.
    return build_layout(positions.bind(pattern), q_len, kv_len, min(block_m, q_len), block_n, batch=batch,
                        heads=heads, q_start=positions.q_offset)


def operator_positions(*, q_offset=0, align: str | None = None, cu_seqlens=None, kv_lens=None):
    """The call-time positions as custom-operator arguments ``(q_offset tensor or None, q_offset int,
    align ("" for None), kv_lens tensor or None, cu_seqlens tensor or None)``.

    Only Python types are checked here: nothing reads a tensor's values or branches on them (a
    traced graph must not guard on data). Values, dtypes and shapes are checked by
    :func:`batch_groups` inside the operator at run time, raising :class:`InputError` there. Ints
    and lists of ints given for ``kv_lens`` (or lists for ``q_offset``) become CPU tensors.

    Raises:
        InputError: a position of a type the operator cannot take (under tracing, torch reports
            it wrapped in its own error, with this message).
    """
    if align is not None and not isinstance(align, str):
        raise InputError(f"align={align!r} must be one of {ALIGNS} (or None: top_left)")
    off_t, off_i = None, 0
    if isinstance(q_offset, (torch.Tensor, list, tuple)):
        off_t = _int_tensor("q_offset", q_offset)
    elif isinstance(q_offset, (int, np.integer, torch.SymInt)) and not isinstance(q_offset, bool):
        off_i = q_offset if isinstance(q_offset, torch.SymInt) else int(q_offset)
    else:
        raise InputError(f"q_offset={q_offset!r} must be an int or an integer tensor [batch]")
    if isinstance(kv_lens, (int, np.integer)) and not isinstance(kv_lens, bool):
        kv_lens = torch.tensor(int(kv_lens), dtype=torch.int64)
    kv = None if kv_lens is None else _int_tensor("kv_lens", kv_lens)
    if cu_seqlens is not None and not isinstance(cu_seqlens, torch.Tensor):
        raise InputError(f"cu_seqlens must be a torch.Tensor (int32 or int64), got {type(cu_seqlens).__name__}")
    return off_t, off_i, align or "", kv, cu_seqlens


def _int_tensor(name: str, value) -> torch.Tensor:
    """``value`` (a tensor, or a list/tuple of ints) as a tensor; dtype and shape are checked later."""
    if isinstance(value, (list, tuple)):
        if not all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in value):
            raise InputError(f"{name}={value!r} must be an int or an integer tensor [batch]")
        value = torch.tensor([int(x) for x in value], dtype=torch.int64)
    if not isinstance(value, torch.Tensor):
        raise InputError(f"{name}={value!r} must be an int or an integer tensor [batch]")
    return value
