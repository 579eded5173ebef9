"""``ac.compile(pattern)``: the module that runs a pattern, chosen from an explicit table by family."""

from __future__ import annotations

from ..dsl.pattern import Pattern
from ..errors import PatternError
from ..families.combiner.pattern import FAMILY as COMBINER
from ..families.diffusion.pattern import DIFFUSION
from ..families.memory.pattern import MEMORY
from ..program.schedule import Schedule
from .diffusion import DiffusionAttention
from .edge_weights import run_joint_stages
from .memory import MemoryAttention
from .module import CompiledAttention


class CombinerAttention(CompiledAttention):
    """A compiled Combiner pattern: :class:`CompiledAttention`, except that with a score_mod each
    factorization's joint softmax applies it to its direct (token-to-token) scores only, at the
    tokens' real positions (:func:`~attncompiler.runtime.edge_weights.run_joint_stages`)."""

    def run_program(self, q, k, v, dims, scale, return_lse, stage_inputs, backend, group):
        """Run the program's stages once: ``(out, lse or None)``."""
        if self.edge_weights is None:
            return super().run_program(q, k, v, dims, scale, return_lse, stage_inputs, backend, group)
        return run_joint_stages(self.program, q, k, v, dims, scale, return_lse, stage_inputs, backend,
                                self.edge_weights)


# Families whose compiled module is more than the generic one (learned parameters, decoding,
# head slicing, per-stage edge weights); every other family runs in a plain CompiledAttention.
MODULES: dict[str, type[CompiledAttention]] = {DIFFUSION: DiffusionAttention, MEMORY: MemoryAttention,
                                                COMBINER: CombinerAttention}


def compile(pattern: Pattern, backend: str = "auto", *, schedule: Schedule | None = None,
            check_finite: bool = False, score_mod=None, sinks=None) -> CompiledAttention:
    """Compile an attention pattern into a ``torch.nn.Module``.

    The module's ``forward(q, k, v)`` takes ``q [B, H, Lq, D]`` and ``k, v [B, Hkv, Lk, *]``;
    positions are top-left by default (query row i is position i, key j is position j, as in
    FlexAttention); mask patterns take ``q_offset=``, ``align="bottom_right"``, ``kv_lens=`` and
    ``cu_seqlens=`` per call (see :class:`~attncompiler.runtime.module.CompiledAttention`). Unknown keywords raise
    :class:`~attncompiler.errors.UnexpectedArgumentError`.

    Args:
        pattern: any pattern built with the DSL or the catalogue.
        backend: ``"auto"`` (Triton on CUDA tensors, torch otherwise), ``"torch"`` or ``"triton"``.
        schedule: block sizes and tuning knobs; the default suits CPU and GPU.
        check_finite: reject NaN/inf inputs with an :class:`InputError`. Off by default: it costs
            an extra pass over q/k/v and a host sync per call (``attnc verify`` turns it on).
        score_mod: FlexAttention's ``score_mod(score, b, h, q_idx, kv_idx) -> score``, applied to the
            scaled score before the mask (``q_idx`` is the query position ``q_offset + row``); the
            tensors it captures get gradients (:mod:`attncompiler.dsl.score_mod`: built-ins
            ``ac.softcap``, ``ac.alibi``, ``ac.relative_bias``, ``ac.bias``). Where it applies, per family:

            * mask patterns: every score. The torch backend runs any function, the triton backend one
              that traces (it is rendered into the kernels; an opaque one raises
              :class:`UnsupportedError` naming it).
            * Diffuser (``ac.diffuse``): the base attention
              ``P = softmax(score_mod(scale q k^T) + mask)``, which every hop then uses.
            * Combiner: the direct scores ``scale q_i . k_j`` (``j`` in ``D_i``) of the joint softmax,
              with ``q_idx = i`` and ``kv_idx = j`` the real positions; the summary scores
              ``scale q_i . k_S`` and the local expectations ``scale q_S . k_j`` involve a pooled
              query or key with no position and stay unmodified.
            * ABC (memory slots): raises :class:`UnsupportedError` (its scores are against
              learned memory slots, not keys).

            Diffuser and Combiner run it on the torch backend only (triton raises).
        sinks: attention sinks ``[H]``: a per-head logit in every row's softmax denominator that
            contributes no value (gpt-oss); a row with no visible key still gives zeros. The
            returned lse includes the sink (for such a row it is the sink itself). Mask patterns
            and the Combiner's joint softmax (torch backend); the Diffuser raises (its P must stay
            row-stochastic), as does ABC.
    """
    if not isinstance(pattern, Pattern):
        raise PatternError(f"compile() needs an attention pattern, got {type(pattern).__name__} {pattern!r}")
    cls = MODULES.get(pattern.family, CompiledAttention)
    if score_mod is not None or sinks is not None:
        return cls(pattern, backend, schedule, check_finite, score_mod=score_mod, sinks=sinks)
    return cls(pattern, backend, schedule, check_finite)
