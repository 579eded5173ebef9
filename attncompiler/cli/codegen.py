"""``attnc compile PATTERN --emit DIR`` and ``attnc explain PATTERN``.

``compile`` writes the generated Triton source of a catalogue pattern for a user to read;
``explain`` prints the pipeline layer by layer: the pattern, its block layout, the program's
stages and schedules, and the generated kernel file (written to the kernel cache).
"""

from __future__ import annotations

import argparse
from pathlib import Path

# The pattern-option machinery of `attnc show/verify/bench`, so every command reads the same options.
from .common import Parser, add_pattern_options, describe_mask_tracing, guarded, lookup, pattern_params, positive_int

_DTYPES = ("float32", "float16", "bfloat16")
_HELP = {"compile": "generate the Triton kernels of a pattern and write their source to --emit DIR",
         "explain": "show what the compiler does with a pattern, layer by layer"}


def _options(cmd: str, parser: argparse.ArgumentParser, pattern_names: set[str]) -> None:
    add = parser.add_argument
    add("--seq-len", type=positive_int, default=4096, help="sequence length of the layout (default 4096)")
    names = ["--layout-block"] + ([] if "block" in pattern_names else ["--block"])
    add(*names, dest="layout_block", type=positive_int, default=None,
        help="layout block size (default: the pattern's block parameter if it has one, else 64)")
    add("--tile", type=positive_int, nargs=2, metavar=("TM", "TN"), help="kernel tile sizes (default: the block)")
    add("--warps", type=positive_int, default=4, help="warps per program (default 4)")
    add("--stages", type=positive_int, default=2, help="software-pipelining stages (default 2)")
    add("--dtype", choices=_DTYPES, default="bfloat16", help="input dtype (default bfloat16)")
    if cmd == "compile":
        add("--emit", required=True, metavar="DIR", help="directory to write the generated source into")
    else:
        add("--heads", type=positive_int, default=1, help="heads, for per-head patterns (default 1)")


def _parse(cmd: str, args: argparse.Namespace):
    """``PATTERN [options]`` -> (pattern, options, schedule); pattern parameters become options
    exactly as for ``attnc show`` (``--window 128``, ``--causal``, ``--lengths 256,512``)."""
    from ..program import schedule as S

    ctor = lookup(args.pattern)
    pnames = {p.name for p in pattern_params(ctor)}
    parser = Parser(prog=f"attnc {cmd} {args.pattern}", description=_HELP[cmd])
    _options(cmd, parser, pnames)
    taken = {a.dest for a in parser._actions} | {s.lstrip("-") for a in parser._actions for s in a.option_strings}
    dests = add_pattern_options(parser, ctor, taken)
    opts = parser.parse_args(args.rest)
    kwargs = {name: getattr(opts, dest) for dest, name in dests.items()}
    pattern = ctor(**kwargs)
    block = opts.layout_block or (kwargs["block"] if isinstance(kwargs.get("block"), int) else 64)
    sched = S.blocks(S.Schedule(), block)
    if opts.tile:
        sched = S.tile(sched, *opts.tile)
    return pattern, opts, S.pipeline(S.warps(sched, opts.warps), opts.stages)


def _attention_stages(pattern, sched, opts):
    """``(index, stage, layout, source, key, text)`` for every BlockSparseAttention stage of the
    pattern's program (one for mask patterns; structural families may lower to others too)."""
    import torch

    from ..codegen.triton.kernels import cache_key, kernel_predicate, kernel_source
    from ..program.stages import BlockSparseAttention, lower

    program = lower(pattern, sched)
    out = []
    for i, st in enumerate(program.stages):
        if not isinstance(st, BlockSparseAttention):
            continue
        s = st.schedule
        lay = st.pattern.layout(opts.seq_len, None, s.block_m, s.block_n, batch=1, heads=getattr(opts, "heads", 1))
        src = kernel_source(st.pattern, kernel_predicate(st.pattern, lay.q_len, lay.kv_len), s, getattr(torch, opts.dtype))
        key = cache_key(src)
        out.append((i, st, lay, src, key, src.render(key)))
    return program, out


def _family_kernel_files(program, opts) -> list[tuple[list[int], Path]]:
    """``(stage indices, path)`` of the family kernel files (stored-P diffusion, ABC memory slots)
    the program's other stages run; one entry per file, whichever stages share it."""
    from ..codegen.registry import stage_source
    from ..program.stages import BlockSparseAttention

    files: dict[Path, list[int]] = {}
    for i, st in enumerate(program.stages):
        if not isinstance(st, BlockSparseAttention):
            path = stage_source(st, opts.seq_len)
            if path is not None:
                files.setdefault(Path(path), []).append(i)
    return [(idx, path) for path, idx in files.items()]


def cmd_compile(args) -> int:
    """Write the generated kernel source of one pattern into ``--emit DIR``."""
    from ..codegen.cache import atomic_write

    pattern, opts, sched = _parse("compile", args)
    program, stages = _attention_stages(pattern, sched, opts)
    family = _family_kernel_files(program, opts)
    if not stages and not family:
        print(f"{pattern!r} lowers to no stage with a generated kernel: nothing is generated for it")
        return 0
    for i, _, _, _, key, text in stages:
        suffix = "" if len(stages) == 1 else f"_stage{i}"
        out = Path(opts.emit) / f"{args.pattern}_{opts.dtype}{suffix}.py"
        atomic_write(out, text)
        print(f"wrote {out} ({len(text.splitlines())} lines, cache key {key})")
    for idx, path in family:
        text = path.read_text()
        out = Path(opts.emit) / f"{args.pattern}_{path.stem.rsplit('_', 1)[0]}.py"
        atomic_write(out, text)
        print(f"wrote {out} ({len(text.splitlines())} lines; stages {idx}; one file for every dtype: Triton specializes it at launch)")
    return 0


def cmd_explain(args) -> int:
    """Print the pipeline of one pattern, layer by layer."""
    from ..codegen import cache
    from ..codegen.triton.kernels import describe_schedule

    pattern, opts, sched = _parse("explain", args)
    program, stages = _attention_stages(pattern, sched, opts)
    print(f"1. pattern   {args.pattern}: {pattern!r}")
    print(f"             family {pattern.family}")
    for line in describe_mask_tracing(pattern).splitlines():
        print(f"             {line}")
    for i, st, lay, src, _, _ in stages:
        g = lay.geom
        pairs = lay.group_index.size * g.nqb * g.nkb
        where = f" (stage [{i}])" if len(program.stages) > 1 else ""
        print(f"{'2. layout' + where:<12} q_len {g.q_len}, kv_len {g.kv_len}, block {g.block_m}x{g.block_n}: "
              f"{g.nqb} x {g.nkb} blocks, {len(lay.groups)} group(s) over {opts.heads} head(s)")
        print(f"             non-empty {lay.num_blocks} of {pairs} ({lay.block_density:.1%}): "
              f"full {lay.num_full} (no mask work), partial {lay.num_partial} (predicate per element)")
        print("             predicate: " + ("opaque (evaluated on tensors; kernels read per-block byte masks)"
                                             if src.opaque else "traced into an index expression, rendered below"))
    print("3. program   " + str(program).replace("\n", "\n             "))
    for i, st, lay, src, key, text in stages:
        print(f"4. schedule  stage [{i}] on triton: {describe_schedule(st.schedule)}; dtype {opts.dtype} "
              f"(dot precision {src.dot_precision!r}); other stages run as PyTorch ops")
        path = cache.ensure(key, text)
        print(f"5. kernels   {path}  (cache key {key}, {len(text.splitlines())} lines)")
        print("             _attn_fwd       grid (ceil(Lq/TM), B*H): full key blocks, then partial ones through _predicate")
        print("             _attn_bwd_dkdv  grid (ceil(Lk/TN), B*Hkv): transposed lists, GQA heads summed in order")
        print("             _attn_bwd_dq    grid (ceil(Lq/TM), B*H): the forward lists again")
        print("   predicate helper (partial blocks only):")
        for line in src.predicate.rstrip().splitlines():
            print("     " + line)
    family = _family_kernel_files(program, opts)
    for idx, path in family:
        print(f"5. kernels   {path}  (stages {idx}, {len(path.read_text().splitlines())} lines)")
    if not stages and not family:
        print("4. kernels   none: every stage of this program runs as PyTorch ops")
    for line in _cpu_kernel_lines(program):
        print(line)
    return 0


def _cpu_kernel_lines(program) -> list[str]:
    """Where the torch backend on CPU runs C kernels for this program's stages, and whether they
    are built here (see ``codegen/cpu/build.py``)."""
    from ..codegen.cpu import build as cpu_build
    from ..families.diffusion.program import DiffusionHop, SparseProbs

    idx = [i for i, st in enumerate(program.stages) if isinstance(st, (SparseProbs, DiffusionHop))]
    if not idx:
        return []
    lib = cpu_build.load("cpu_diffusion")
    state = f"built: {lib._name}" if lib is not None else f"not used here: {cpu_build.STATUS.get('cpu_diffusion')}"
    return [f"6. CPU       torch backend, float32: stages {idx} run the C kernels of "
            "codegen/cpu/cpu_diffusion.c",
            f"             ({state})"]


def register(subparsers) -> None:
    """Add ``compile`` and ``explain`` to the ``attnc`` parser."""
    for cmd, fn in (("compile", cmd_compile), ("explain", cmd_explain)):
        p = subparsers.add_parser(cmd, help=_HELP[cmd], description=f"{_HELP[cmd]}. Options follow the pattern "
                                  f"name; `attnc {cmd} PATTERN --help` lists them (the pattern's parameters included).")
        p.add_argument("pattern", help="a catalogue name (see `attnc list`)")
        p.add_argument("rest", nargs=argparse.REMAINDER, metavar="...", help="options (after the pattern name)")
        p.set_defaults(func=guarded(fn))
