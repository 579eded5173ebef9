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
from ..program.inputs import Dims, check_keywords, check_qkv, default_scale
from ..program.positions import POSITION_KEYWORDS, BatchGroup, batch_groups, is_default
from ..dsl.pattern import Family, Pattern
from ..families.diffusion.program import recompute_hops
from ..program.dense import fuse_dense
from ..program.stages import BlockSparseAttention, Program, lower, run_passes
from .ops import call_mask_attention, register_pattern, run_batch_groups, run_stages, schedule_key
from ..program.schedule import Schedule
from .edge_weights import check_edge_weights


def resolve_backend(backend: str, device: torch.device | None = None) -> str:
    """The backend to run: ``"auto"`` means triton when CUDA is available and ``device`` (if given) is
    CUDA, else torch; any other name is returned unchanged."""
    if backend == "auto":
        return "triton" if (device is None or device.type == "cuda") and torch.cuda.is_available() else "torch"
    return backend


# The program passes, by name: ``Program -> Program`` rewrites a runtime module may ask for.
PASSES: dict[str, Callable[[Program], Program]] = {
    "recompute_hops": recompute_hops,  # diffusion: K fused attention hops instead of a stored P
    "fuse_dense": fuse_dense,  # masks exactly full / causal: a DenseAttention stage (fused kernel)
}
# The passes CompiledAttention runs by default, per pattern family (safe on every backend).
DEFAULT_PASSES: dict[str, tuple[str, ...]] = {Family.MASK: ("fuse_dense",)}


@functools.lru_cache(maxsize=256)
def compile_program(pattern: Pattern, schedule: Schedule | None = None, passes: tuple[str, ...] = ()) -> Program:
    """Lower ``pattern``, then run the named :data:`PASSES` in order (cached)."""
    return run_passes(lower(pattern, schedule), [(name, PASSES[name]) for name in passes])


def lse_dtype(lse: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``lse`` in the documented dtype: float64 for float64 inputs, float32 otherwise."""
    want = torch.float64 if dtype == torch.float64 else torch.float32
    return lse if lse is None or lse.dtype == want else lse.to(want)


@torch.compiler.disable
def untraced_forward(module: "CompiledAttention", q, k, v, scale, **kwargs):
    """``CompiledAttention.forward`` outside any compiled graph (the graph breaks here)."""
    return CompiledAttention.forward(module, q, k, v, scale, **kwargs)


class CompiledAttention(torch.nn.Module):
    """Attention of a compiled pattern: ``forward(q, k, v, scale=None) -> out``.

    ``q`` is ``[B, H, Lq, D]``; ``k``, ``v`` are ``[B, Hkv, Lk, D]`` with ``H % Hkv == 0``.
    The output has q's dtype and shape ``[B, H, Lq, Dv]``. ``return_lse=True`` also returns
    the log-sum-exp ``[B, H, Lq]`` (float32 for float16/bfloat16/float32 inputs, float64 for
    float64 inputs; ``-inf`` for rows with no visible key). By default positions are top-left:
    query row i is position i (as in FlexAttention); mask patterns take the call-time positions
    ``q_offset``, ``align``, ``cu_seqlens`` and ``kv_lens`` (:mod:`attncompiler.program.positions`).
    ``check_finite=True`` rejects NaN/inf inputs (off by default: an extra pass and a host sync).
    """

    def __init__(self, pattern: Pattern, backend: str = "auto", schedule: Schedule | None = None,
                 check_finite: bool = False, score_mod=None, sinks=None):
        super().__init__()
        from ..codegen.registry import BACKENDS

        if backend != "auto" and backend not in BACKENDS:
            raise UnsupportedError(f"unknown backend {backend!r}; choose 'auto' or one of {BACKENDS}")
        self.pattern = pattern
        self.backend = backend
        self.program = compile_program(pattern, schedule, DEFAULT_PASSES.get(pattern.family, ()))
        self.check_finite = check_finite
        self.score_mod, self.sinks = check_edge_weights(self.program, score_mod, sinks)
        # Registered now, so a traced call names the pattern with a constant string.
        self.pattern_key = self.operator_key()
        self.schedule_key = None if self.pattern_key is None else schedule_key(self.program.stages[0].schedule)

    def forward(self, q, k, v, scale: float | None = None, *, return_lse: bool = False, **stage_inputs):
        """``out [B, H, Lq, Dv]`` (q's dtype), or ``(out, lse [B, H, Lq])`` with ``return_lse``.

        Positions are top-left by default: query row i sits at position i, key j at j (as in
        FlexAttention). Mask patterns also take ``q_offset`` (int or int tensor ``[B]``: row i at
        ``q_offset + i``), ``align="bottom_right"`` (``q_offset = Lk - Lq``, decoding),
        ``kv_lens`` (int tensor ``[B]``: valid keys per batch entry) and ``cu_seqlens`` (the
        documents of an ``ac.document()`` without lengths); one module serves every offset.
        ``lse`` is float32 for float16/bfloat16/float32 inputs and float64 for float64 inputs,
        ``-inf`` for rows with no visible key. ``stage_inputs`` are the program's call inputs
        (:meth:`Program.call_inputs`); any other keyword raises
        :class:`~attncompiler.errors.UnexpectedArgumentError`.

        Under ``torch.compile`` / ``torch.export`` a mask pattern runs as the custom operator
        ``torch.ops.attncompiler.mask_attention`` (:mod:`attncompiler.runtime.ops`): the traced
        graph checks shapes only, and the layout is built at run time outside it. A module with
        a score_mod or sinks, or of another family, runs eagerly there (a graph break; with
        ``fullgraph=True`` torch raises).
        """
        if self.pattern_key is None and torch.compiler.is_compiling():
            # No operator for this module (edge weights, the structured families): run it eagerly,
            # a clean graph break, rather than letting dynamo trace the layout machinery.
            return untraced_forward(self, q, k, v, scale, return_lse=return_lse, **stage_inputs)
        positions = {n: stage_inputs.pop(n) for n in POSITION_KEYWORDS if n in stage_inputs} \
            if stage_inputs and self.takes_positions else {}
        if stage_inputs:
            self.check_call_keywords("forward", stage_inputs)
        op = self.pattern_key is not None and torch.compiler.is_compiling()
        # Under tracing the finiteness check (a host read) runs inside the operator.
        dims = check_qkv(q, k, v, check_finite=self.check_finite and not op)
        backend = resolve_backend(self.backend, q.device)
        if op:
            need_lse = return_lse or (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)))
            out, lse = call_mask_attention(self.pattern_key, self.schedule_key, backend, q, k, v,
                                           scale, need_lse, self.check_finite, positions)
            return (out, lse) if return_lse else out
        groups = batch_groups(self.pattern, dims, **positions) if self.takes_positions else None
        if groups is None or is_default(groups, dims):
            out, lse = self.run_program(q, k, v, dims, scale, return_lse, stage_inputs, backend, None)
        elif len(groups) == 1 and groups[0].index is None and groups[0].kv_len == dims.kv_len:
            # One position for every batch entry, every key valid (a decode step): no slicing or
            # regrouping, and the log-sum-exp only when asked for.
            out, lse = self.run_program(q, k, v, dims, scale, return_lse, stage_inputs, backend, groups[0])
        else:
            out, lse = self.run_groups(q, k, v, dims, scale, return_lse, stage_inputs, groups, backend)
        if out.dtype != q.dtype:
            out = out.to(q.dtype)
        return (out, lse_dtype(lse, q.dtype)) if return_lse else out

    @property
    def takes_positions(self) -> bool:
        """Whether forward takes ``q_offset``/``align``/``cu_seqlens``/``kv_lens`` (mask patterns)."""
        return self.pattern.family == Family.MASK

    @property
    def edge_weights(self) -> tuple | None:
        """``(score_mod, sinks)`` when the module has either, else None."""
        return None if self.score_mod is None and self.sinks is None else (self.score_mod, self.sinks)

    def operator_key(self) -> str | None:
        """The operator key of this module's pattern when it runs as a custom operator under
        tracing (a mask pattern lowered to one block-sparse stage, without edge weights: the
        operators do not carry a score_mod's captured tensors yet), else None."""
        stages = self.program.stages
        if self.edge_weights is not None:
            return None
        if not (self.takes_positions and len(stages) == 1 and isinstance(stages[0], BlockSparseAttention)
                and stages[0].pattern == self.pattern):
            return None
        return register_pattern(self.pattern)

    def run_program(self, q, k, v, dims: Dims, scale, return_lse: bool, stage_inputs: dict, backend: str,
                    group: BatchGroup | None):
        """Run the program's stages once: ``(out, lse or None)``."""
        return run_stages(self.program, q, k, v, dims, scale, return_lse, stage_inputs, backend, group,
                          self.edge_weights)

    def run_groups(self, q, k, v, dims: Dims, scale, return_lse: bool, stage_inputs: dict,
                   groups: list[BatchGroup], backend: str = "torch"):
        """Run each batch group with its own positions (keys sliced to its valid length) and put
        the results back in batch order (differentiable: a concatenation and a gather)."""
        return run_batch_groups(self.program, q, k, v, dims, scale, stage_inputs, groups, backend,
                                self.edge_weights)

    def check_call_keywords(self, method: str, given, program: Program | None = None) -> None:
        """Reject keywords that ``program`` (default: this module's) does not read."""
        program = self.program if program is None else program
        extra = POSITION_KEYWORDS if self.takes_positions and program is self.program else ()
        check_keywords(f"{type(self).__name__}.{method}", given,
                       ("scale", "return_lse", *program.call_inputs(), *extra))

    def reference(self, q, k, v, scale: float | None = None, **kwargs):
        """The float64 oracle for this module's computation (families with learned parameters
        override this to pass them to :func:`attncompiler.program.reference`)."""
        from ..program.reference import reference

        if self.score_mod is not None:
            kwargs.setdefault("score_mod", self.score_mod)
        if self.sinks is not None:
            kwargs.setdefault("sinks", self.sinks)
        return reference(self.pattern, q, k, v, scale, **kwargs)

    def extra_repr(self) -> str:
        mod = "" if self.score_mod is None else f", score_mod={self.score_mod!r}"
        return f"pattern={self.pattern!r}, backend={self.backend!r}{mod}"
