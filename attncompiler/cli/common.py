"""What every ``attnc`` subcommand shares: the argument parser that reports usage errors, the
catalogue lookup, options built from a pattern constructor's signature, number parsers, and the
guard that turns errors into exit codes.
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import sys
import types
import typing
from collections.abc import Sequence as SequenceABC
from typing import Any, Callable

from ..errors import PatternError

class UsageError(Exception):
    """A bad command line (unknown option, bad value): printed with usage, exit code 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{message}\n{self.format_usage().strip()}")


# ---------------------------------------------------------------------------------------------
# Pattern parameters -> options
# ---------------------------------------------------------------------------------------------

def catalogue() -> dict[str, Callable]:
    from ..patterns import CATALOGUE

    return CATALOGUE


def lookup(name: str) -> Callable:
    cat = catalogue()
    if name not in cat:
        close = difflib.get_close_matches(name, list(cat), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise PatternError(f"unknown pattern {name!r}{hint} (`attnc list` shows the catalogue: {', '.join(cat)})")
    return cat[name]


def _converter(tp: Any, default: Any) -> tuple[Callable[[str], Any], str]:
    """``(parse, metavar)`` for a parameter annotated ``tp`` (falls back to the default's type)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        parse, meta = _converter(inner[0] if len(inner) == 1 else str, None)
        return (lambda s: None if s.lower() == "none" else parse(s)), f"{meta}|none"
    if origin in (list, tuple, SequenceABC, typing.Sequence) or (
            tp is inspect.Parameter.empty and isinstance(default, (list, tuple))):
        elem = args[0] if args and args[0] is not Ellipsis else (
            type(default[0]) if isinstance(default, (list, tuple)) and default else int)
        parse_elem, meta = _converter(elem, None)

        def parse_list(s: str):
            items = [x.strip() for x in s.split(",") if x.strip()]
            return tuple(parse_elem(x) for x in items)
        return parse_list, f"{meta},..."
    if tp is inspect.Parameter.empty:
        tp = type(default) if default is not None and default is not inspect.Parameter.empty else str
    if tp is int:
        return _typed(int, "an integer"), "INT"
    if tp is float:
        return _typed(float, "a number"), "FLOAT"
    return str, "STR"


def _typed(fn, what):
    def parse(s: str):
        try:
            return fn(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not {what}") from None
    parse.__name__ = what
    return parse


def pattern_params(ctor: Callable) -> list[inspect.Parameter]:
    return [p for p in inspect.signature(ctor).parameters.values()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def _param_docs(ctor: Callable) -> dict[str, str]:
    """First line of each parameter's entry in the constructor's Google-style ``Args:`` section."""
    docs, in_args = {}, False
    for line in inspect.getdoc(ctor).splitlines() if ctor.__doc__ else []:
        stripped = line.strip()
        if stripped in ("Args:", "Arguments:"):
            in_args = True
        elif in_args and stripped.endswith(":") and not line.startswith(" "):
            break  # the next section (Returns:, Raises:, ...)
        elif in_args and ":" in stripped and line.startswith("    ") and not line.startswith("     "):
            name, text = stripped.split(":", 1)
            for n in name.split(","):
                docs[n.strip()] = text.strip()
    return docs


def add_pattern_options(parser: argparse.ArgumentParser, ctor: Callable, taken: set[str]) -> dict[str, str]:
    """Add one option per constructor parameter; returns ``{dest: parameter name}``."""
    docs = _param_docs(ctor)
    try:
        hints = typing.get_type_hints(ctor)
    except Exception:  # unresolvable annotations: fall back to the defaults' types
        hints = {}
    group = parser.add_argument_group(f"pattern parameters ({ctor.__name__})")
    dests = {}
    for p in pattern_params(ctor):
        flag = p.name.replace("_", "-")
        if p.name in taken or flag in taken:  # a command option has this name: prefix the pattern's
            flag = f"pattern-{flag}"
        dest = f"p__{p.name}"
        tp = hints.get(p.name, p.annotation if not isinstance(p.annotation, str) else inspect.Parameter.empty)
        has_default = p.default is not inspect.Parameter.empty
        help_default = docs.get(p.name) or p.name
        if has_default and "default" not in help_default.lower():
            help_default += f" (default: {p.default!r})"
        elif not has_default:
            help_default += " (required)"
        help_default = help_default.replace("%", "%%")  # argparse formats help strings with %
        names = [f"--{flag}"] + ([f"--{flag.replace('-', '_')}"] if "-" in flag else [])
        if tp is bool or (tp is inspect.Parameter.empty and isinstance(p.default, bool)):
            group.add_argument(*names, dest=dest, action=argparse.BooleanOptionalAction,
                               default=p.default if has_default else False, help=help_default)
        else:
            parse, meta = _converter(tp, p.default)
            kw = {"default": p.default} if has_default else {"required": True}
            group.add_argument(*names, dest=dest, type=parse, metavar=meta, help=help_default, **kw)
        dests[dest] = p.name
    return dests


def positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{v} must be a positive integer")
    return v


def positive_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a number") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"{v} must be > 0")
    return v



def guarded(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn a bad command line into a message and exit code 2 (library errors go to cli.main)."""
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except UsageError as e:
            print(f"attnc: error: {e}", file=sys.stderr)
            return 2
    return run


def describe_mask_tracing(pattern) -> str:
    """One line per ``ac.mask`` in ``pattern``: whether its mask_mod traced into an index
    expression and, if not, the first operation that stopped the tracer and its source line."""
    from ..dsl.mask_mod import Mask

    def masks(p):
        if isinstance(p, Mask):
            yield p
            return
        for c in p.children():
            yield from masks(c)

    lines = []
    for m in dict.fromkeys(masks(pattern)):
        if m.traced:
            lines.append(f"mask_mod traced: yes ({m.expr!r})")
        else:
            lines.append(f"mask_mod traced: no ({m!r}): {m.trace_failure or 'reason unknown'}; "
                         "evaluated as FlexAttention's create_mask does, kernels read byte masks")
    return "\n".join(lines)
