"""Edge weights on the distributed paths: a score_mod at a shard's global positions, and sinks.

A score_mod is a function of one edge (score, b, h, q_idx, kv_idx), so a partial computation of
queries ``q_off + i`` against keys ``k_off + j`` applies it with the positions shifted back to
global ones (:func:`shift_mod`) and the log-sum-exp merge of the partials is unchanged.

Sinks join each row's denominator once, after the merge: ``lse' = logaddexp(lse, sink[h])``,
``out' = out * exp(lse - lse')``. The backward of the keys is then the ordinary one run with
``out'`` and ``lse'`` (``p_j = exp(s_j - lse')``, ``delta = dO . out'``: the sink carries no value),
and ``d sink[h] = -sum over rows of exp(sink[h] - lse') * delta`` (each ``p_j`` moves by
``-p_j * p_sink`` when the sink grows, so ``d out' / d sink = -p_sink * out'``).

Gradients of captured tensors and of the sinks are this rank's contributions (the edges it
computed); summed over the ranks they are the whole sequence's gradient, as for every other
parameter under sequence parallelism (e.g. ``all_reduce`` of all gradients over the group).
"""

from __future__ import annotations

import torch

from ..dsl.score_mod import (ScoreMod, captured_tensors, check_captured_grads, check_device, check_result,
                             check_score_mod)


class ShiftedMod(ScoreMod):
    """``inner`` seeing global positions: ``q_idx + q_off`` and ``kv_idx + k_off`` (differentiated
    with autograd; :class:`ShiftedModVjp` when ``inner`` has a hand-written derivative)."""

    def __init__(self, inner, q_off: int, k_off: int):
        self.inner, self.q_off, self.k_off = inner, int(q_off), int(k_off)
        self.finite = getattr(inner, "finite", False)

    def _idx(self, q_idx, kv_idx, cache: dict | None):
        # the index tensors are the same for every (b, h) of one step: shift them once per step
        if cache is None:
            return q_idx + self.q_off, kv_idx + self.k_off
        if ("shifted",) not in cache:
            cache[("shifted",)] = (q_idx + self.q_off, kv_idx + self.k_off)
        return cache[("shifted",)]

    def __call__(self, score, b, h, q_idx, kv_idx):
        return self.inner(score, b, h, *self._idx(q_idx, kv_idx, None))

    def apply_(self, score, b, h, q_idx, kv_idx, cache):
        qi, ki = self._idx(q_idx, kv_idx, cache)
        if isinstance(self.inner, ScoreMod):
            return self.inner.apply_(score, b, h, qi, ki, cache)
        return check_result(self.inner, self.inner(score, b, h, qi, ki), score).contiguous()

    def tensors(self):
        return captured_tensors(self.inner)

    def __repr__(self) -> str:
        return f"{self.inner!r} at (q + {self.q_off}, kv + {self.k_off})"


class ShiftedModVjp(ShiftedMod):
    """A :class:`ShiftedMod` whose inner score_mod has a hand-written :meth:`ScoreMod.vjp_`."""

    def vjp_(self, ds, b, h, q_idx, kv_idx, cache, grads):
        return self.inner.vjp_(ds, b, h, *self._idx(q_idx, kv_idx, cache), cache, grads)


def shift_mod(fn, q_off: int, k_off: int):
    """``fn`` applied at global positions for a sub-problem at ``(q_off, k_off)``; None stays None."""
    if fn is None:
        return None
    own_vjp = isinstance(fn, ScoreMod) and type(fn).vjp_ is not ScoreMod.vjp_
    return (ShiftedModVjp if own_vjp else ShiftedMod)(fn, q_off, k_off)


def prepare_mod(score_mod, q, seq_len: int):
    """``(score_mod, [(id, tensor)] captured)`` checked once for a distributed call on ``q``'s device
    (a built-in checks its tables against the whole sequence)."""
    if score_mod is None:
        return None, []
    fn = check_score_mod(score_mod)
    captured = captured_tensors(fn)
    check_device(captured, q.device, fn)
    if isinstance(fn, ScoreMod):
        fn.check(q.shape[0], q.shape[1], seq_len, seq_len)
    if torch.is_grad_enabled() and any(t.requires_grad for t in captured):
        cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
        check_captured_grads(fn, captured, cdt, q.device)
    return fn, [(id(t), t) for t in captured]


def partial_forward(q, k, v, layout, sched, scale: float, mod):
    """``(out, lse)`` of one sub-problem; ``mod`` is the shifted score_mod or None."""
    from ..codegen.pytorch.attention import block_sparse_attention
    from ..codegen.pytorch.score_mod import run_forward

    if mod is None:
        return block_sparse_attention(q, k, v, layout, sched, scale)
    out, lse = run_forward(q, k, v, layout, sched, scale, mod, tuple(range(q.shape[0])))
    return out.to(q.dtype), lse


def partial_backward(q, k, v, out, lse, dout, layout, sched, scale: float, mod, captured, grads: dict):
    """``(dq, dk, dv)`` of one sub-problem with the merged ``out``, ``lse``; the captured tensors'
    gradients (``captured``: ``[(id, tensor)]``) are added into ``grads`` (keyed by id)."""
    from ..codegen.pytorch.attention import block_sparse_attention_backward
    from ..codegen.pytorch.score_mod import run_backward

    if mod is None:
        return block_sparse_attention_backward(q, k, v, out, lse, dout, layout, sched, scale)
    dq, dk, dv, cg = run_backward(q, k, v, out, lse, dout, None, layout, sched, scale, mod,
                                  tuple(range(q.shape[0])), captured)
    for (key, _), g in zip(captured, cg):
        if g is not None:
            grads[key] = g if grads.get(key) is None else grads[key] + g
    return dq, dk, dv


def sink_forward(out, lse, sinks):
    """``(out', lse')`` with ``sinks [H]`` in every row's denominator (rows with no key keep 0)."""
    s = sinks.detach().to(lse.dtype)[None, :, None]
    new = torch.logaddexp(lse, s)
    return out * torch.exp(lse - new)[..., None].to(out.dtype), new


def sink_grad(out, lse, dout, sinks):
    """``d loss / d sinks [H]`` from this rank's rows: ``-sum exp(sink - lse') * (dO . out')``."""
    delta = (dout.to(lse.dtype) * out.to(lse.dtype)).sum(-1)  # [B, H, n]
    p_sink = torch.exp(sinks.detach().to(lse.dtype)[None, :, None] - lse)
    return -(p_sink * delta).sum(dim=(0, 2)).to(sinks.dtype)
