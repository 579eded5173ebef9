"""Edge weights of a compiled module: the ``score_mod`` and attention ``sinks`` given to
``ac.compile``, checked once at compile time and handed to the attention stages per call.

Which families take them, and where their equations have a score:

* mask patterns: every score ``scale q_i . k_j`` (the ``BlockSparseAttention`` stage);
* Diffuser: the base attention ``P = softmax(score_mod(scale q k^T) + mask)`` (``SparseProbs``,
  or every hop's ``BlockSparseAttention`` under the recompute schedule); no sinks (P is the
  row-stochastic transition matrix of the diffusion);
* Combiner: the direct token-to-token scores of the joint softmax, at the tokens' real
  positions; the summary columns of the joint softmax (``scale q_i . k_S``) and the local
  expectations (``scale q_S . k_j``) have a pooled side with no position and stay unmodified;
  sinks join the joint softmax's denominator;
* ABC (memory slots): none; its scores are against learned memory slots, not keys.
"""

from __future__ import annotations

import torch

from ..codegen.context import RunContext
from ..codegen.registry import stage_impl
from ..dsl.score_mod import check_score_mod
from ..errors import InputError, UnsupportedError
from ..families.combiner.joint import JointMask, joint_score_mod
from ..families.combiner.pattern import FAMILY as COMBINER
from ..families.combiner.program import ConcatSummaries, MixOutputs, ReorderTokens, SpanAttention, SpanPool
from ..families.diffusion.pattern import DIFFUSION
from ..families.diffusion.program import Axpby, DiffusionHop, ExpandHeads, PassThrough, SparseProbs
from ..families.memory.pattern import MEMORY
from ..program.inputs import Dims, default_scale
from ..program.stages import BlockSparseAttention, Program

# The stages besides BlockSparseAttention that may sit in a program with edge weights, per family:
# the stages that compute a score take them (SparseProbs), the others only move values around.
_FAMILY_STAGES = {
    DIFFUSION: (SparseProbs, DiffusionHop, ExpandHeads, Axpby, PassThrough),
    COMBINER: (SpanPool, SpanAttention, ConcatSummaries, ReorderTokens, MixOutputs),
}


def check_edge_weights(program: Program, score_mod, sinks):
    """``(score_mod, sinks)`` after checking that the program can apply them: mask patterns,
    the Diffuser (score_mod only) and the Combiner take edge weights; ABC raises."""
    if score_mod is None and sinks is None:
        return None, None
    family = program.pattern.family
    if family == MEMORY:
        raise UnsupportedError(
            f"score_mod/sinks do not apply to ABC memory patterns ({program.pattern!r}): ABC's scores are "
            "q . K~ against learned memory slots (K~ = sum_j phi_j k_j), not against keys, so a slot score has no "
            "key position kv_idx for score_mod(score, b, h, q_idx, kv_idx); hint: a window memory is exactly "
            "ac.sliding_window(n - 1) & ac.causal(), which takes a score_mod, or bias the control logits instead")
    if family == DIFFUSION and sinks is not None:
        raise UnsupportedError(
            f"sinks do not apply to Diffuser patterns ({program.pattern!r}): P is the diffusion's row-stochastic "
            "transition matrix (rows sum to 1, so sum_k c_k P^k V averages values); a sink would make it "
            "sub-stochastic and leak mass every hop; hint: drop sinks=, a score_mod is supported")
    if score_mod is not None:
        check_score_mod(score_mod)
    if sinks is not None and (not isinstance(sinks, torch.Tensor) or not sinks.is_floating_point()
                              or sinks.dim() != 1):
        got = tuple(sinks.shape) if isinstance(sinks, torch.Tensor) else type(sinks).__name__
        raise InputError(f"sinks must be a floating tensor [H] (one logit per query head), got {got}; "
                         "hint: torch.nn.Parameter(torch.zeros(num_heads))")
    allowed = (BlockSparseAttention,) + _FAMILY_STAGES.get(family, ())
    other = [type(st).__name__ for st in program.stages if not isinstance(st, allowed)]
    if other:
        raise UnsupportedError(f"score_mod/sinks apply to the attention of mask, Diffuser and Combiner patterns; "
                               f"this program of {program.pattern!r} has stages {other} that do not take them")
    return score_mod, sinks


def check_backend(family: str, backend: str, score_mod, sinks) -> None:
    """Raise :class:`UnsupportedError` when ``backend`` cannot run a ``family`` program with edge
    weights: the Diffuser and Combiner take them on the torch backend only (the triton kernels
    render a score_mod for mask patterns' attention only)."""
    if (score_mod is not None or sinks is not None) and backend != "torch":
        what = f"score_mod {score_mod!r}" if score_mod is not None else "sinks"
        raise UnsupportedError(f"{family} patterns run a {what} on the torch backend only, not {backend!r}; "
                               "hint: ac.compile(pattern, backend='torch', score_mod=...) (CPU or CUDA tensors)")


def edge_weights(score_mod, sinks, backend: str, group) -> dict:
    """The stage context entries for one call: the score_mod, the sinks and the batch entries the
    call runs (so the score_mod sees the caller's ``b``)."""
    if backend not in ("torch", "triton"):
        raise UnsupportedError(f"score_mod/sinks run on the torch and triton backends, not {backend!r}")
    return {"score_mod": score_mod, "sinks": sinks,
            "batch_index": None if group is None or group.index is None else tuple(group.index)}


def run_joint_stages(program: Program, q, k, v, dims: Dims, scale, need_lse: bool, stage_inputs: dict,
                     backend: str, weights: tuple):
    """Run a Combiner program with edge weights: ``(out, lse or None)``. Each joint attention stage
    gets the score_mod of its own factorization and length (:func:`joint_score_mod`: token columns
    at real positions, summary columns unmodified); the summary stages ignore it."""
    score_mod, sinks = weights
    check_backend(COMBINER, backend, score_mod, sinks)
    ctx = RunContext(scale=default_scale(dims.head_dim, scale), batch=q.shape[0], heads=dims.heads,
                     extra={"need_lse": need_lse, **edge_weights(score_mod, sinks, backend, None)})
    env = {"q": q, "k": k, "v": v, **stage_inputs}
    for stage in program.stages:
        if isinstance(stage, BlockSparseAttention) and isinstance(stage.pattern, JointMask):
            ctx.extra["score_mod"] = None if score_mod is None else joint_score_mod(score_mod, stage.pattern,
                                                                                    dims.q_len)
        env.update(stage_impl(backend, type(stage))(stage, env, ctx))
    return env["out"], env.get("lse")
