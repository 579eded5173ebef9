"""The runtime: ``ac.compile(pattern)`` returns a ``torch.nn.Module`` that runs the program.

Compilation lowers the pattern once (cached per pattern, backend and schedule); each call
validates its inputs and fetches the layout for its lengths from the layout cache, so a new
sequence length builds a new layout, never a new program or kernel.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

from ..errors import UnsupportedError
from ..program.inputs import check_keywords, check_qkv, default_scale
from ..dsl.pattern import Pattern
from ..families.diffusion.program import recompute_hops
from ..program.stages import Program, lower, run_passes
from ..program.schedule import Schedule


def resolve_backend(backend: str, device: torch.device | None = None) -> str:
    if backend == "auto":
        return "triton" if torch.cuda.is_available() and (device is None or device.type == "cuda") else "torch"
    return backend


# The program passes, by name: ``Program -> Program`` rewrites a runtime module may ask for.
PASSES: dict[str, Callable[[Program], Program]] = {
    "recompute_hops": recompute_hops,  # diffusion: K fused attention hops instead of a stored P
}


@functools.lru_cache(maxsize=256)
def compile_program(pattern: Pattern, schedule: Schedule | None = None, passes: tuple[str, ...] = ()) -> Program:
    """Lower ``pattern``, then run the named :data:`PASSES` in order (cached)."""
    return run_passes(lower(pattern, schedule), [(name, PASSES[name]) for name in passes])


def lse_dtype(lse: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``lse`` in the documented dtype: float64 for float64 inputs, float32 otherwise."""
    want = torch.float64 if dtype == torch.float64 else torch.float32
    return lse if lse is None or lse.dtype == want else lse.to(want)


class CompiledAttention(torch.nn.Module):
    """Attention of a compiled pattern: ``forward(q, k, v, scale=None) -> out``.

    ``q`` is ``[B, H, Lq, D]``; ``k``, ``v`` are ``[B, Hkv, Lk, D]`` with ``H % Hkv == 0``.
    The output has q's dtype and shape ``[B, H, Lq, Dv]``. ``return_lse=True`` also returns
    the log-sum-exp ``[B, H, Lq]`` (float32 for float16/bfloat16/float32 inputs, float64 for
    float64 inputs; ``-inf`` for rows with no visible key). When ``Lq != Lk`` positions are
    top-left: query row i is position i (as in FlexAttention).
    """

    def __init__(self, pattern: Pattern, backend: str = "auto", schedule: Schedule | None = None,
                 check_finite: bool = True):
        super().__init__()
        from ..codegen.registry import BACKENDS

        if backend != "auto" and backend not in BACKENDS:
            raise UnsupportedError(f"unknown backend {backend!r}; choose 'auto' or one of {BACKENDS}")
        self.pattern = pattern
        self.backend = backend
        self.program = compile_program(pattern, schedule)
        self.check_finite = check_finite

    def forward(self, q, k, v, scale: float | None = None, *, return_lse: bool = False, **stage_inputs):
        """``out [B, H, Lq, Dv]`` (q's dtype), or ``(out, lse [B, H, Lq])`` with ``return_lse``.

        Positions are top-left when ``Lq != Lk``: query row i sits at position i, key j at j (as
        in FlexAttention). ``lse`` is float32 for float16/bfloat16/float32 inputs and float64 for
        float64 inputs, ``-inf`` for rows with no visible key. ``stage_inputs`` are the program's
        call inputs (:meth:`Program.call_inputs`); any other keyword raises
        :class:`~attncompiler.errors.UnexpectedArgumentError`.
        """
        from ..codegen.context import RunContext
        from ..codegen.registry import stage_impl

        self.check_call_keywords("forward", stage_inputs)
        dims = check_qkv(q, k, v, check_finite=self.check_finite)
        backend = resolve_backend(self.backend, q.device)
        ctx = RunContext(scale=default_scale(dims.head_dim, scale), batch=dims.batch, heads=dims.heads,
                         extra={"need_lse": return_lse})
        env = {"q": q, "k": k, "v": v, **stage_inputs}
        for stage in self.program.stages:
            env.update(stage_impl(backend, type(stage))(stage, env, ctx))
        out = env["out"].to(q.dtype)
        return (out, lse_dtype(env.get("lse"), q.dtype)) if return_lse else out

    def check_call_keywords(self, method: str, given, program: Program | None = None) -> None:
        """Reject keywords that ``program`` (default: this module's) does not read."""
        program = self.program if program is None else program
        check_keywords(f"{type(self).__name__}.{method}", given, ("scale", "return_lse", *program.call_inputs()))

    def reference(self, q, k, v, scale: float | None = None, **kwargs):
        """The float64 oracle for this module's computation (families with learned parameters
        override this to pass them to :func:`attncompiler.program.reference`)."""
        from ..program.reference import reference

        return reference(self.pattern, q, k, v, scale, **kwargs)

    def extra_repr(self) -> str:
        return f"pattern={self.pattern!r}, backend={self.backend!r}"
