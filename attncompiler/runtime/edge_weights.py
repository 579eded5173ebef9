"""Edge weights of a compiled module: the ``score_mod`` and attention ``sinks`` given to
``ac.compile``, checked once at compile time and handed to the attention stage per call."""

from __future__ import annotations

import torch

from ..dsl.score_mod import check_score_mod
from ..errors import InputError, UnsupportedError
from ..program.stages import BlockSparseAttention, Program


def check_edge_weights(program: Program, score_mod, sinks):
    """``(score_mod, sinks)`` after checking that the program can apply them: only programs made of
    ``BlockSparseAttention`` stages (mask patterns) take edge weights today."""
    if score_mod is None and sinks is None:
        return None, None
    if score_mod is not None:
        check_score_mod(score_mod)
    if sinks is not None and (not isinstance(sinks, torch.Tensor) or not sinks.is_floating_point()
                              or sinks.dim() != 1):
        got = tuple(sinks.shape) if isinstance(sinks, torch.Tensor) else type(sinks).__name__
        raise InputError(f"sinks must be a floating tensor [H] (one logit per query head), got {got}; "
                         "hint: torch.nn.Parameter(torch.zeros(num_heads))")
    other = [type(st).__name__ for st in program.stages if not isinstance(st, BlockSparseAttention)]
    if other:
        raise UnsupportedError(f"score_mod/sinks apply to mask patterns' attention; this program has stages "
                               f"{other} that do not take them (the Combiner, Diffuser and ABC families do not "
                               "accept edge weights yet)")
    return score_mod, sinks


def edge_weights(score_mod, sinks, backend: str, group) -> dict:
    """The stage context entries for one call: the score_mod, the sinks and the batch entries the
    call runs (so the score_mod sees the caller's ``b``)."""
    if backend not in ("torch", "triton"):
        raise UnsupportedError(f"score_mod/sinks run on the torch and triton backends, not {backend!r}")
    return {"score_mod": score_mod, "sinks": sinks,
            "batch_index": None if group is None or group.index is None else tuple(group.index)}
