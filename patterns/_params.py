"""Parameter checks shared by the catalogue constructors: the DSL's integer rule (an int, not a
bool, within ``[minimum, 2**62]``) applied before a constructor does arithmetic with it."""

from __future__ import annotations

from typing import Any

from attncompiler.errors import PatternError
from attncompiler.dsl.pattern import INT_LIMIT


def int_param(name: str, value: Any, minimum: int, maximum: int = INT_LIMIT) -> int:
    """``value`` as an int in ``[minimum, maximum]``, else a PatternError naming ``name`` and the range."""
    if isinstance(value, bool) or not isinstance(value, int) and type(value).__name__ not in _NUMPY_INTS:
        raise PatternError(f"{name}={value!r} must be an integer")
    if value < minimum:
        raise PatternError(f"{name}={value!r} must be >= {minimum}")
    if value > maximum:
        bound = "2**62 (index arithmetic must fit in int64)" if maximum == INT_LIMIT else str(maximum)
        raise PatternError(f"{name}={value!r} is out of range: allowed {minimum} <= {name} <= {bound}")
    return int(value)


_NUMPY_INTS = {"int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"}
