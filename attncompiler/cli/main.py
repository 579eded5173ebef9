"""The ``attnc`` command line.

Subcommands live in small modules, each exposing ``register(subparsers)`` that adds its
parsers and sets ``func`` on them (or ``run_argv``: commands that take a pattern parse their own
argument list with the one grammar of :func:`attncompiler.cli.common.parse_command`); this module
only assembles them. Building the parser imports no heavy module (torch, triton, sympy).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import AttnCompilerError
from .common import UsageError

# Modules contributing subcommands (each defines ``register(subparsers)``).
COMMAND_MODULES = (
    "attncompiler.cli.patterns",     # list, show, verify, bench
    "attncompiler.cli.analysis",     # analyze, compare
    "attncompiler.cli.codegen",      # compile --emit, explain
    "attncompiler.cli.distributed",  # plan
    "attncompiler.cli.reuse",        # similarity
)


def build_parser() -> argparse.ArgumentParser:
    """The ``attnc`` parser, with one subcommand per command module's ``register``."""
    parser = argparse.ArgumentParser(prog="attnc", description="attncompiler: declare, analyze and run attention patterns")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``attnc``; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    run_argv = sub.choices[argv[0]].get_default("run_argv") if argv and argv[0] in sub.choices else None
    try:
        if run_argv is not None:
            return int(run_argv(argv[1:]) or 0)
        args = parser.parse_args(argv)
        return int(args.func(args) or 0)
    except UsageError as e:
        print(f"attnc: error: {e}", file=sys.stderr)
        return 2
    except AttnCompilerError as e:
        print(f"attnc: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
