"""``attnc list | show | verify | bench | bench-layout``: the catalogue from the command line.

A pattern is a catalogue name (:data:`attncompiler.patterns.CATALOGUE`) whose constructor's
parameters become options (``attnc show bigbird --seq-len 4096 --window-blocks 5``: ints and
floats as numbers, bools as ``--flag/--no-flag``, sequences as comma lists ``--lengths 256,512``;
``attnc COMMAND PATTERN --help`` lists them), or a DSL expression in quotes
(``attnc verify "sliding_window(64) | global_tokens([0, 1]) & causal()"``), read safely by
:func:`attncompiler.cli.common.parse_command`. The commands are family-generic: anything
``ac.compile`` runs can be verified and benchmarked.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from .common import (catalogue, describe_mask_tracing, parse_command, pattern_params, positive_float, positive_int,
                     register_pattern_command)

VERIFY_LENGTHS = (512, 1024, 2048, 4096)
"""Lengths ``attnc verify`` picks its main length from: the first where the pattern is sparse."""
VERIFY_MAX_DENSITY = 0.5
VERIFY_ODD_LENGTH = 333
"""A second length, not a multiple of any block size, where the last blocks are ragged."""

COMMANDS = {
    "show": "draw a pattern (mask patterns) or print its program (other families)",
    "verify": "run a backend on random inputs and compare with the float64 reference",
    "bench": "time our backend vs SDPA (dense mask) and FlexAttention on the same inputs",
    "bench-layout": "time and peak memory of building our layout vs FlexAttention's create_block_mask",
}


# ---------------------------------------------------------------------------------------------
# Command options
# ---------------------------------------------------------------------------------------------

def _command_options(cmd: str, parser: argparse.ArgumentParser, pattern_names: set[str]) -> None:
    from ..bench.attention import DTYPES

    add = parser.add_argument
    defaults = {"show": 1024, "verify": None, "bench": 1024, "bench-layout": 65536}
    if cmd == "verify":
        add("--seq-len", type=positive_int, default=None,
            help=f"verify at this length only (default: the smallest of {', '.join(map(str, VERIFY_LENGTHS))} "
                 f"where the pattern is sparse, density <= {VERIFY_MAX_DENSITY}, then also at {VERIFY_ODD_LENGTH}, "
                 "not a block multiple)")
    else:
        add("--seq-len", type=positive_int, default=defaults[cmd], help=f"sequence length (default {defaults[cmd]})")
    if cmd in ("show", "bench-layout"):
        names = ["--layout-block"] + ([] if "block" in pattern_names else ["--block"])
        add(*names, dest="layout_block", type=positive_int, default=None,
            help="layout block size (default: the pattern's block parameter if it has one, else 64)")
    if cmd == "show":
        add("--width", type=positive_int, default=64, help="picture width in characters (default 64)")
        add("--head", type=int, default=0, help="head to draw for per-head patterns (default 0)")
        add("--unicode", action="store_true", help="draw with block characters instead of ASCII")
        add("--png", metavar="FILE", help="also save the picture as a PNG (needs matplotlib)")
    if cmd in ("verify", "bench"):
        heads, dim, batch = (2, 32, 2) if cmd == "verify" else (4, 64, 1)
        add("--heads", type=positive_int, default=heads, help=f"attention heads (default {heads})")
        add("--head-dim", type=positive_int, default=dim, help=f"head dimension (default {dim})")
        add("--batch", type=positive_int, default=batch, help=f"batch size (default {batch})")
        add("--dtype", choices=sorted(DTYPES), default="float32")
        add("--backend", default="torch", help="our backend: torch, triton or auto (default torch)")
        add("--backward", action="store_true", help="also run (and check / time) the backward pass")
        add("--input-seed", type=int, default=0, help="seed of the random q, k, v (default 0)")
    if cmd == "verify":
        add("--atol", type=positive_float, default=None,
            help="allowed max |out - ref| (default: 1e-4 for float32, 2e-2 for half types, 1e-10 for float64)")
    if cmd in ("bench", "bench-layout"):
        reps = 10 if cmd == "bench" else 3
        add("--repeats", type=positive_int, default=reps, help=f"timed runs per contender (default {reps})")
        add("--no-flex", action="store_true", help="skip FlexAttention (its compilation takes ~20 s on CPU)")
        add("--json", action="store_true", help="print machine-readable JSON")
        add("--quiet", action="store_true", help="no progress messages on stderr")
        add("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's own)")
    if cmd == "bench":
        add("--no-sdpa", action="store_true", help="skip SDPA with a dense mask")
        add("--device", default="cpu", help="cpu or cuda (default cpu)")
        add("--mask-cap-gb", type=positive_float, default=1.0,
            help="skip SDPA when its dense bool mask exceeds this many GiB (default 1)")
        add("--block-mask-cap-gb", type=positive_float, default=4.0,
            help="use our layout.to_block_mask() for FlexAttention when create_block_mask would need more (default 4)")
        add("--flex-block", type=positive_int, default=128, help="FlexAttention BLOCK_SIZE (default 128, its own)")
        add("--flex-mask", choices=("create", "layout"), default="create",
            help="FlexAttention BlockMask from create_block_mask(mask_mod) (default) or our layout.to_block_mask()")
        add("--no-memory", action="store_true", help="skip the peak-memory measurement")
    if cmd == "bench-layout":
        add("--timeout", type=positive_float, default=60.0, help="seconds per builder and length (default 60)")
        add("--mem-cap-gb", type=positive_float, default=8.0, help="memory cap per builder (default 8 GiB)")
        add("--flex-max-len", type=positive_int, default=None, help="skip create_block_mask above this length")
        add("--scan-from", type=positive_int, default=None,
            help="also try create_block_mask at this length, doubling up to --seq-len, to find its largest L")


def _parse(cmd: str, argv: list[str]):
    """Parse ``PATTERN [options]`` with the one grammar: returns the pattern spec, the options and
    the layout block (``--layout-block``, else the pattern's ``block`` parameter, else 64)."""
    [spec], opts = parse_command(cmd, COMMANDS[cmd], argv, lambda p, names: _command_options(cmd, p, names))
    block = getattr(opts, "layout_block", None) or spec.block or 64
    return spec, opts, block


def _progress(opts) -> Callable[[str], None]:
    if getattr(opts, "quiet", False):
        return lambda msg: None
    tty = sys.stderr.isatty()

    def show(msg: str) -> None:
        if tty:  # one status line, rewritten in place
            print(f"\r\033[K[attnc] {msg}", end="\n" if msg == "done" else "", file=sys.stderr, flush=True)
        else:
            print(f"[attnc] {msg}", file=sys.stderr, flush=True)
    return show


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------

_ABBREVIATIONS = frozenset({"al", "e.g", "i.e", "cf", "sec", "fig", "app", "eq", "vs", "resp"})


def first_sentence(doc: str | None) -> str:
    """The first full sentence of a docstring's first paragraph, on one line: it ends at a
    period outside parentheses that closes no abbreviation (``et al.``, ``sec.``) and is
    followed by the end or by a space and a capital."""
    para = " ".join((doc or "").strip().split("\n\n")[0].split())
    depth = 0
    for i, c in enumerate(para):
        depth += (c in "([") - (c in ")]")
        if c != "." or depth > 0:
            continue
        if i + 1 == len(para):
            return para
        word = para[:i].rsplit(" ", 1)[-1].lower()
        if para[i + 1] == " " and para[i + 2:i + 3].isupper() and word not in _ABBREVIATIONS:
            return para[:i + 1]
    return para


def cmd_list(args: argparse.Namespace) -> int:
    """``attnc list``: the catalogue, one line per pattern (the first sentence of its docstring)."""
    cat = catalogue()
    width = max(map(len, cat)) if cat else 0
    for name, ctor in cat.items():
        try:
            family = ctor().family
        except Exception:  # constructors with required parameters cannot be built bare
            family = "?"
        line = f"{name:<{width}}  {family:<10} {first_sentence(ctor.__doc__)}"
        if args.verbose:
            params = " ".join(f"--{p.name.replace('_', '-')}" for p in pattern_params(ctor))
            line += f"\n{'':<{width}}  {'':<10} options: {params or '(none)'}"
        print(line)
    return 0


def cmd_show(argv: list[str]) -> int:
    """``attnc show PATTERN``: picture and density (mask patterns) or the program (others)."""
    from ..runtime.compile import compile as ac_compile
    from ..dsl.pattern import Family
    from ..layout.picture import ASCII_CHARS, UNICODE_CHARS, render_text, save_png

    spec, opts, block = _parse("show", argv)
    pattern = spec.pattern
    L = opts.seq_len
    print(f"{spec.text}: {pattern!r}")
    print(f"family: {pattern.family}, L={L}")
    if tracing := describe_mask_tracing(pattern):
        print(tracing)
    if pattern.family != Family.MASK:
        print(ac_compile(pattern, "torch").program)
        return 0
    heads = max(opts.head + 1, 1)
    lay = pattern.layout(L, L, block, batch=1, heads=heads)
    if len(lay.groups) > 1 or pattern.head_period != 1:
        print(f"heads differ (head period {pattern.head_period}); drawing head {opts.head} (use --head)")
    print(render_text(pattern, L, width=opts.width, block=block, head=opts.head,
                      charset=UNICODE_CHARS if opts.unicode else ASCII_CHARS))
    grp = lay.group_for(0, opts.head)
    total = lay.num_q_blocks * lay.num_kv_blocks
    print(f"layout: block {block}, {lay.num_q_blocks} x {lay.num_kv_blocks} blocks; head {opts.head}: "
          f"{grp.num_blocks} non-empty ({grp.num_full} full, {grp.num_blocks - grp.num_full} partial, "
          f"{total - grp.num_blocks} empty), block density {grp.num_blocks / total:.4f}")
    pairs = grp.allowed_pairs()
    print(f"density: {pairs / (L * L):.6f} ({pairs} of {L * L} (q, k) pairs allowed, head {opts.head})")
    if opts.png:
        save_png(pattern, opts.png, L, block=block, head=opts.head)
        print(f"saved {opts.png}")
    return 0


def density(pattern, L: int, heads: int = 1) -> float | None:
    """Allowed (q, k) pairs / L^2, averaged over ``heads`` (mask patterns; None for others)."""
    from ..dsl.pattern import Family

    if pattern.family != Family.MASK:
        return None
    lay = pattern.layout(L, L, 64, batch=1, heads=heads)
    return sum(lay.group_for(0, h).allowed_pairs() for h in range(heads)) / (heads * L * L)


def verify_lengths(pattern, heads: int) -> tuple[list[int], str]:
    """The default lengths of ``attnc verify`` and why: the smallest of VERIFY_LENGTHS where
    the pattern's density is at most VERIFY_MAX_DENSITY (else the largest), then VERIFY_ODD_LENGTH."""
    chosen, why = VERIFY_LENGTHS[0], "not a mask pattern: density not defined"
    for L in VERIFY_LENGTHS:
        d = density(pattern, L, heads)
        if d is None:
            break
        chosen = L
        why = f"density {d:.4f} at L={L}" + ("" if d <= VERIFY_MAX_DENSITY else
                                              f" (> {VERIFY_MAX_DENSITY} up to L={VERIFY_LENGTHS[-1]}: dense here)")
        if d <= VERIFY_MAX_DENSITY:
            break
    return [chosen, VERIFY_ODD_LENGTH], why


def _describe_variation(pattern, batch: int, heads: int) -> str:
    period = pattern.head_period
    per_head = "differs per head (period {})".format(period) if period not in (None, 1) else "same for every head"
    per_batch = "differs per batch entry" if getattr(pattern, "batch_dependent", False) else "same for every batch entry"
    return f"batch {batch} x heads {heads}: the pattern {per_head}, {per_batch}"


def _verify_one(attn, opts, L: int, dtype, atol: float) -> tuple[dict[str, float], bool]:
    """Run the backend and the float64 reference on seeded random inputs at length L."""
    import torch

    gen = torch.Generator().manual_seed(opts.input_seed)
    shape = (opts.batch, opts.heads, L, opts.head_dim)
    q, k, v, g = (torch.randn(*shape, generator=gen).to(dtype) for _ in range(4))  # [B, H, L, D]
    for t in (q, k, v):
        t.requires_grad_(opts.backward)
    out = attn(q, k, v)  # [B, H, L, D]
    ref = attn.reference(q, k, v)  # float64
    errors = {"out": float((out.detach().double() - ref.detach()).abs().max())}
    if opts.backward:
        got = torch.autograd.grad(out, (q, k, v), g)
        want = torch.autograd.grad(ref, (q, k, v), g.double())
        errors.update({f"d{n}": float((a.double() - b).abs().max()) for n, a, b in zip("qkv", got, want)})
    return errors, all(e <= atol for e in errors.values())


def cmd_verify(argv: list[str]) -> int:
    """``attnc verify PATTERN``: backend vs float64 reference on random inputs at several lengths,
    batch 2 x heads 2 by default (exit 1 on mismatch)."""
    import torch

    from ..bench.attention import DTYPES
    from ..runtime.compile import compile as ac_compile

    spec, opts, _ = _parse("verify", argv)
    pattern = spec.pattern
    dtype = DTYPES[opts.dtype]
    atol = opts.atol or {torch.float32: 1e-4, torch.float64: 1e-10}.get(dtype, 2e-2)
    attn = ac_compile(pattern, opts.backend, check_finite=True)  # verify rejects NaN/inf inputs
    print(f"{spec.text}: {pattern!r}")
    if opts.seq_len is None:
        lengths, why = verify_lengths(pattern, opts.heads)
        print(f"lengths {', '.join(map(str, lengths))} ({why}; {lengths[-1]} is not a block multiple)")
    else:
        lengths = [opts.seq_len]
        d = density(pattern, opts.seq_len, opts.heads)
        print(f"length {opts.seq_len}" + ("" if d is None else f", density {d:.4f}"))
    print(f"backend {opts.backend}, {_describe_variation(pattern, opts.batch, opts.heads)}, head_dim {opts.head_dim}, "
          f"{opts.dtype}, input seed {opts.input_seed}")
    ok = True
    for L in lengths:
        errors, good = _verify_one(attn, opts, L, dtype, atol)
        ok &= good
        for name, e in errors.items():
            print(f"L={L}: max |{name} - reference| = {e:.3e}  ({'ok' if e <= atol else 'FAIL'}, tolerance {atol:g})")
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


def set_threads(n: int | None) -> None:
    """``torch.set_num_threads(n)`` when ``--threads`` was given."""
    if n is not None:
        import torch

        torch.set_num_threads(n)


def cmd_bench(argv: list[str]) -> int:
    """``attnc bench PATTERN``: our backend vs SDPA vs FlexAttention."""
    from ..bench.attention import run_bench

    if "--grid" in argv:  # the CPU benchmark grid: its own options (attnc bench --grid --help)
        from ..bench.grid import main as grid_main

        return grid_main([a for a in argv if a != "--grid"])
    spec, opts, _ = _parse("bench", argv)
    set_threads(opts.threads)
    pattern = spec.pattern
    contenders = tuple(c for c, off in (("attnc", False), ("sdpa", opts.no_sdpa), ("flex", opts.no_flex)) if not off)
    res = run_bench(pattern, opts.seq_len, heads=opts.heads, head_dim=opts.head_dim, batch=opts.batch,
                    dtype=opts.dtype, backward=opts.backward, repeats=opts.repeats, contenders=contenders,
                    device=opts.device, backend=opts.backend, seed=opts.input_seed,
                    mask_cap_bytes=int(opts.mask_cap_gb * 2**30),
                    block_mask_cap_bytes=int(opts.block_mask_cap_gb * 2**30), flex_block=opts.flex_block,
                    flex_mask=opts.flex_mask, measure_memory=not opts.no_memory, progress=_progress(opts))
    print(res.to_json() if opts.json else res)
    return 0


def cmd_bench_layout(argv: list[str]) -> int:
    """``attnc bench-layout PATTERN``: layout build time and memory vs create_block_mask."""
    from ..bench.layout import run_layout_bench

    spec, opts, block = _parse("bench-layout", argv)
    set_threads(opts.threads)
    pattern = spec.pattern
    builders = ("attnc",) if opts.no_flex else ("attnc", "flex")
    res = run_layout_bench(pattern, opts.seq_len, block=block, repeats=opts.repeats, builders=builders,
                           timeout_s=opts.timeout, mem_cap_bytes=int(opts.mem_cap_gb * 2**30),
                           flex_max_len=opts.flex_max_len, scan_from=opts.scan_from, progress=_progress(opts))
    print(res.to_json() if opts.json else res)
    return 0


def register(subparsers) -> None:
    """Add ``list``, ``show``, ``verify``, ``bench`` and ``bench-layout`` to the ``attnc`` parser."""
    p = subparsers.add_parser("list", help="the pattern catalogue with one-line descriptions",
                              description="List the named patterns of attncompiler.patterns.CATALOGUE.")
    p.add_argument("-v", "--verbose", action="store_true", help="also list each pattern's options")
    p.set_defaults(func=cmd_list)
    funcs = {"show": cmd_show, "verify": cmd_verify, "bench": cmd_bench, "bench-layout": cmd_bench_layout}
    for cmd, help_text in COMMANDS.items():
        register_pattern_command(subparsers, cmd, help_text, funcs[cmd])
