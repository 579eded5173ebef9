"""Ahead-of-time compilation of the generated kernels for a GPU target, without a GPU.

Triton's front end, its MLIR passes and ``ptxas`` run on any machine, so compiling for, e.g.,
``sm_90`` catches what the CPU interpreter cannot: non-constexpr globals, loop-carried type
changes, unsupported ``tl.dot`` shapes, shared-memory overflow. Must run in a process where
``TRITON_INTERPRET`` is unset (under the interpreter ``@triton.jit`` builds interpreted
functions that cannot be compiled). Usage::

    python -m attncompiler.codegen.triton.aot [PATTERN_REPR_INDEX]
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
         "mbuf_meta": "i64", "Lse": "fp32", "Delta": "fp32",
         **{n: "i32" for n in ("kv_num", "kv_idx", "full_nr", "full_rng", "mask_ids", "q_num", "q_idx")}}


@dataclass(frozen=True)
class CompiledKernel:
    """One kernel compiled for the target: its name, variant and resource use."""

    name: str
    variant: str
    shared_bytes: int
    num_warps: int


def compile_for_target(pattern: Pattern, dtype: torch.dtype = torch.bfloat16, head_dim: int = 64,
                       schedule: Schedule = Schedule(), *, opaque: bool | None = None, arch: int = 90,
                       q_len: int = 4096, kv_len: int | None = None, only: tuple[str, ...] | None = None) -> list[CompiledKernel]:
    """Compile forward (both EVEN_N variants), dk/dv and dq kernels of ``pattern`` for ``sm_{arch}``.

    ``only`` restricts the list to kernels named there (e.g. ``("_attn_fwd",)``).

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
    for name, extra in (("_attn_fwd", {"EVEN_N": True}), ("_attn_fwd", {"EVEN_N": False}),
                        ("_attn_bwd_dkdv", {}), ("_attn_bwd_dq", {})):
        if only is not None and name not in only:
            continue
        fn = getattr(mod, name)
        c = {**consts, **extra}
        sig = {n: ("*" + ptrs[n] if n in ptrs else "fp32" if n == "sm_scale" else "i32") for n in fn.arg_names}
        sig.update({n: "constexpr" for n in c})
        src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(n),): v for n, v in c.items()})
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                           options={"num_warps": schedule.num_warps, "num_stages": schedule.num_stages})
        out.append(CompiledKernel(name, ", ".join(f"{a}={b}" for a, b in extra.items()),
                                  int(k.metadata.shared), schedule.num_warps))
    return out


if __name__ == "__main__":
    from attncompiler.dsl.pattern import causal

    for kern in compile_for_target(causal()):
        print(kern)
