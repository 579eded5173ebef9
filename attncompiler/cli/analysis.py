"""``attnc analyze`` and ``attnc compare``: what a pattern can and cannot do at a length.

PATTERN is a catalogue name (``attnc list``), optionally with keyword parameters:
``bigbird``, ``"bigbird(block=32, random_blocks=2)"``, ``"sliding_window(window=128, causal=True)"``.
"""

from __future__ import annotations

import ast
import json
import sys

from ..errors import PatternError


def resolve_pattern(spec: str):
    """A pattern from ``name`` or ``name(key=literal, ...)`` over the catalogue."""
    from ..patterns import CATALOGUE

    try:
        node = ast.parse(spec.strip(), mode="eval").body
    except SyntaxError:
        raise PatternError(f"cannot parse pattern {spec!r}; write NAME or NAME(key=value, ...)") from None
    if isinstance(node, ast.Name):
        name, kwargs = node.id, {}
    elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.args:
        name = node.func.id
        try:
            kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
        except ValueError:
            raise PatternError(f"parameters of {spec!r} must be literals (numbers, booleans, lists)") from None
    else:
        raise PatternError(f"cannot parse pattern {spec!r}; write NAME or NAME(key=value, ...) with keywords only")
    if name not in CATALOGUE:
        raise PatternError(f"unknown pattern {name!r}; known: {', '.join(sorted(CATALOGUE))}")
    try:
        return CATALOGUE[name](**kwargs)
    except TypeError as e:
        raise PatternError(f"bad parameters for {name}: {e}") from None


def _common(p) -> None:
    p.add_argument("--seq-len", "-L", type=int, required=True, help="sequence length L")
    p.add_argument("--level", choices=("auto", "token", "block"), default="auto",
                   help="token graph, block quotient, or auto (token graph while small, see analyze())")
    p.add_argument("--block", type=int, default=None, help="block size of layouts and quotients (default 64)")
    p.add_argument("--heads", type=int, default=None, help="heads of an opaque per-head mask")
    p.add_argument("--head-dim", type=int, default=64, help="D for FLOPs and bytes (default 64)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _analyze(args, spec, layers=None):
    from ..analysis.report import analyze

    pattern = resolve_pattern(spec)
    rep = analyze(pattern, args.seq_len, layers=layers, block=args.block, level=args.level, heads=args.heads,
                  head_dim=args.head_dim, causal=True if getattr(args, "causal", False) else None,
                  progress=sys.stderr.isatty())
    return pattern, rep


def _cmd_analyze(args) -> int:
    pattern, rep = _analyze(args, args.pattern, args.layers)
    print(rep.to_json() if args.json else str(rep))
    if args.png:
        from ..analysis.plot import save_png

        save_png(rep, pattern, args.png)
        if not args.json:
            print(f"wrote {args.png}")
    return 0


def _cmd_compare(args) -> int:
    from ..analysis.report import compare_table

    reps = [_analyze(args, spec)[1] for spec in args.patterns]
    if args.json:
        print(json.dumps([r.to_dict() for r in reps], indent=2))
    else:
        print(compare_table(reps, names=list(args.patterns)))
    return 0


def register(subparsers) -> None:
    """Add ``analyze`` and ``compare`` to the ``attnc`` parser."""
    p = subparsers.add_parser("analyze", help="reachability, expansion and cost of a pattern at a length",
                              description=__doc__)
    p.add_argument("pattern", help="catalogue name, optionally NAME(key=value, ...)")
    _common(p)
    p.add_argument("--layers", type=int, default=None, help="profile the receptive field for N layers")
    p.add_argument("--causal", action="store_true", help="check the pattern as causal (report leaks)")
    p.add_argument("--png", default=None, metavar="FILE", help="also write a figure (needs matplotlib)")
    p.set_defaults(func=_cmd_analyze)
    c = subparsers.add_parser("compare", help="several patterns side by side", description=__doc__)
    c.add_argument("patterns", nargs="+", help="catalogue names, optionally NAME(key=value, ...)")
    _common(c)
    c.set_defaults(func=_cmd_compare)
