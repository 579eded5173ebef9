"""Masks from a FlexAttention-style mask_mod: traced into an index expression when it can be,
kept opaque otherwise and then evaluated exactly as FlexAttention's ``create_mask`` does (vmapped
over the positions, each call seeing 0-d index tensors), chunk by chunk; and the probe that an
opaque mask's dependence on the batch entry and the head is what it declares."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch


from ..errors import PatternError
from ..ir.expr import Expr
from ..ir.index import check_index_ranges
from ..ir.trace import trace_report
from ..ir.transform import substitute
from .pattern import Pattern
from .recognize import rewrite


@dataclass(frozen=True, eq=False)
class Mask(Pattern):
    """A FlexAttention-style ``mask_mod(b, h, q_idx, kv_idx) -> bool``.

    Traced into an :class:`Expr` when possible (``expr`` is then set, the pattern compares
    structurally and its ``b``/``h`` dependence is read off the expression); otherwise kept
    opaque and evaluated chunk by chunk on tensors. For an opaque ``fn``, ``per_batch`` /
    ``per_head`` are True (evaluate per batch entry / head), False (declared independent: the
    b=0 / h=0 mask serves all) or None (undeclared: checked against the actual batch and heads
    when the pattern is used, see :func:`check_batch_head_dependence`). ``trace_failure`` says
    why an opaque ``fn`` did not trace (not part of equality).
    """

    fn: Callable | None
    expr: Expr | None
    per_head: bool | None = None
    per_batch: bool | None = None
    trace_failure: str | None = None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Mask):
            return NotImplemented
        if self.expr is not None or other.expr is not None:
            return self.expr == other.expr
        return (self.fn, self.per_head, self.per_batch) == (other.fn, other.per_head, other.per_batch)

    def __hash__(self) -> int:
        return hash(("mask", self.expr)) if self.expr is not None else hash(("mask", self.fn, self.per_head, self.per_batch))

    @property
    def traced(self) -> bool:
        """True when the mask_mod traced into an index expression (analytic layout, analysis,
        rendered into Triton kernels); False when it is opaque (see :attr:`trace_failure`)."""
        return self.expr is not None

    def structure(self) -> Pattern | None:
        """The DSL pattern this traced mask provably equals (analytic layout), with any part no
        rule recognises kept as a traced leaf; None when opaque or nothing is recognised. Cached."""
        if self.expr is None:
            return None
        cached = self.__dict__.get("_structure", self)
        if cached is self:
            cached = rewrite(self.expr, lambda e: Mask(None, e))
            object.__setattr__(self, "_structure", cached)
        return cached

    @property
    def head_period(self):
        if self.expr is not None:
            return None if "h" in self.expr.variables() else 1
        return None if self.per_head else 1

    @property
    def batch_dependent(self):
        if self.expr is not None:
            return "b" in self.expr.variables()
        return bool(self.per_batch)

    def specialize(self, b, h):
        if self.expr is not None and self.expr.variables() & {"b", "h"}:
            # Substitution checks table indices that become constants (``docs[b, q]`` at b=2).
            return Mask(None, substitute(self.expr, {"b": b, "h": h}))
        if self.expr is None and (self.per_head or self.per_batch):
            return Mask(functools.partial(_call_at, self.fn, b, h), None, False, False, self.trace_failure)
        return self

    def validate(self, q_len, kv_len):
        if self.expr is not None:
            check_index_ranges(self.expr, q_len, kv_len)

    def predicate(self, q_len, kv_len):
        return self.expr

    def evaluate(self, b, h, q_idx, kv_idx, q_len, kv_len):
        if self.expr is not None:
            return super().evaluate(b, h, q_idx, kv_idx, q_len, kv_len)
        return evaluate_mask_mod(self.fn, b, h, q_idx, kv_idx)

    def __repr__(self) -> str:
        if self.expr is not None:
            return f"ac.mask(lambda b, h, q_idx, kv_idx: {self.expr!r})"
        return f"ac.mask({_fn_name(self.fn)})"

def _call_at(fn, b, h, _b, _h, q, k):
    return fn(torch.as_tensor(b), torch.as_tensor(h), q, k)

def _fn_name(fn) -> str:
    while isinstance(fn, functools.partial):
        fn = fn.args[0] if fn.func is _call_at else fn.func
    return getattr(fn, "__qualname__", None) or repr(fn)

def _check_mask_output(fn, out, shape) -> torch.Tensor:
    """``out`` as a bool tensor of ``shape``, or a PatternError saying what ``fn`` returned."""
    if not isinstance(out, torch.Tensor):
        try:
            out = torch.as_tensor(out)
        except (TypeError, RuntimeError, ValueError):
            raise PatternError(
                f"mask_mod {_fn_name(fn)} returned {type(out).__name__} {out!r}; "
                "it must return a bool tensor") from None
    if out.dtype != torch.bool:
        raise PatternError(f"mask_mod {_fn_name(fn)} returned dtype {out.dtype}; it must return a bool tensor")
    try:
        return torch.broadcast_to(out, shape)
    except RuntimeError:
        raise PatternError(
            f"mask_mod {_fn_name(fn)} returned shape {tuple(out.shape)} for index tensors "
            f"broadcasting to {tuple(shape)}; it must be element-wise"
        ) from None

# Elements one vmapped call of an opaque mask_mod covers (bounds its temporaries).
VMAP_CHUNK = 1 << 20


def evaluate_mask_mod(fn: Callable, b, h, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
    """``fn`` on broadcastable position tensors with FlexAttention's semantics: vmapped, so each
    call sees 0-d int64 tensors (``create_mask``'s ``_vmap_for_bhqkv``, with tensor indexing by a
    0-d index turned into ``aten.index`` as there), chunk by chunk. A mask_mod that branches on an
    index with Python ``if`` (which vmap refuses) is called one element at a time, up to a limit."""
    q_idx, kv_idx = torch.as_tensor(q_idx).to(torch.int64), torch.as_tensor(kv_idx).to(torch.int64)
    shape = torch.broadcast_shapes(q_idx.shape, kv_idx.shape)
    bt, ht = torch.as_tensor(b, dtype=torch.int64), torch.as_tensor(h, dtype=torch.int64)
    nd = len(shape)
    q = q_idx.reshape((1,) * (nd - q_idx.dim()) + tuple(q_idx.shape))
    k = kv_idx.reshape((1,) * (nd - kv_idx.dim()) + tuple(kv_idx.shape))
    out = torch.empty(shape, dtype=torch.bool, device=q.device)
    if out.numel() == 0:
        return out
    rows = max(1, VMAP_CHUNK // max(1, math.prod(shape[1:]))) if nd else 1
    try:
        for start in range(0, shape[0] if nd else 1, rows):
            qc = q[start:start + rows] if nd and q.shape[0] > 1 else q
            kc = k[start:start + rows] if nd and k.shape[0] > 1 else k
            sub = torch.broadcast_shapes(qc.shape, kc.shape)
            target = out[start:start + sub[0]] if nd else out
            target.copy_(_check_mask_output(fn, _vmapped(fn, bt, ht, qc, kc), sub))
    except RuntimeError as e:
        if "data-dependent control flow" in str(e) or ".item()" in str(e):
            # Python control flow on an index (`if q > k:`): correct one element at a time.
            return _evaluate_elementwise(fn, b, h, q_idx, kv_idx, shape)
        if "vmap" not in str(e) and "storage" not in str(e):
            raise PatternError(f"mask_mod {_fn_name(fn)} raised RuntimeError: {e}") from e
        # vmap refuses it (``create_mask`` would too), e.g. ``.numpy()``: a mask_mod written for
        # whole index tensors still gets its mask from one broadcast call.
        return _evaluate_broadcast(fn, b, h, q_idx, kv_idx, shape, e)
    except PatternError:
        raise
    except Exception as e:  # a user function failing: say which and how
        raise PatternError(f"mask_mod {_fn_name(fn)} raised {type(e).__name__}: {e}") from e
    return out


def _evaluate_broadcast(fn, b, h, q_idx, kv_idx, shape, why: Exception) -> torch.Tensor:
    try:
        out = fn(torch.as_tensor(b), torch.as_tensor(h), q_idx, kv_idx)
    except Exception as e:
        raise PatternError(f"mask_mod {_fn_name(fn)} raised {type(why).__name__} under FlexAttention's vmap "
                           f"({why}) and {type(e).__name__} on index tensors ({e})") from e
    return _check_mask_output(fn, out, shape)


def _vmapped(fn: Callable, b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``fn(b, h, q, k)`` per element of the broadcast of ``q`` and ``k`` (same rank): one vmap
    per dimension, mapping the operand(s) that are not of size 1 there."""
    from torch._dynamo._trace_wrapped_higher_order_op import TransformGetItemToIndex

    def scalar(qi, ki):
        r = fn(b, h, qi, ki)
        return r if isinstance(r, torch.Tensor) else _check_mask_output(fn, r, ())

    f, shape = scalar, torch.broadcast_shapes(q.shape, k.shape)
    for d in reversed(range(len(shape))):
        mq, mk = q.shape[d] != 1, k.shape[d] != 1
        if mq or mk:
            f = torch.vmap(f, in_dims=(0 if mq else None, 0 if mk else None))
    qs, ks = q.reshape([n for n in q.shape if n != 1]), k.reshape([n for n in k.shape if n != 1])
    with TransformGetItemToIndex():
        res = f(qs, ks)
    mapped = sum(1 for n in shape if n != 1)
    if res.dim() != mapped:
        raise PatternError(
            f"mask_mod {_fn_name(fn)} returned shape {tuple(res.shape[mapped:])} for one (q_idx, kv_idx) element "
            "(0-d index tensors, as under FlexAttention's vmap); it must be element-wise: one bool per element")
    return res.reshape(shape)


# Elements a mask_mod with Python control flow on an index is called for, one call each, in
# one evaluation (a chunk of a layout, a dense mask): about a second of Python calls.
ELEMENTWISE_LIMIT = 1 << 16

def _evaluate_elementwise(fn, b, h, q_idx, kv_idx, shape) -> torch.Tensor:
    """``fn`` called once per (q, kv) element with 0-d tensors, for mask_mods that branch on an
    index with Python ``if`` (which tensors of indices cannot take)."""
    n = math.prod(shape)
    if n > ELEMENTWISE_LIMIT:
        raise PatternError(
            f"mask_mod {_fn_name(fn)} uses Python control flow (`if`, `and`, `or`, `not`) on an index, "
            f"so it can only be evaluated one element at a time, and this evaluation has {n} elements "
            f"(more than {ELEMENTWISE_LIMIT}). Write the condition with `&`, `|`, `~` and "
            "`torch.where(cond, a, b)` instead: it then traces into a predicate that runs in kernels"
        )
    qs, ks = torch.broadcast_tensors(q_idx, kv_idx)
    bt, ht = torch.as_tensor(b), torch.as_tensor(h)
    out = torch.empty(shape, dtype=torch.bool)
    flat_q, flat_k, flat_out = qs.reshape(-1), ks.reshape(-1), out.view(-1)
    for i in range(n):
        try:
            v = fn(bt, ht, flat_q[i], flat_k[i])
        except Exception as e:
            raise PatternError(f"mask_mod {_fn_name(fn)} raised {type(e).__name__} at q_idx={int(flat_q[i])}, "
                               f"kv_idx={int(flat_k[i])}: {e}") from e
        flat_out[i] = bool(_check_mask_output(fn, v, ()))
    return out.to(qs.device)

_PROBE_POINTS = 48  # probe positions per axis (plus the first and last)

def check_batch_head_dependence(pattern: Pattern, batch: int, heads: int, q_len: int, kv_len: int) -> None:
    """Raise :class:`PatternError` if an opaque mask_mod of ``pattern`` that did not declare
    ``per_batch`` / ``per_head`` gives a different mask for some batch entry ``b < batch`` than
    for ``b = 0`` (or head ``h < heads`` than ``h = 0``) on a probe grid of positions.

    Without this check such a mask would silently use the b=0 / h=0 mask everywhere (as
    FlexAttention's ``B=None, H=None`` broadcast does). Called with the actual sizes when a
    layout or the reference is built.
    """
    for m in _undeclared_opaque(pattern):
        try:
            _probe(m, int(batch), int(heads), int(q_len), int(kv_len))
        except TypeError:  # unhashable mask_mod: probe without the cache
            _probe.__wrapped__(m, int(batch), int(heads), int(q_len), int(kv_len))

def _undeclared_opaque(p: Pattern):
    if isinstance(p, Mask):
        if p.expr is None and (p.per_batch is None or p.per_head is None):
            yield p
        return
    for c in p.children():
        yield from _undeclared_opaque(c)

def _probe_positions(n: int) -> torch.Tensor:
    if n <= 2 * _PROBE_POINTS:
        return torch.arange(n)
    even = torch.linspace(0, n - 1, _PROBE_POINTS).round().long()
    rand = torch.randint(0, n, (_PROBE_POINTS,), generator=torch.Generator().manual_seed(n))
    return torch.unique(torch.cat([even, rand, torch.tensor([0, n - 1])]))

@functools.lru_cache(maxsize=256)
def _probe(m: Mask, batch: int, heads: int, q_len: int, kv_len: int) -> None:
    q, k = _probe_positions(q_len)[:, None], _probe_positions(kv_len)[None, :]
    base = m.evaluate(0, 0, q, k, q_len, kv_len)
    for name, flag, n in (("b", m.per_batch, batch), ("h", m.per_head, heads)):
        if flag is not None:
            continue
        for i in range(1, n):
            b, h = (i, 0) if name == "b" else (0, i)
            diff = (m.evaluate(b, h, q, k, q_len, kv_len) != base).nonzero()
            if len(diff):
                qi, ki = (int(x) for x in diff[0])
                option, what = ("per_batch", "batch entry") if name == "b" else ("per_head", "head")
                raise PatternError(
                    f"mask_mod {_fn_name(m.fn)} depends on the {what} {name}: at {name}={i} it differs from "
                    f"{name}=0 (q_idx={int(q[qi, 0])}, kv_idx={int(k[0, ki])}), but it is opaque and did not "
                    f"declare it, so every {what} would silently get {name}=0's mask. Pass "
                    f"ac.mask(fn, {option}=True), or {option}=False to use {name}=0's mask everywhere"
                )

def mask(fn: Callable, *, per_head: bool | None = None, per_batch: bool | None = None) -> Pattern:
    """A pattern from a FlexAttention ``mask_mod(b, h, q_idx, kv_idx) -> bool``.

    ``fn`` is first called with symbolic indices. If it uses only arithmetic, comparisons,
    ``& | ^ ~ % // << >>`` (constant shift counts), ``abs``, ``clamp``, ``minimum``/``maximum``,
    ``torch.where``, ``new_ones``/``ones_like``/``.to(dtype)`` constants and casts, torch's
    ``and_masks``/``or_masks``/``noop_mask``, and indexing of integer/bool tensors (any number
    of dimensions, indexing the result again; torch's rules: negative indices wrap, out of range
    is an error), the result is an :class:`Expr` the compiler analyzes and renders into kernels,
    with int64 index arithmetic, and ``b``/``h`` dependence is read off it (``p.traced`` is
    True). Otherwise ``fn`` stays opaque (``p.traced`` False, ``p.trace_failure`` names the first
    operation the tracer could not follow and its source line) and is evaluated as FlexAttention's
    ``create_mask`` does: vmapped, each call seeing 0-d index tensors, chunk by chunk (one
    element at a time, up to a limit, where it branches on an index with Python ``if``).

    Args:
        per_head, per_batch: for an opaque ``fn`` only: True evaluates it per head / batch entry;
            False declares it independent (the h=0 / b=0 mask is used everywhere, FlexAttention's
            ``H=None``/``B=None``); None (default) means per head / batch entry when tracing saw
            ``fn`` touch ``h`` / ``b``, and otherwise a check, with the actual heads and batch
            size, that it does not depend on them (a PatternError if it does).
    """
    if not callable(fn):
        raise PatternError(f"mask() needs a callable mask_mod(b, h, q_idx, kv_idx), got {fn!r}")
    for name, v in (("per_head", per_head), ("per_batch", per_batch)):
        if v is not None and not isinstance(v, (bool, np.bool_)):
            raise PatternError(f"{name}={v!r} must be True, False or None")
    r = trace_report(fn)
    e, uses = r.expr, r.uses
    if e is not None:
        return Mask(None, e)
    if per_head is None and "h" in uses:
        per_head = True
    if per_batch is None and "b" in uses:
        per_batch = True
    return Mask(fn, None, None if per_head is None else bool(per_head), None if per_batch is None else bool(per_batch),
                r.failure)
