"""Operator names of the index-expression IR and their tables: kinds, Python symbols, precedence.

A leaf: the node classes (:mod:`.expr`), interval bounds (:mod:`.bounds`) and rendering read it.
"""

from __future__ import annotations

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
    "add": ("+", 6, INT),
    "sub": ("-", 6, INT),
    "mul": ("*", 7, INT),
    "floordiv": ("//", 7, INT),
    "mod": ("%", 7, INT),
    "min": ("min", 9, INT),
    "max": ("max", 9, INT),
}
COMPARISONS = {"eq", "ne", "lt", "le", "gt", "ge"}
