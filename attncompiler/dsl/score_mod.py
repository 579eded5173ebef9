"""Edge weights of the attention graph: FlexAttention-style ``score_mod`` functions.

A score_mod is any callable ``score_mod(score, b, h, q_idx, kv_idx) -> score`` (FlexAttention's
signature), applied to the scaled score before the mask. The backends call it on broadcastable
tensors: ``score`` is a tile of scores, ``b`` / ``h`` / ``q_idx`` / ``kv_idx`` are integer
tensors that broadcast to the tile's shape (``q_idx`` is the query *position*, ``q_offset + i``,
``kv_idx`` the key position). Elementwise torch code (arithmetic, ``torch.tanh``,
``torch.where``, indexing a tensor with the index tensors) therefore works unchanged, and the
same function can be handed to ``flex_attention``.

The built-ins (:func:`softcap`, :func:`alibi`, :func:`relative_bias`, :func:`bias`) are
:class:`ScoreMod` objects that hold their tensors, so gradients reach them; they compose with
``@`` (``softcap(30.0) @ alibi(slopes)`` applies ALiBi, then the cap) or :func:`compose`.
For a plain function the tensors it uses are found by :func:`captured_tensors`.
"""

from __future__ import annotations

import math
import types
from typing import Callable

import torch

from ..errors import InputError, PatternError


class ScoreMod:
    """Base of the built-in score modifications: a callable with FlexAttention's signature that
    lists the tensors it reads (:meth:`tensors`) and composes with ``@``."""

    # True when finite scores always give finite results (no -inf weights: a row keeps a
    # visible key, so the forward may use the fused softmax)
    finite = False

    def __call__(self, score, b, h, q_idx, kv_idx):  # pragma: no cover - every subclass overrides
        raise NotImplementedError

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The tensors this score_mod reads (their gradients are computed)."""
        return ()

    def apply_(self, score, b, h, q_idx, kv_idx, cache: dict):
        """The same value as ``self(score, ...)``, computed without autograd and allowed to
        overwrite ``score`` (the forward's fast path); ``cache`` holds what the calls of one step
        share (e.g. the distances ``kv_idx - q_idx``), since only ``score``, ``b`` and ``h`` change."""
        return self(score, b, h, q_idx, kv_idx)

    def vjp_(self, ds, b, h, q_idx, kv_idx, cache: dict, grads: dict):
        """``ds * d modified / d score`` without autograd (may overwrite ``ds``), right after
        :meth:`apply_` ran on this step with ``cache["keep"]`` set (it keeps what the derivative
        needs in ``cache``), adding the gradients of :meth:`tensors` that require one into ``grads``
        (keyed by ``id``). Score_mods that do not override it are differentiated with autograd."""
        raise NotImplementedError

    def check(self, batch: int, heads: int, q_end: int, kv_len: int) -> None:
        """Raise :class:`InputError` when a call with these sizes would index past a tensor."""

    def __matmul__(self, other: Callable) -> "Composed":
        return compose(self, other)

    def __rmatmul__(self, other: Callable) -> "Composed":
        return compose(other, self)


class Composed(ScoreMod):
    """``outer(inner(score, ...), ...)``, e.g. a softcap applied after a bias."""

    def __init__(self, mods: tuple[Callable, ...]):
        self.mods = mods
        self.finite = all(getattr(m, "finite", False) for m in mods)

    def __call__(self, score, b, h, q_idx, kv_idx):
        for mod in reversed(self.mods):
            score = mod(score, b, h, q_idx, kv_idx)
        return score

    def tensors(self):
        return tuple(t for mod in self.mods for t in captured_tensors(mod))

    def apply_(self, score, b, h, q_idx, kv_idx, cache):
        for i, mod in enumerate(reversed(self.mods)):
            if isinstance(mod, ScoreMod):
                score = mod.apply_(score, b, h, q_idx, kv_idx, cache.setdefault(i, {}))
            else:
                score = check_result(mod, mod(score, b, h, q_idx, kv_idx), score).contiguous()
        return score

    def check(self, batch, heads, q_end, kv_len):
        for mod in self.mods:
            if isinstance(mod, ScoreMod):
                mod.check(batch, heads, q_end, kv_len)

    def __repr__(self) -> str:
        return " @ ".join(repr(m) for m in self.mods)


def compose(*mods: Callable) -> Composed:
    """The composition ``mods[0] ∘ mods[1] ∘ ...``: the last one is applied first.

    ``compose(softcap(30.0), alibi(slopes))`` adds the ALiBi bias, then caps the result.
    """
    if not mods:
        raise PatternError("compose() needs at least one score_mod; hint: compose(ac.softcap(30.0), mod)")
    for m in mods:
        check_score_mod(m)
    flat: list[Callable] = []
    for m in mods:
        flat.extend(m.mods if isinstance(m, Composed) else (m,))
    return Composed(tuple(flat))


class Softcap(ScoreMod):
    """``cap * tanh(score / cap)`` (Gemma 2)."""

    finite = True

    def __init__(self, cap: float):
        if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not math.isfinite(cap) or cap <= 0:
            raise PatternError(f"softcap {cap=} must be a finite number > 0; hint: ac.softcap(30.0)")
        self.cap = float(cap)

    def __call__(self, score, b, h, q_idx, kv_idx):
        return torch.tanh(score / self.cap) * self.cap

    def apply_(self, score, b, h, q_idx, kv_idx, cache):
        if cache.get("keep"):
            t = cache["tanh"] = score.div_(self.cap).tanh_()
            return t * self.cap
        return score.div_(self.cap).tanh_().mul_(self.cap)

    def vjp_(self, ds, b, h, q_idx, kv_idx, cache, grads):
        t = cache.pop("tanh")
        return ds.mul_(t.mul_(t).neg_().add_(1.0))  # d/ds cap * tanh(s / cap) = 1 - tanh^2

    def __repr__(self) -> str:
        return f"ac.softcap({self.cap!r})"


def softcap(cap: float) -> Softcap:
    """Logit soft-capping ``cap * tanh(score / cap)`` (Gemma 2 uses ``cap=50.0``)."""
    return Softcap(cap)


def check_head_table(name: str, t, ndim: int) -> torch.Tensor:
    """``t`` as a floating tensor of ``ndim`` dimensions, or a :class:`PatternError`."""
    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() != ndim:
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise PatternError(f"{name} must be a floating tensor with {ndim} dimension(s), got {shape}; "
                           f"hint: a torch.nn.Parameter of shape {'[H]' if ndim == 1 else '[H, num_buckets]'}")
    return t


class Alibi(ScoreMod):
    """``score + slopes[h] * (kv_idx - q_idx)`` (ALiBi as FlexAttention's example writes it)."""

    finite = True  # for finite slopes

    def __init__(self, slopes: torch.Tensor):
        self.slopes = check_head_table("alibi slopes", slopes, 1)

    def __call__(self, score, b, h, q_idx, kv_idx):
        return score + self.slopes[h] * (kv_idx - q_idx)

    def apply_(self, score, b, h, q_idx, kv_idx, cache):
        return score.addcmul_(self.slopes[h].to(score.dtype), distances(score, q_idx, kv_idx, cache))

    def vjp_(self, ds, b, h, q_idx, kv_idx, cache, grads):
        dist = distances(ds, q_idx, kv_idx, cache)
        if self.slopes.requires_grad:
            hh = h.expand(-1, ds.shape[1], -1).reshape(-1) if h.dim() else h.reshape(1)
            per_row = (ds * dist).sum(dim=(0, 2)) if h.dim() else (ds * dist).sum().reshape(1)
            g = grads.get(id(self.slopes))
            if g is None:
                g = grads[id(self.slopes)] = torch.zeros(self.slopes.shape, dtype=ds.dtype, device=ds.device)
            g.index_add_(0, hh, per_row)
        return ds

    def tensors(self):
        return (self.slopes,)

    def check(self, batch, heads, q_end, kv_len):
        if self.slopes.shape[0] != heads:
            raise InputError(f"alibi has {self.slopes.shape[0]} slopes for {heads=}; hint: ac.alibi_slopes({heads})")

    def reach(self, threshold: float = 20.0) -> list[int]:
        """Per head, the smallest distance ``q_idx - kv_idx`` at which the bias is below ``-threshold``
        (weights under ``exp(-threshold)``, 2e-9 for 20: effectively masked); 0 for a slope <= 0
        (the bias never decays)."""
        return [math.floor(threshold / s) + 1 if s > 0 else 0 for s in self.slopes.detach().cpu().tolist()]

    def __repr__(self) -> str:
        return f"ac.alibi(<slopes [{self.slopes.shape[0]}]>)"


def alibi(slopes: torch.Tensor) -> Alibi:
    """ALiBi: adds ``slopes[h] * (kv_idx - q_idx)`` (negative for past keys); ``slopes [H]`` may be
    a learnable parameter (see :func:`alibi_slopes` for the paper's fixed ones)."""
    return Alibi(slopes)


def alibi_slopes(num_heads: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The ALiBi paper's geometric slopes ``[num_heads]``: ``2^(-8/n), 2^(-16/n), ...`` for a power
    of two ``n``; otherwise those of the nearest lower power of two followed by every other slope
    of the next power of two (as the paper's reference code does)."""
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise PatternError(f"alibi_slopes {num_heads=} must be an int >= 1")

    def pow2(n: int) -> list[float]:
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start * start ** i for i in range(n)]

    def slopes(n: int) -> list[float]:
        if math.log2(n).is_integer():
            return pow2(n)
        p = 2 ** math.floor(math.log2(n))
        return pow2(p) + slopes(2 * p)[0::2][:n - p]

    return torch.tensor(slopes(num_heads), dtype=dtype)


def t5_bucket(relative_position: torch.Tensor, bidirectional: bool = True, num_buckets: int = 32,
              max_distance: int = 128) -> torch.Tensor:
    """T5's ``_relative_position_bucket`` (``relative_position = kv_idx - q_idx``), as written in
    transformers: exact buckets for small distances, logarithmic ones up to ``max_distance``."""
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).to(relative_position.dtype) * num_buckets
        relative_position = torch.abs(relative_position)
    else:
        relative_position = -torch.clamp(relative_position, max=0)
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    large = max_exact + (torch.log(relative_position.float() / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).to(relative_position.dtype)
    large = torch.clamp(large, max=num_buckets - 1)
    return buckets + torch.where(is_small, relative_position, large)


def distances(score, q_idx, kv_idx, cache: dict) -> torch.Tensor:
    """``kv_idx - q_idx`` in the score's dtype, computed once per step (``cache``): in one float pass
    when positions are exact in that dtype, else in integers first."""
    if "dist" not in cache:
        exact = 2 ** (53 if score.dtype == torch.float64 else 24)
        if max(int(q_idx.max()), int(kv_idx.max())) < exact:
            cache["dist"] = kv_idx.to(score.dtype) - q_idx.to(score.dtype)
        else:
            cache["dist"] = (kv_idx - q_idx).to(score.dtype)
    return cache["dist"]


class RelativeBias(ScoreMod):
    """``score + table[h, t5_bucket(kv_idx - q_idx)]`` (T5's learned relative position bias)."""

    def __init__(self, table: torch.Tensor, num_buckets: int, max_distance: int, bidirectional: bool):
        self.table = check_head_table("relative_bias table", table, 2)
        if table.shape[1] != num_buckets:
            raise PatternError(f"relative_bias table has {table.shape[1]} columns but {num_buckets=}; "
                               "hint: the table is [H, num_buckets]")
        if num_buckets < 4 or max_distance <= num_buckets // (2 if bidirectional else 1) // 2:
            raise PatternError(f"relative_bias {num_buckets=} must be >= 4 and {max_distance=} larger than the "
                               "exact buckets; hint: T5 uses num_buckets=32, max_distance=128")
        self.num_buckets, self.max_distance, self.bidirectional = num_buckets, max_distance, bidirectional
        # Buckets saturate at |distance| >= max_distance, so a table over [-max_distance, max_distance]
        # indexed by the clamped distance is exact (and traces into the index IR: no float -> int cast).
        md = max_distance
        self.lut = t5_bucket(torch.arange(-md, md + 1), bidirectional, num_buckets, md).to(table.device)

    def bucket(self, q_idx, kv_idx):
        """T5's bucket of ``kv_idx - q_idx`` (see :func:`t5_bucket`), read from the saturating table."""
        lut = self.lut
        if isinstance(q_idx, torch.Tensor) and lut.device != q_idx.device:
            lut = self.lut = lut.to(q_idx.device)
        return lut[torch.clamp(kv_idx - q_idx, -self.max_distance, self.max_distance) + self.max_distance]

    def __call__(self, score, b, h, q_idx, kv_idx):
        return score + self.table[h, self.bucket(q_idx, kv_idx)]

    def apply_(self, score, b, h, q_idx, kv_idx, cache):
        if "bucket" not in cache:
            cache["bucket"] = self.bucket(q_idx, kv_idx)
        return score.add_(self.table[h, cache["bucket"]])

    def tensors(self):
        return (self.table,)

    def check(self, batch, heads, q_end, kv_len):
        if self.table.shape[0] != heads:
            raise InputError(f"relative_bias table has {self.table.shape[0]} rows for {heads=}; hint: [H, num_buckets]")

    def __repr__(self) -> str:
        return (f"ac.relative_bias(<table {list(self.table.shape)}>, num_buckets={self.num_buckets}, "
                f"max_distance={self.max_distance}, bidirectional={self.bidirectional})")


def relative_bias(table: torch.Tensor, num_buckets: int = 32, max_distance: int = 128,
                  bidirectional: bool = True) -> RelativeBias:
    """T5's relative position bias: adds ``table[h, bucket(kv_idx - q_idx)]`` with T5's bucketing
    (:func:`t5_bucket`); ``table [H, num_buckets]`` is usually a learnable parameter."""
    return RelativeBias(table, num_buckets, max_distance, bidirectional)


class Bias(ScoreMod):
    """``score + tensor[b, h, q_idx, kv_idx]`` for a tensor broadcastable to ``[B, H, Lq, Lk]``."""

    def __init__(self, tensor: torch.Tensor):
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point() or not 1 <= tensor.dim() <= 4:
            shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise PatternError(f"bias must be a floating tensor broadcastable to [B, H, Lq, Lk], got {shape}; "
                               "hint: ac.bias(torch.zeros(H, Lq, Lk, requires_grad=True))")
        self.tensor = tensor

    def __call__(self, score, b, h, q_idx, kv_idx):
        t = self.tensor
        t4 = t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))
        idx = tuple(0 if n == 1 else i for n, i in zip(t4.shape, (b, h, q_idx, kv_idx)))
        return score + t4[idx]

    def tensors(self):
        return (self.tensor,)

    def check(self, batch, heads, q_end, kv_len):
        shape = (1,) * (4 - self.tensor.dim()) + tuple(self.tensor.shape)
        for name, n, need in zip(("batch", "heads", "query positions", "keys"), shape, (batch, heads, q_end, kv_len)):
            if n != 1 and n < need:
                raise InputError(f"bias of shape {tuple(self.tensor.shape)} has {n} {name} but the call needs "
                                 f"{need}; hint: the query axis is indexed by position (q_offset + row)")

    def __repr__(self) -> str:
        return f"ac.bias(<tensor {list(self.tensor.shape)}>)"


class DiagonalBias(ScoreMod):
    """``score + tensor[h, kv_idx - q_idx + M - 1]``: one learned value per head and diagonal,
    ``tensor [H, 2M - 1]`` (or ``[2M - 1]`` for every head) covering distances ``-(M-1) .. M-1``."""

    def __init__(self, tensor: torch.Tensor):
        if (not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point() or tensor.dim() not in (1, 2)
                or tensor.shape[-1] % 2 == 0):
            shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise PatternError(f"a diagonal bias must be a floating tensor [H, 2M - 1] or [2M - 1] (odd length: "
                               f"distances -(M-1)..M-1), got {shape}; hint: torch.zeros(H, 2 * max_len - 1)")
        self.tensor = tensor
        self.center = (tensor.shape[-1] - 1) // 2

    def _index(self, q_idx, kv_idx):
        return kv_idx - q_idx + self.center

    def __call__(self, score, b, h, q_idx, kv_idx):
        t = self.tensor
        i = self._index(q_idx, kv_idx)
        return score + (t[i] if t.dim() == 1 else t[h, i])

    def apply_(self, score, b, h, q_idx, kv_idx, cache):
        if "diag" not in cache:
            cache["diag"] = self._index(q_idx, kv_idx)
        t = self.tensor
        return score.add_(t[cache["diag"]] if t.dim() == 1 else t[h, cache["diag"]])

    def tensors(self):
        return (self.tensor,)

    def check(self, batch, heads, q_end, kv_len):
        if self.tensor.dim() == 2 and self.tensor.shape[0] != heads:
            raise InputError(f"diagonal bias has {self.tensor.shape[0]} rows for {heads=}; hint: [H, 2M - 1]")
        need = max(q_end, kv_len)
        if self.center + 1 < need:
            raise InputError(f"diagonal bias of length {self.tensor.shape[-1]} covers distances up to {self.center}, "
                             f"but the call has {q_end} query positions and {kv_len} keys; hint: length "
                             f"2 * {need} - 1")

    def __repr__(self) -> str:
        return f"ac.bias(<tensor {list(self.tensor.shape)}>, diagonal=True)"


def bias(tensor: torch.Tensor, *, diagonal: bool = False) -> Bias | DiagonalBias:
    """A dense additive bias broadcastable to ``[B, H, Lq, Lk]`` (``[H, Lq, Lk]``, ``[Lq, Lk]``,
    ``[B, 1, Lq, Lk]``...): adds ``tensor[b, h, q_idx, kv_idx]``; the tensor gets gradients.
    The query axis is indexed by position, so with ``q_offset`` it covers ``q_offset + Lq`` rows.

    ``diagonal=True``: one value per head and diagonal ``kv_idx - q_idx`` (a relative position
    bias without buckets): ``tensor [H, 2M - 1]`` or ``[2M - 1]`` adds
    ``tensor[h, kv_idx - q_idx + M - 1]``; calls need ``M >= max(query positions, keys)``."""
    if not isinstance(diagonal, bool):
        raise PatternError(f"bias {diagonal=} must be True or False")
    return DiagonalBias(tensor) if diagonal else Bias(tensor)


def check_score_mod(fn) -> Callable:
    """``fn`` when it is callable, else a :class:`PatternError`."""
    if not callable(fn):
        raise PatternError(f"score_mod must be callable as fn(score, b, h, q_idx, kv_idx), got "
                           f"{type(fn).__name__} {fn!r}; hint: ac.softcap(30.0) or a Python function")
    return fn


def captured_tensors(fn: Callable) -> tuple[torch.Tensor, ...]:
    """The tensors a score_mod reads, so their gradients can be computed.

    Found in: the built-ins' own tensors; a function's closure cells and the module-level
    globals its code names (tensors, ``nn.Module`` parameters and buffers, lists / tuples /
    dicts of tensors, nested functions and score_mods); ``functools.partial`` arguments; a
    bound method's ``nn.Module``. Tensors reached any other way (an attribute of an arbitrary
    object) are not found: their gradient would be silently missing, so
    :func:`check_captured_grads` raises when the score_mod's output depends on one.
    """
    found: dict[int, torch.Tensor] = {}
    seen: set[int] = set()

    def visit(obj, depth: int) -> None:
        if depth > 8 or id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            found.setdefault(id(obj), obj)
        elif isinstance(obj, torch.nn.Module):
            for t in list(obj.parameters()) + list(obj.buffers()):
                found.setdefault(id(t), t)
        elif isinstance(obj, ScoreMod):
            for t in obj.tensors():
                found.setdefault(id(t), t)
            if isinstance(obj, Composed):
                for m in obj.mods:
                    visit(m, depth + 1)
        elif isinstance(obj, (list, tuple)):
            for x in obj:
                visit(x, depth + 1)
        elif isinstance(obj, dict):
            for x in obj.values():
                visit(x, depth + 1)
        elif isinstance(obj, types.MethodType):
            visit(obj.__self__, depth + 1)
            visit(obj.__func__, depth + 1)
        elif isinstance(obj, types.FunctionType):
            for cell in obj.__closure__ or ():
                try:
                    visit(cell.cell_contents, depth + 1)
                except ValueError:  # an empty cell
                    pass
            for name in code_names(obj.__code__):
                if name in obj.__globals__:
                    g = obj.__globals__[name]
                    if isinstance(g, (torch.Tensor, torch.nn.Module, ScoreMod, types.FunctionType, list, tuple, dict)) \
                            and not isinstance(g, types.ModuleType):
                        visit(g, depth + 1)
            visit(obj.__defaults__ or (), depth + 1)
        elif hasattr(obj, "func") and hasattr(obj, "args") and hasattr(obj, "keywords"):  # functools.partial
            visit(obj.func, depth + 1)
            visit(obj.args, depth + 1)
            visit(obj.keywords or {}, depth + 1)

    visit(fn, 0)
    return tuple(found.values())


def check_captured_grads(fn, captured, dtype, device) -> None:
    """Raise :class:`InputError` when ``fn`` reads a tensor that requires a gradient but was not
    found by :func:`captured_tensors` (its gradient would silently be missing).

    Probes ``fn`` once on a one-element score at index 0 under autograd and walks the graph of
    the result: every leaf it reaches must be a captured tensor (a captured tensor that is itself
    computed from parameters ends the walk there)."""
    known = {id(t) for t in captured}
    stops = {t.grad_fn for t in captured if t.grad_fn is not None}
    z = torch.zeros((1, 1, 1), dtype=torch.long, device=device)
    with torch.enable_grad():
        out = fn(torch.zeros((1, 1, 1), dtype=dtype, device=device), z[0, 0, 0], z, z, z)
    if not isinstance(out, torch.Tensor) or out.grad_fn is None:
        return
    todo, seen = [out.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen or node in stops:
            continue
        seen.add(node)
        var = getattr(node, "variable", None)
        if var is not None and id(var) not in known:
            raise InputError(f"score_mod {fn!r} reads a tensor {tuple(var.shape)} that requires grad but is not "
                             "reachable from the function (closure cells, globals it names, nn.Module "
                             "parameters, built-ins); its gradient would be lost. hint: capture it in a "
                             "closure, or wrap it with ac.bias / pass an nn.Module")
        todo.extend(n for n, _ in node.next_functions)


def code_names(code: types.CodeType) -> set[str]:
    """Global names a code object and the code objects nested in it (lambdas, inner functions) read."""
    names = set(code.co_names)
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            names |= code_names(c)
    return names


def check_device(tensors, device: torch.device, fn) -> None:
    """Raise :class:`InputError` when a captured tensor is not on ``device``."""
    for t in tensors:
        if t.device != device:
            raise InputError(f"score_mod {fn!r} captures a tensor {tuple(t.shape)} on {t.device} but q is on "
                             f"{device}; hint: move it with .to({str(device)!r})")


def check_result(fn, out, score: torch.Tensor) -> torch.Tensor:
    """``out`` of ``fn`` broadcast to ``score``'s shape when it is a tensor of score's dtype,
    else an :class:`InputError` naming the function."""
    if not isinstance(out, torch.Tensor):
        raise InputError(f"score_mod {fn!r} returned {type(out).__name__}, expected a tensor; "
                         "hint: return an expression of `score`")
    if out.dtype != score.dtype:
        raise InputError(f"score_mod {fn!r} returned dtype {out.dtype} for scores of dtype {score.dtype}; "
                         "hint: captured tensors should have the scores' dtype (or a lower one), or cast the result")
    if out.shape != score.shape:
        # index tensors have the score's rank, so an elementwise expression keeps it; a lower rank
        # (a reduction) would broadcast by accident
        if out.dim() != score.dim() or any(n not in (1, m) for n, m in zip(out.shape, score.shape)):
            raise InputError(f"score_mod {fn!r} returned shape {tuple(out.shape)} for scores of shape "
                             f"{tuple(score.shape)}; hint: it must be elementwise in score, b, h, q_idx, kv_idx")
        out = out.expand(score.shape)
    return out


def check_sinks(sinks, heads: int, device) -> torch.Tensor | None:
    """``sinks`` when it is None or a floating tensor ``[H]`` on q's device, else an
    :class:`InputError` (attention sinks: one logit per query head)."""
    if sinks is None:
        return None
    if not isinstance(sinks, torch.Tensor) or not sinks.is_floating_point() or tuple(sinks.shape) != (heads,):
        got = tuple(sinks.shape) if isinstance(sinks, torch.Tensor) else type(sinks).__name__
        raise InputError(f"sinks must be a floating tensor of shape [{heads}] (one logit per query head), got {got}; "
                         f"hint: torch.nn.Parameter(torch.zeros({heads}))")
    if sinks.device != device:
        raise InputError(f"sinks are on {sinks.device} but q is on {device}; hint: move them with .to()")
    return sinks
