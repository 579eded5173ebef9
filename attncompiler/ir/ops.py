"""Operators of the index-expression IR, as tables: kinds, Python symbols and precedence, and
the torch and Python implementations (floor division and modulo refuse a zero divisor).

A leaf: the node classes (:mod:`.expr`), interval bounds (:mod:`.bounds`) and rendering read it.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..errors import PatternError

INT = "int"
BOOL = "bool"
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

# op name -> (python symbol for repr, precedence, result kind or None = same as operands)
BINOPS: dict[str, tuple[str, int, str | None]] = {
    # Python's precedence, so that repr() reads as (and parses as) the code that builds it.
    "eq": ("==", 1, BOOL),
    "ne": ("!=", 1, BOOL),
    "lt": ("<", 1, BOOL),
    "le": ("<=", 1, BOOL),
    "gt": (">", 1, BOOL),
    "ge": (">=", 1, BOOL),
    "or": ("|", 2, None),
    "xor": ("^", 3, None),
    "and": ("&", 4, None),
    "lshift": ("<<", 5, INT),
    "rshift": (">>", 5, INT),
    "add": ("+", 6, INT),
    "sub": ("-", 6, INT),
    "mul": ("*", 7, INT),
    "floordiv": ("//", 7, INT),
    "mod": ("%", 7, INT),
    "min": ("min", 9, INT),
    "max": ("max", 9, INT),
}
COMPARISONS = {"eq", "ne", "lt", "le", "gt", "ge"}
SHIFTS = {"lshift", "rshift"}


def wrap64(v: int) -> int:
    """A Python int reduced to int64 two's complement (what torch's int64 arithmetic keeps)."""
    return ((int(v) + 2**63) % 2**64) - 2**63


def py_lshift(x: int, s: int) -> int:
    """torch's int64 ``x << s``: wraps; a count outside [0, 63] gives 0."""
    return 0 if not 0 <= s <= 63 else wrap64(x << s)


def py_rshift(x: int, s: int) -> int:
    """torch's int64 ``x >> s`` (arithmetic): a count outside [0, 63] shifts by 63 (the sign)."""
    return x >> (s if 0 <= s <= 63 else 63)


def check_divisor(y) -> None:
    """Raise :class:`PatternError` on a zero divisor in an eager mask_mod (skipped under torch.compile)."""
    if isinstance(y, torch.Tensor) and not torch.compiler.is_compiling() and bool((y == 0).any()):
        raise PatternError("integer division or modulo by zero in a traced mask_mod (torch raises "
                           "ZeroDivisionError there too); keep the divisor non-zero, e.g. `x // (k + 1)`")


def floordiv(x, y):
    """Python ``//`` on tensors (floor rounding), with a zero-divisor check."""
    check_divisor(y)
    return torch.div(x, y, rounding_mode="floor")  # Python/torch `//`: floors


def mod(x, y):
    """Python ``%`` on tensors (result takes the divisor's sign), with a zero-divisor check."""
    check_divisor(y)
    return torch.remainder(x, y)  # Python/torch `%`: the sign of the divisor


TORCH_BINOPS: dict[str, Callable] = {
    "add": torch.add, "sub": torch.sub, "mul": torch.mul,
    "floordiv": floordiv, "mod": mod,
    "and": lambda x, y: x & y, "or": lambda x, y: x | y, "xor": lambda x, y: x ^ y,
    "eq": torch.eq, "ne": torch.ne, "lt": torch.lt, "le": torch.le, "gt": torch.gt, "ge": torch.ge,
    "min": torch.minimum, "max": torch.maximum,
    "lshift": torch.bitwise_left_shift, "rshift": torch.bitwise_right_shift,
}
PY_BINOPS: dict[str, Callable] = {
    "add": lambda x, y: x + y, "sub": lambda x, y: x - y, "mul": lambda x, y: x * y,
    "floordiv": lambda x, y: x // y, "mod": lambda x, y: x % y,
    "and": lambda x, y: x & y, "or": lambda x, y: x | y, "xor": lambda x, y: x ^ y,
    "eq": lambda x, y: x == y, "ne": lambda x, y: x != y, "lt": lambda x, y: x < y,
    "le": lambda x, y: x <= y, "gt": lambda x, y: x > y, "ge": lambda x, y: x >= y,
    "min": min, "max": max,
    "lshift": py_lshift, "rshift": py_rshift,
}
