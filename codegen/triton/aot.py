"""Ahead-of-time compilation of the generated kernels for a GPU target, without a GPU.

Triton's front end, its MLIR passes and ``ptxas`` run on any machine, so compiling for, e.g.,
``sm_90`` catches what the CPU interpreter cannot: non-constexpr globals, loop-carried type
changes, unsupported ``tl.dot`` shapes, shared-memory overflow. Must run in a process where
``TRITON_INTERPRET`` is unset (under the interpreter ``@triton.jit`` builds interpreted
functions that cannot be compiled). :func:`resource_report` compiles every attention kernel
variant of the default schedule and reads registers and spills from ``ptxas -v`` (the assembler
Triton ships, so no GPU and no CUDA toolkit are needed). Usage::

    python -m attncompiler.codegen.triton.aot --arch 90,80 --dtype bf16,fp16,fp32 --head-dim 64,128
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from attncompiler.errors import UnsupportedError
from attncompiler.dsl.pattern import Pattern
from attncompiler.program.schedule import Schedule

from .common import pad_dim, dot_precision
from .kernels import kernel_tiles, kernels_for

_TY = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_DATA = ("Q", "K", "V", "Out", "DO", "DK", "DV", "DQ")
_PTRS = {"mask_tab": "u8", "bufs": "i64", "buf_meta": "i64", "sbuf": "fp32", "smeta": "i64", "mbufs": "i64",
         "mbuf_meta": "i64", "Lse": "fp32", "Delta": "fp32", "OutP": "fp32", "LseP": "fp32",
         **{n: "i32" for n in ("kv_num", "kv_idx", "full_nr", "full_rng", "mask_ids", "q_num", "q_idx")}}


@dataclass(frozen=True)
class CompiledKernel:
    """One kernel compiled for the target: its name, variant and resource use (registers and
    spill bytes per thread from ``ptxas -v`` when asked for with ``resources=True``)."""

    name: str
    variant: str
    shared_bytes: int
    num_warps: int
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None


def compile_for_target(pattern: Pattern, dtype: torch.dtype = torch.bfloat16, head_dim: int = 64,
                       schedule: Schedule = Schedule(), *, opaque: bool | None = None, arch: int = 90,
                       q_len: int = 4096, kv_len: int | None = None, only: tuple[str, ...] | None = None,
                       resources: bool = False) -> list[CompiledKernel]:
    """Compile forward (both EVEN_N variants), dk/dv and dq kernels of ``pattern`` for ``sm_{arch}``.

    ``only`` restricts the list to kernels named there (e.g. ``("_attn_fwd",)``; the split-K
    forward ``_attn_fwd_split`` is compiled only when named there); ``resources``
    also reads registers and spills from ``ptxas -v`` (see :func:`ptxas_usage`).

    Raises:
        UnsupportedError: ``TRITON_INTERPRET`` is set in this process.
    """
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise UnsupportedError("compile_for_target needs TRITON_INTERPRET unset (run it in a fresh process)")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .kernels import kernel_predicate

    kv_len = q_len if kv_len is None else kv_len
    if opaque is None:
        opaque = kernel_predicate(pattern, q_len, kv_len) is None
    mod = kernels_for(pattern, q_len, kv_len, schedule, dtype).module
    tm, tn = kernel_tiles(schedule)
    consts = dict(BM=schedule.block_m, BN=schedule.block_n, TM=tm, TN=tn, D_PAD=pad_dim(head_dim),
                  DV_PAD=pad_dim(head_dim), OPAQUE=opaque, DOT_PREC=dot_precision(dtype), SCORE_MOD=False)
    ptrs = {**_PTRS, **{n: _TY[dtype] for n in _DATA}}
    out = []
    # The split-K forward (decoding) is compiled only when ``only`` names it: the default report
    # lists the kernels every call runs.
    for name, extra in (("_attn_fwd", {"EVEN_N": True}), ("_attn_fwd", {"EVEN_N": False}),
                        ("_attn_bwd_dkdv", {}), ("_attn_bwd_dq", {}), ("_attn_fwd_split", {"EVEN_N": False})):
        if (only is None and name == "_attn_fwd_split") or (only is not None and name not in only):
            continue
        fn = getattr(mod, name)
        c = {**consts, **extra}
        sig = {n: ("*" + ptrs[n] if n in ptrs else "fp32" if n == "sm_scale" else "i32") for n in fn.arg_names}
        sig.update({n: "constexpr" for n in c})
        src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(n),): v for n, v in c.items()})
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                           options={"num_warps": schedule.num_warps, "num_stages": schedule.num_stages})
        usage = ptxas_usage(k.asm["ptx"], arch) if resources else (None, None, None)
        out.append(CompiledKernel(name, ", ".join(f"{a}={b}" for a, b in extra.items()),
                                  int(k.metadata.shared), schedule.num_warps, *usage))
    return out


def ptxas_usage(ptx: str, arch: int) -> tuple[int, int, int]:
    """``(registers, spill store bytes, spill load bytes)`` per thread of the one kernel in
    ``ptx``, from ``ptxas -v`` (the assemblers shipped with Triton, newest first).

    Raises:
        UnsupportedError: no shipped ``ptxas`` accepts the PTX (its message is included).
    """
    import glob
    import re
    import subprocess
    import tempfile

    import triton

    bins = sorted(glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas*")),
                  reverse=True)  # ptxas-blackwell (newest PTX ISA) before ptxas
    target = re.search(r"^\.target\s+(\S+)", ptx, re.M)
    gpu = target.group(1) if target else f"sm_{arch}"
    errors = []
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        for exe in bins:
            res = subprocess.run([exe, "-v", "--gpu-name", gpu, src, "-o", os.path.join(tmp, "k.cubin")],
                                 capture_output=True, text=True)
            text = res.stdout + res.stderr
            regs = re.search(r"Used (\d+) registers", text)
            if res.returncode == 0 and regs:
                spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
                st, ld = (int(spills.group(1)), int(spills.group(2))) if spills else (0, 0)
                return int(regs.group(1)), st, ld
            errors.append(f"{os.path.basename(exe)}: {text.strip().splitlines()[-1:] or res.returncode}")
    raise UnsupportedError(f"no shipped ptxas assembled the kernel for {gpu}: {errors}; "
                           "check the Triton installation's backends/nvidia/bin")


REPORT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def resource_report(archs: tuple[int, ...] = (90, 80), dtypes: tuple[torch.dtype, ...] = REPORT_DTYPES,
                    head_dims: tuple[int, ...] = (64, 128), opaque: tuple[bool, ...] = (False, True),
                    schedule: Schedule = Schedule()) -> list[tuple[int, str, int, bool, CompiledKernel]]:
    """Every attention kernel variant (forward EVEN_N True/False, dk/dv, dq; traced or opaque
    predicate) of the default schedule compiled for each ``sm_{arch}``, with registers, spills
    and shared memory: rows ``(arch, dtype, head_dim, opaque, kernel)``."""
    from attncompiler.dsl.pattern import causal

    rows = []
    for arch in archs:
        for dt in dtypes:
            for d in head_dims:
                for op in opaque:
                    for k in compile_for_target(causal(), dt, d, schedule, opaque=op, arch=arch, resources=True):
                        rows.append((arch, _TY[dt], d, op, k))
    return rows


def format_report(rows) -> str:
    """The rows of :func:`resource_report` as a Markdown table."""
    lines = ["| arch | dtype | D | predicate | kernel | variant | warps | registers | spill st/ld B | shared B |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for arch, dt, d, op, k in rows:
        lines.append(f"| sm_{arch} | {dt} | {d} | {'opaque' if op else 'traced'} | {k.name} | {k.variant or '-'} | "
                     f"{k.num_warps} | {k.registers} | {k.spill_stores}/{k.spill_loads} | {k.shared_bytes} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    """``python -m attncompiler.codegen.triton.aot [--arch 90,80] [--dtype bf16,fp16,fp32] [--head-dim 64,128]``:
    print the resource table; exit status 1 when a kernel spills."""
    import argparse

    ap = argparse.ArgumentParser(description="Triton kernels compiled ahead of time: registers, spills, shared memory")
    ap.add_argument("--arch", default="90,80", help="comma-separated SM versions (default 90,80)")
    ap.add_argument("--dtype", default="bf16,fp16,fp32", help="comma-separated of bf16, fp16, fp32")
    ap.add_argument("--head-dim", default="64,128", help="comma-separated head dims (default 64,128)")
    ap.add_argument("--traced-only", action="store_true", help="skip the opaque-predicate variants")
    args = ap.parse_args(argv)
    by_name = {v: k for k, v in _TY.items()}
    bad = [x for x in args.dtype.split(",") if x not in by_name]
    if bad:
        raise UnsupportedError(f"--dtype {bad} not supported; choose from {sorted(by_name)}")
    rows, header = [], True
    for arch in (int(a) for a in args.arch.split(",")):  # row by row: each combination takes a while
        for dt in (by_name[x] for x in args.dtype.split(",")):
            part = resource_report((arch,), (dt,), tuple(int(d) for d in args.head_dim.split(",")),
                                   (False,) if args.traced_only else (False, True))
            lines = format_report(part).splitlines()
            print("\n".join(lines if header else lines[2:]), flush=True)
            rows += part
            header = False
    return 1 if any(k.spill_stores or k.spill_loads for *_, k in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
