"""``attnc analyze`` and ``attnc compare``: what a pattern can and cannot do at a length.

PATTERN is a catalogue name with ``--param value`` options (``attnc analyze bigbird -L 4096
--random-blocks 2``) or a DSL expression (``"sliding_window(64) | global_tokens([0])"``,
``"bigbird(block=32)"``, ``"sliding_window(window=128, causal=True)"``); ``compare`` takes
several of either. The analysis level is chosen automatically (``--level`` overrides it) and
progress is shown on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys

from .common import parse_command, parse_expression, register_pattern_command


def resolve_pattern(spec: str):
    """The pattern a catalogue name or DSL expression spells (see :func:`parse_expression`)."""
    return parse_expression(spec)


def _common(p: argparse.ArgumentParser, pattern_names: set[str]) -> None:
    p.add_argument("--seq-len", "-L", type=int, required=True, help="sequence length L")
    p.add_argument("--level", choices=("auto", "token", "block"), default="auto",
                   help="token graph, block quotient, or auto (the exact level while it answers in seconds)")
    names = ["--layout-block"] + ([] if "block" in pattern_names else ["--block"])
    p.add_argument(*names, dest="layout_block", type=int, default=None,
                   help="block size of layouts and quotients (default: the pattern's block parameter, else 64)")
    p.add_argument("--heads", type=int, default=None, help="heads of an opaque per-head mask")
    p.add_argument("--head-dim", type=int, default=64, help="D for FLOPs and bytes (default 64)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--quiet", action="store_true", help="no progress line on stderr (shown on a terminal)")


def _analyze_options(p: argparse.ArgumentParser, pattern_names: set[str]) -> None:
    _common(p, pattern_names)
    p.add_argument("--layers", type=int, default=None, help="profile the receptive field for N layers")
    names = ["--check-causal"] + ([] if "causal" in pattern_names else ["--causal"])
    p.add_argument(*names, action="store_true", dest="check_causal", help="check the pattern as causal (report leaks)")
    p.add_argument("--png", default=None, metavar="FILE",
                   help="also write a figure: reach per layer and spectrum (needs matplotlib)")


def _analyze(args, spec, layers=None):
    from ..analysis.report import analyze

    rep = analyze(spec.pattern, args.seq_len, layers=layers, block=args.layout_block or spec.block,
                  level=args.level, heads=args.heads, head_dim=args.head_dim,
                  causal=True if getattr(args, "check_causal", False) else None,
                  progress=not args.quiet and sys.stderr.isatty())
    return spec.pattern, rep


def _cmd_analyze(argv: list[str]) -> int:
    [spec], args = parse_command("analyze", "reachability, expansion and cost of a pattern at a length",
                                 argv, _analyze_options)
    pattern, rep = _analyze(args, spec, args.layers)
    print(rep.to_json() if args.json else str(rep))
    if args.png:
        from ..analysis.plot import save_png

        save_png(rep, pattern, args.png)
        if not args.json:
            print(f"wrote {args.png}")
    return 0


def _cmd_compare(argv: list[str]) -> int:
    from ..analysis.report import compare_table

    specs, args = parse_command("compare", "several patterns side by side", argv, _common, many=True)
    reps = [_analyze(args, spec)[1] for spec in specs]
    if args.json:
        print(json.dumps([r.to_dict() for r in reps], indent=2))
    else:
        print(compare_table(reps, names=[s.text for s in specs]))
    return 0


def register(subparsers) -> None:
    """Add ``analyze`` and ``compare`` to the ``attnc`` parser."""
    register_pattern_command(subparsers, "analyze", "reachability, expansion and cost of a pattern at a length",
                             _cmd_analyze)
    register_pattern_command(subparsers, "compare", "several patterns side by side", _cmd_compare, many=True)
