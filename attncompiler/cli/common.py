"""What every ``attnc`` subcommand shares: the one pattern grammar (a catalogue name with
``--param value`` options, or a DSL expression read by :func:`attncompiler.patterns.text.parse_pattern`),
the argument parser that reports usage errors, options built from a pattern constructor's
signature, number parsers, and the guard that turns errors into exit codes.

This module imports nothing heavy at import time: ``attnc --help`` builds its parser from it.
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import sys
import types
import typing
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import InputError, PatternError


class UsageError(Exception):
    """A bad command line (unknown option, bad value): printed with usage, exit code 2."""


class Parser(argparse.ArgumentParser):
    """ArgumentParser that raises :class:`UsageError` (with the usage line) instead of printing and
    exiting, so the CLI reports usage errors like its other errors."""
    def error(self, message):
        raise UsageError(f"{message}\n{self.format_usage().strip()}")


# ---------------------------------------------------------------------------------------------
# Pattern parameters -> options
# ---------------------------------------------------------------------------------------------

def catalogue() -> dict[str, Callable]:
    """The pattern catalogue, name -> constructor (imported on first use, keeping CLI start-up fast)."""
    from ..patterns import CATALOGUE

    return CATALOGUE


def lookup(name: str) -> Callable:
    """The catalogue constructor called ``name``; raises :class:`PatternError` naming close matches
    otherwise."""
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
    """The parameters of ``ctor`` that can be passed by name, i.e. those the CLI offers as options."""
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
    """argparse ``type`` for an integer >= 1; raises ArgumentTypeError otherwise."""
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{v} must be a positive integer")
    return v


def positive_float(s: str) -> float:
    """argparse ``type`` for a number > 0; raises ArgumentTypeError otherwise."""
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


def mask_mods(pattern) -> list:
    """Every distinct ``ac.mask`` node in ``pattern``, in order."""
    from ..dsl.mask_mod import Mask

    def walk(p):
        if isinstance(p, Mask):
            yield p
            return
        for c in p.children():
            yield from walk(c)

    return list(dict.fromkeys(walk(pattern)))


def describe_mask_tracing(pattern) -> str:
    """One line per ``ac.mask`` in ``pattern``: whether its mask_mod traced into an index
    expression and, if not, the first operation that stopped the tracer and its source line."""
    lines = []
    for m in mask_mods(pattern):
        if m.traced:
            lines.append(f"mask_mod traced: yes ({m.expr!r})")
        else:
            lines.append(f"mask_mod traced: no ({m!r}): {m.trace_failure or 'reason unknown'}; "
                         "evaluated as FlexAttention's create_mask does, kernels read byte masks")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# One pattern grammar for every command
# ---------------------------------------------------------------------------------------------

PATTERN_HELP = ("a catalogue name (`attnc list`), whose parameters become options (--window 64), or a DSL "
                "expression in quotes: \"sliding_window(64) | global_tokens([0, 1]) & causal()\", "
                "\"bigbird(block=64)\"")


@dataclass(frozen=True)
class PatternSpec:
    """A pattern as given on the command line.

    Attributes:
        text: what was typed (a catalogue name or an expression).
        pattern: the pattern it builds.
        params: the catalogue parameters used (empty for expressions).
        from_catalogue: whether ``text`` is a catalogue name (parameters came from options).
    """

    text: str
    pattern: Any
    params: dict
    from_catalogue: bool

    @property
    def block(self) -> int | None:
        """The pattern's own ``block`` parameter, when the catalogue entry has one."""
        b = self.params.get("block")
        return b if isinstance(b, int) and not isinstance(b, bool) else None

    @property
    def stem(self) -> str:
        """A file-name-safe label: the catalogue name, or the expression's words joined by ``_``."""
        words = "_".join(w for w in "".join(c if c.isalnum() else " " for c in self.text).split() if w != "ac")
        return words[:60].rstrip("_") or "pattern"


def is_catalogue_name(text: str) -> bool:
    """Whether ``text`` is exactly the name of a catalogue pattern."""
    return text.isidentifier() and text in catalogue()


def parse_expression(text: str):
    """The pattern a DSL expression spells, read with ``patterns.text.parse_pattern`` (an ast
    interpreter over the DSL's names; nothing is evaluated). Also takes a bare catalogue or DSL
    name and the older ``NAME(key=literal, ...)`` catalogue form. Errors point at the offending
    column with a caret."""
    from ..patterns.text import dsl_names, parse_pattern

    stripped = text.strip()
    if is_catalogue_name(stripped):
        return catalogue()[stripped]()
    if stripped.isidentifier():
        if stripped in dsl_names()[0]:
            return parse_pattern(f"{stripped}()")
        lookup(stripped)  # raises PatternError with close matches
    try:
        return parse_pattern(text)
    except InputError as e:
        legacy = _catalogue_call(stripped)
        if legacy is not None:
            return legacy
        raise InputError(f"{e}{caret(text, str(e))}") from None


def _catalogue_call(text: str):
    """``NAME(key=literal, ...)`` over the catalogue (the form ``attnc analyze`` took), or None."""
    import ast

    try:
        node = ast.parse(text, mode="eval").body
    except SyntaxError:
        return None
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.args
            and all(kw.arg for kw in node.keywords) and is_catalogue_name(node.func.id)):
        return None
    try:
        kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
        return catalogue()[node.func.id](**kwargs)
    except (ValueError, TypeError, SyntaxError, PatternError):
        return None


def caret(text: str, message: str) -> str:
    """Two lines showing ``text`` with a ``^`` under the column that ``message`` names
    (``... at line 1, column C``, counted in the stripped text); empty when it names none."""
    import re

    m = re.search(r"at line (\d+), column (-?\d+)", message)
    if m is None or "\n" in text.strip() or int(m.group(1)) != 1:
        return ""
    col = int(m.group(2)) - 1 + (len(text) - len(text.lstrip()))
    if not 0 <= col <= len(text):
        return ""
    return f"\n    {text}\n    {' ' * col}^"


def _positionals(argv: list[str], probe: argparse.ArgumentParser) -> list[str]:
    """The positional words of ``argv``: skips the options ``probe`` knows with their values,
    and unknown options (pattern parameters) with one value unless that looks like a pattern."""
    nvals = {s: (1 if a.nargs is None else a.nargs if isinstance(a.nargs, int) else 1)
             for a in probe._actions for s in a.option_strings}
    out, i = [], 0
    while i < len(argv):
        tok = argv[i]
        if tok == "--":
            return out + argv[i + 1:]
        if tok.startswith("-") and len(tok) > 1 and not _is_number(tok):
            if "=" not in tok:
                if tok in nvals:
                    i += nvals[tok]
                elif i + 1 < len(argv) and not argv[i + 1].startswith("-") and not _looks_like_pattern(argv[i + 1]):
                    i += 1
        else:
            out.append(tok)
        i += 1
    return out


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _looks_like_pattern(s: str) -> bool:
    return "(" in s or is_catalogue_name(s)


def parse_command(cmd: str, description: str, argv: list[str],
                  add_options: Callable[[argparse.ArgumentParser, set[str]], None],
                  many: bool = False) -> tuple[list[PatternSpec], argparse.Namespace]:
    """Parse ``attnc CMD PATTERN [options]`` (``PATTERN...`` when ``many``) with the one grammar.

    ``add_options(parser, pattern_param_names)`` adds the command's own options. A single
    catalogue name also gets one option per constructor parameter; an expression carries its
    parameters itself. Returns the patterns and the parsed options."""
    probe = Parser(prog=f"attnc {cmd}", add_help=False)
    add_options(probe, set())
    words = _positionals(list(argv), probe)
    ctor = lookup(words[0]) if (not many and words and words[0].isidentifier()
                                and words[0] not in _dsl_only_names()) else None
    pnames = {p.name for p in pattern_params(ctor)} if ctor else set()
    parser = Parser(prog=f"attnc {cmd}" + (f" {words[0]}" if ctor else ""), description=description)
    add_options(parser, pnames)
    parser.add_argument("pattern", nargs="+" if many else None, help=PATTERN_HELP)
    dests = {}
    if ctor is not None:
        taken = {a.dest for a in parser._actions} | {s.lstrip("-") for a in parser._actions for s in a.option_strings}
        dests = add_pattern_options(parser, ctor, taken)
    opts = parser.parse_args(list(argv))
    if ctor is not None:
        kwargs = {name: getattr(opts, dest) for dest, name in dests.items()}
        return [PatternSpec(opts.pattern, ctor(**kwargs), kwargs, True)], opts
    texts = opts.pattern if many else [opts.pattern]
    return [_spec(t) for t in texts], opts


def _spec(text: str) -> PatternSpec:
    if is_catalogue_name(text):
        ctor = catalogue()[text]
        params = {p.name: p.default for p in pattern_params(ctor) if p.default is not inspect.Parameter.empty}
        return PatternSpec(text, ctor(), params, True)
    return PatternSpec(text, parse_expression(text), {}, False)


def _dsl_only_names() -> set[str]:
    """DSL constructor names that are not catalogue names (``full``, ``strided`` is both)."""
    from ..patterns.text import dsl_names

    return set(dsl_names()[0]) - set(catalogue())


def register_pattern_command(subparsers, cmd: str, help_text: str, run: Callable[[list[str]], int],
                             many: bool = False) -> None:
    """Add ``cmd`` to ``attnc``'s help; ``attnc CMD ...`` then calls ``run(argv)`` (see cli.main),
    which parses with :func:`parse_command` so options may come before or after the pattern."""
    p = subparsers.add_parser(cmd, help=help_text, description=(
        f"{help_text}. PATTERN is {PATTERN_HELP}. `attnc {cmd} PATTERN --help` lists the options "
        "(a catalogue pattern's parameters included)."))
    p.add_argument("pattern", nargs="+" if many else None, help=PATTERN_HELP)
    p.add_argument("rest", nargs=argparse.REMAINDER, metavar="...", help="options")
    p.set_defaults(run_argv=run)
