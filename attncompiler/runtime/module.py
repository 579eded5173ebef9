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
from ..program.stages import Program, lower, run_passes
from ..program.schedule import Schedule
from .edge_weights import check_edge_weights, edge_weights


def resolve_backend(backend: str, device: torch.device | None = None) -> str:
    """The backend to run: ``"auto"`` means triton when CUDA is available and ``device`` (if given) is
    CUDA, else torch; any other name is returned unchanged."""
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
        self.program = compile_program(pattern, schedule)
        self.check_finite = check_finite
        self.score_mod, self.sinks = check_edge_weights(self.program, score_mod, sinks)

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
        """
        positions = {n: stage_inputs.pop(n) for n in POSITION_KEYWORDS if n in stage_inputs} \
            if self.takes_positions else {}
        self.check_call_keywords("forward", stage_inputs)
        dims = check_qkv(q, k, v, check_finite=self.check_finite)
        backend = resolve_backend(self.backend, q.device)
        groups = batch_groups(self.pattern, dims, **positions) if self.takes_positions else None
        if groups is None or is_default(groups, dims):
            out, lse = self.run_program(q, k, v, dims, scale, return_lse, stage_inputs, backend, None)
        else:
            out, lse = self.run_groups(q, k, v, dims, scale, return_lse, stage_inputs, groups, backend)
        out = out.to(q.dtype)
        return (out, lse_dtype(lse, q.dtype)) if return_lse else out

    @property
    def takes_positions(self) -> bool:
        """Whether forward takes ``q_offset``/``align``/``cu_seqlens``/``kv_lens`` (mask patterns)."""
        return self.pattern.family == Family.MASK

    def run_program(self, q, k, v, dims: Dims, scale, return_lse: bool, stage_inputs: dict, backend: str,
                    group: BatchGroup | None):
        """Run the program's stages once: ``(out, lse or None)``."""
        from ..codegen.context import RunContext
        from ..codegen.registry import stage_impl

        extra = {"need_lse": return_lse}
        if group is not None:
            extra["positions"] = group.positions
        if self.score_mod is not None or self.sinks is not None:
            extra.update(edge_weights(self.score_mod, self.sinks, backend, group))
        ctx = RunContext(scale=default_scale(dims.head_dim, scale), batch=q.shape[0], heads=dims.heads,
                         extra=extra)
        env = {"q": q, "k": k, "v": v, **stage_inputs}
        for stage in self.program.stages:
            env.update(stage_impl(backend, type(stage))(stage, env, ctx))
        return env["out"], env.get("lse")

    def run_groups(self, q, k, v, dims: Dims, scale, return_lse: bool, stage_inputs: dict,
                   groups: list[BatchGroup], backend: str = "torch"):
        """Run each batch group with its own positions (keys sliced to its valid length) and put
        the results back in batch order (differentiable: a concatenation and a gather)."""
        outs, lses, order = [], [], []
        for grp in groups:
            idx = list(range(dims.batch)) if grp.index is None else list(grp.index)
            sel = None if grp.index is None else torch.tensor(idx, device=q.device)
            qg, kg, vg = (t if sel is None else t.index_select(0, sel) for t in (q, k, v))
            if grp.kv_len == 0:  # no valid key: zeros and lse -inf
                o = qg.new_zeros(qg.shape[:3] + (v.shape[-1],))
                lse = torch.full(qg.shape[:3], float("-inf"), dtype=torch.float32, device=q.device)
            else:
                o, lse = self.run_program(qg, kg[:, :, :grp.kv_len], vg[:, :, :grp.kv_len], dims, scale, True,
                                          stage_inputs, backend, grp)
            outs.append(o.to(q.dtype))
            lses.append(lse.float() if q.dtype != torch.float64 else lse.double())
            order += idx
        if len(groups) == 1 and groups[0].index is None:
            return outs[0], lses[0]
        inverse = torch.empty(dims.batch, dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(dims.batch)
        inverse = inverse.to(q.device)
        return torch.cat(outs).index_select(0, inverse), torch.cat(lses).index_select(0, inverse)

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
