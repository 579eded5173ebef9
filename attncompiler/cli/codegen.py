"""``attnc compile PATTERN --emit DIR`` and ``attnc explain PATTERN``.

``compile`` writes the generated Triton source of a pattern for a user to read (mode 0644: the
copies are the user's; the kernel cache itself stays private); ``explain`` prints the pipeline
layer by layer: the pattern, its block layout, the program's stages and schedules, and what runs
them on the chosen backend (``--backend auto`` is what ``ac.compile`` picks here: Triton kernels
on a CUDA machine, PyTorch ops otherwise). PATTERN is a catalogue name with ``--param value``
options or a DSL expression, as for every ``attnc`` command.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from .common import describe_mask_tracing, mask_mods, parse_command, positive_int, register_pattern_command

EMIT_MODE = 0o644
"""Mode of the files ``attnc compile --emit`` writes: copies for the user to read and share."""

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
        add("--backend", choices=("auto", "torch", "triton"), default="auto",
            help="backend to describe (default auto: what ac.compile picks on this machine)")


def _parse(cmd: str, argv: list[str]):
    """``PATTERN [options]`` -> (pattern spec, options, schedule), with the grammar of every command."""
    from ..program import schedule as S

    [spec], opts = parse_command(cmd, _HELP[cmd], argv, lambda p, names: _options(cmd, p, names))
    block = opts.layout_block or spec.block or 64
    sched = S.blocks(S.Schedule(), block)
    if opts.tile:
        sched = S.tile(sched, *opts.tile)
    return spec, opts, S.pipeline(S.warps(sched, opts.warps), opts.stages)


def auto_backend() -> str:
    """What ``ac.compile(p, "auto")`` runs here: Triton when CUDA and triton are available."""
    import importlib.util

    import torch

    return "triton" if torch.cuda.is_available() and importlib.util.find_spec("triton") else "torch"


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


def _emit(path: Path, text: str) -> None:
    """Write one emitted file atomically, readable by others (the cache's files are 0600)."""
    from ..codegen.cache import atomic_write

    atomic_write(path, text)
    os.chmod(path, EMIT_MODE)


def cmd_compile(argv: list[str]) -> int:
    """Write the generated kernel source of one pattern into ``--emit DIR``."""
    spec, opts, sched = _parse("compile", argv)
    pattern = spec.pattern
    program, stages = _attention_stages(pattern, sched, opts)
    family = _family_kernel_files(program, opts)
    if not stages and not family:
        print(f"{pattern!r} lowers to no stage with a generated kernel: nothing is generated for it")
        return 0
    for i, _, _, _, key, text in stages:
        suffix = "" if len(stages) == 1 else f"_stage{i}"
        out = Path(opts.emit) / f"{spec.stem}_{opts.dtype}{suffix}.py"
        _emit(out, text)
        print(f"wrote {out} ({len(text.splitlines())} lines, cache key {key})")
    for idx, path in family:
        text = path.read_text()
        out = Path(opts.emit) / f"{spec.stem}_{path.stem.rsplit('_', 1)[0]}.py"
        _emit(out, text)
        print(f"wrote {out} ({len(text.splitlines())} lines; stages {idx}; one file for every dtype: Triton specializes it at launch)")
    return 0


class _Steps:
    """Prints numbered steps (1, 2, 3, ... whatever the program has) with indented details."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self, title: str, first: str, *more: str) -> None:
        self.n += 1
        print(f"{f'{self.n}. {title}':<12} {first}")
        for line in more:
            print(f"{'':<12} {line}")


def cmd_explain(argv: list[str]) -> int:
    """Print the pipeline of one pattern, layer by layer, for the backend that would run it."""
    spec, opts, sched = _parse("explain", argv)
    pattern = spec.pattern
    backend = auto_backend() if opts.backend == "auto" else opts.backend
    step = _Steps()
    step("pattern", f"{spec.text}: {pattern!r}", f"family {pattern.family}",
         *describe_mask_tracing(pattern).splitlines())
    if backend == "triton":
        program, stages = _attention_stages(pattern, sched, opts)
        layouts = [(i, st, lay, src.opaque) for i, st, lay, src, _, _ in stages]
    else:
        program, layouts = _torch_layouts(pattern, sched, opts)
    for i, st, lay, opaque in layouts:
        g = lay.geom
        pairs = lay.group_index.size * g.nqb * g.nkb
        where = f" [{i}]" if len(program.stages) > 1 else ""
        step("layout" + where,
             f"q_len {g.q_len}, kv_len {g.kv_len}, block {g.block_m}x{g.block_n}: "
             f"{g.nqb} x {g.nkb} blocks, {len(lay.groups)} group(s) over {opts.heads} head(s)",
             f"non-empty {lay.num_blocks} of {pairs} ({lay.block_density:.1%}): "
             f"full {lay.num_full} (no mask work), partial {lay.num_partial} (predicate per element)",
             "predicate: " + ("opaque (evaluated on tensors; kernels read per-block byte masks)" if opaque
                              else "traced into an index expression"
                              + (", rendered below" if backend == "triton" else ", evaluated on index tensors")))
    step("program", *str(program).splitlines())
    if backend == "triton":
        _explain_triton(step, program, stages, opts)
    else:
        _explain_torch(step, program, layouts, opts)
    return 0


def _torch_layouts(pattern, sched, opts):
    """The program and ``(index, stage, layout, opaque)`` of its BlockSparseAttention stages,
    without generating any kernel (the torch backend reads the layouts directly)."""
    from ..program.stages import BlockSparseAttention, lower

    program = lower(pattern, sched)
    out = []
    for i, st in enumerate(program.stages):
        if isinstance(st, BlockSparseAttention):
            s = st.schedule
            lay = st.pattern.layout(opts.seq_len, None, s.block_m, s.block_n, batch=1, heads=opts.heads)
            out.append((i, st, lay, any(not m.traced for m in mask_mods(st.pattern))))
    return program, out


def _explain_torch(step, program, layouts, opts) -> None:
    """Steps of the PyTorch backend: how attention stages run, and the CPU C kernels if any."""
    for i, st, _, _ in layouts:
        s = st.schedule
        step("schedule", f"stage [{i}] on torch ({'CUDA' if auto_backend() == 'triton' else 'CPU'} tensors as "
             f"PyTorch ops): blocks {s.block_m}x{s.block_n}; query blocks bucketed by their key-block count, "
             f"chunks of about {s.tile_elems} score elements,",
             f"online softmax over steps of at most {s.key_blocks_per_step} key blocks; full blocks skip the "
             "mask, partial blocks evaluate the predicate; the backward recomputes probabilities from the lse")
    cpu = _cpu_kernel_lines(program)
    if cpu:
        step(*cpu)
    elif not layouts:
        step("kernels", "none generated: every stage of this program runs as PyTorch ops")
    else:
        step("kernels", "none generated on torch: `attnc explain PATTERN --backend triton` shows the Triton "
             "kernels a CUDA machine would run")


def _explain_triton(step, program, stages, opts) -> None:
    """Steps of the Triton backend: schedules and the generated kernel files (in the cache)."""
    from ..codegen import cache
    from ..codegen.triton.kernels import describe_schedule

    for i, st, lay, src, key, text in stages:
        step("schedule", f"stage [{i}] on triton: {describe_schedule(st.schedule)}; dtype {opts.dtype} "
             f"(dot precision {src.dot_precision!r}); other stages run as PyTorch ops")
    for i, st, lay, src, key, text in stages:
        path = cache.ensure(key, text)
        step("kernels", f"{path}  (cache key {key}, {len(text.splitlines())} lines)",
             "_attn_fwd       grid (ceil(Lq/TM), B*H): full key blocks, then partial ones through _predicate",
             "_attn_bwd_dkdv  grid (ceil(Lk/TN), B*Hkv): transposed lists, GQA heads summed in order",
             "_attn_bwd_dq    grid (ceil(Lq/TM), B*H): the forward lists again",
             "predicate helper (partial blocks only):",
             *("  " + line for line in src.predicate.rstrip().splitlines()))
    family = _family_kernel_files(program, opts)
    for idx, path in family:
        step("kernels", f"{path}  (stages {idx}, {len(path.read_text().splitlines())} lines)")
    if not stages and not family:
        step("kernels", "none: every stage of this program runs as PyTorch ops")


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
    return ["CPU kernels", f"torch backend, float32: stages {idx} run the C kernels of codegen/cpu/cpu_diffusion.c",
            f"({state})"]


def register(subparsers) -> None:
    """Add ``compile`` and ``explain`` to the ``attnc`` parser."""
    for cmd, fn in (("compile", cmd_compile), ("explain", cmd_explain)):
        register_pattern_command(subparsers, cmd, _HELP[cmd], fn)
