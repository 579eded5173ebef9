"""The ``attnc`` command line.

Subcommands live in small modules, each exposing ``register(subparsers)`` that adds its
parsers and sets ``func`` on them; this module only assembles them.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import AttnCompilerError

# Modules contributing subcommands (each defines ``register(subparsers)``).
COMMAND_MODULES = (
    "attncompiler.cli.patterns",     # list, show, verify, bench
    "attncompiler.cli.analysis",     # analyze, compare
    "attncompiler.cli.codegen",      # compile --emit, explain
    "attncompiler.cli.distributed",  # plan
    "attncompiler.cli.reuse",        # similarity
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnc", description="attncompiler: declare, analyze and run attention patterns")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``attnc``; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except AttnCompilerError as e:
        print(f"attnc: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
