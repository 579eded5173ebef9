"""Validation of q/k/v tensors shared by every backend and the reference."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import torch

from ..errors import InputError, UnexpectedArgumentError

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class Dims:
    """Shapes of one attention call: q ``[B, H, Lq, D]``, k ``[B, Hkv, Lk, D]``, v ``[B, Hkv, Lk, Dv]``."""

    batch: int
    heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    v_dim: int

    @property
    def group(self) -> int:
        """Query heads per key/value head (GQA); 1 for ordinary multi-head attention."""
        return self.heads // self.kv_heads


def check_qkv(q, k, v, *, check_finite: bool = True) -> Dims:
    """Check q/k/v and return their dimensions.

    Raises:
        InputError: wrong type, rank, dtype, device, mismatched sizes, a query head count not a
            multiple of the key/value head count, or (``check_finite``) NaN/inf values.
    """
    if not (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)
            and q.dim() == k.dim() == v.dim() == 4 and q.dtype in FLOAT_DTYPES and q.dtype == k.dtype == v.dtype
            and 0 not in q.shape and 0 not in k.shape and 0 not in v.shape):
        _explain(q, k, v)
    return _check_shapes(q, k, v, check_finite)


def _explain(q, k, v) -> None:
    """Raise the :class:`InputError` naming the first bad type, rank, dtype or empty dimension."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise InputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise InputError(f"{name} must be [batch, heads, seq, head_dim], got shape {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise InputError(f"{name} has dtype {t.dtype}; use float16, bfloat16, float32 or float64")
        if 0 in t.shape:
            raise InputError(f"{name} has an empty dimension: shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise InputError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    raise InputError(f"q, k, v are not valid attention inputs: {type(q).__name__}, {type(k).__name__}, "
                     f"{type(v).__name__}")  # unreachable: check_qkv's fast test is the conjunction of the above


def _check_shapes(q, k, v, check_finite: bool) -> Dims:
    """Devices, matching sizes and (``check_finite``) finiteness of well-typed 4D q/k/v."""
    if not (q.device == k.device == v.device):
        raise InputError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.device.type == "meta":
        raise InputError("q, k, v are meta tensors (shapes without data); attention needs their values: "
                         "materialize them first (e.g. module.to_empty(device='cpu') and load weights)")
    B, H, Lq, D = q.shape
    Bk, Hkv, Lk, Dk = k.shape
    Bv, Hv, Lv, Dv = v.shape
    if not (B == Bk == Bv):
        raise InputError(f"batch sizes differ: q {B}, k {Bk}, v {Bv}")
    if Hkv != Hv:
        raise InputError(f"k has {Hkv} heads but v has {Hv}")
    if H % Hkv:
        raise InputError(f"q has {H} heads, not a multiple of the {Hkv} key/value heads (GQA needs H % Hkv == 0)")
    if D != Dk:
        raise InputError(f"q head_dim {D} != k head_dim {Dk}")
    if Lk != Lv:
        raise InputError(f"k has {Lk} positions but v has {Lv}")
    if check_finite:
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not bool(torch.isfinite(t).all()):
                raise InputError(
                    f"{name} contains NaN or inf; attention of non-finite inputs is undefined "
                    "(pass check_finite=False to skip this check and accept NaN outputs)")
    return Dims(B, H, Hkv, Lq, Lk, D, Dv)


def default_scale(head_dim: int, scale: float | None) -> float:
    """``scale`` or ``head_dim ** -0.5``."""
    if scale is None:
        return head_dim ** -0.5
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not (scale == scale) or abs(scale) == float("inf"):
        raise InputError(f"scale={scale!r} must be a finite number")
    return float(scale)


def check_keywords(where: str, given: Mapping[str, object] | Iterable[str], accepted: Iterable[str]) -> None:
    """Raise :class:`UnexpectedArgumentError` naming the keywords of ``given`` not in ``accepted``.

    A silently ignored keyword (``attn(q, k, v, q_offset=5)``) would return a wrong answer.
    """
    accepted = tuple(accepted)
    unknown = [name for name in given if name not in accepted]
    if unknown:
        shown = ", ".join(a for a in accepted if not a.startswith("param:")) or "none"
        raise UnexpectedArgumentError(
            f"{where}() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}; accepted: {shown}")
