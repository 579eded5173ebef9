"""Rewriting and running an :class:`~attncompiler.ir.expr.Expr`: :func:`substitute` (specialize
variables to constants, e.g. one head) and :func:`to_mask_mod` (a FlexAttention mask_mod in torch ops).
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch

from .expr import BinOp, Const, Expr, Load, UnOp, Var, Where, binop, unop, where
from .ops import TORCH_BINOPS
from .index import Index, index


def substitute(e: Expr, values: Mapping[str, int]) -> Expr:
    """Replace variables by integer constants and fold (e.g. specialize a predicate to one head)."""
    match e:
        case Var(name) if name in values:
            return Const(int(values[name]))
        case Var() | Const():
            return e
        case Load(buf, idx, fill):
            return Load(buf, substitute(idx, values), fill)
        case Index(buf, shape, idxs):
            return index(buf, shape, tuple(substitute(i, values) for i in idxs))
        case BinOp(op, a, b):
            return binop(op, substitute(a, values), substitute(b, values))
        case UnOp(op, a):
            return unop(op, substitute(a, values))
        case Where(c, a, b):
            return where(substitute(c, values), substitute(a, values), substitute(b, values))
    raise AssertionError(f"unknown expression node {e!r}")


def to_mask_mod(e: Expr, device: torch.device | str = "cpu") -> Callable:
    """A FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` evaluating ``e`` with plain torch ops.

    Buffers are captured as tensors up front, so the function traces cleanly under
    ``torch.compile`` (no Python-side caches or numpy in the call path).
    """

    def build(node: Expr) -> Callable:
        match node:
            case Var(name):
                idx = ("b", "h", "q_idx", "kv_idx").index(name)
                return lambda args: torch.as_tensor(args[idx]).to(torch.int64)  # int64 index arithmetic
            case Const(value):
                return lambda args: value
            case Load(buf, index, fill):
                table = torch.from_numpy(buf.data.copy()).to(device)
                n, f = len(buf), build(index)

                def load(args):
                    i = f(args)
                    inside = (i >= 0) & (i < n)
                    return torch.where(inside, table[i.clamp(0, max(n - 1, 0))], fill)
                return load
            case Index(buf, shape, idxs):
                table = torch.from_numpy(buf.data.copy()).to(device)
                fs = [build(i) for i in idxs]

                def gather(args):
                    # Ranges were checked when the layout was built; wrap negatives as torch does.
                    flat = 0
                    for f, n in zip(fs, shape):
                        i = torch.as_tensor(f(args))
                        flat = flat * n + torch.where(i < 0, i + n, i)
                    return table[torch.as_tensor(flat).clamp(0, max(len(buf) - 1, 0))]
                return gather
            case BinOp(op, a, b):
                fa, fb, fn = build(a), build(b), TORCH_BINOPS[op]
                return lambda args: fn(fa(args), fb(args))
            case UnOp("abs", a):
                fa = build(a)
                return lambda args: torch.abs(fa(args))
            case UnOp(_, a):
                fa = build(a)
                return lambda args: ~fa(args)
            case Where(c, a, b):
                fc, fa, fb = build(c), build(a), build(b)
                return lambda args: torch.where(fc(args), fa(args), fb(args))
        raise AssertionError(f"unknown expression node {node!r}")

    body = build(e)

    def mask_mod(b, h, q_idx, kv_idx):
        return body((b, h, q_idx, kv_idx))

    return mask_mod
