"""One guard for every custom ``torch.autograd.Function``: double backward is refused loudly.

The hand-written backward passes of the stages (block-sparse attention, stored probabilities,
Combiner gathers, ABC slot scans and reads, Diffuser hops, Triton kernels, the distributed ring)
compute gradients with in-place and ``out=`` ops that autograd cannot record. Run with
``create_graph=True`` they would hand back gradients that look differentiable but are constants,
so a second derivative (a gradient penalty, ``gradgradcheck``) would be silently wrong.

:func:`single_backward` wraps such a backward: the body runs without recording, and when a
graph is being built its gradients pass through an error node that depends on the backward's
real inputs (saved tensors and incoming gradients). Differentiating them again raises
:class:`~attncompiler.errors.UnsupportedError` naming the stage; a caller that builds the graph
but never differentiates these gradients is unaffected.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch

from ..errors import UnsupportedError


def double_backward_message(stage: str) -> str:
    """The error text for ``stage`` (shared so tests and callers can match it)."""
    return (f"double backward (create_graph=True / gradgradcheck) is not supported by {stage}; "
            "use ac.reference or the dense SDPA path for higher-order gradients")


class _RefuseDoubleBackward(torch.autograd.Function):
    """Identity on the first ``n`` tensors (copied); its backward raises UnsupportedError.

    The remaining inputs are only there so that autograd sees the gradients depend on them
    (saved q, k, v, ...): a second derivative with respect to any of them reaches this node.
    """

    @staticmethod
    def forward(ctx, stage: str, n: int, *tensors):
        ctx.stage = stage
        return tuple(t.clone() for t in tensors[:n])

    @staticmethod
    def backward(ctx, *grads):
        raise UnsupportedError(double_backward_message(ctx.stage))


def refuse_double_backward(stage: str, grads: tuple, depends_on: tuple) -> tuple:
    """``grads`` (a backward's return tuple) marked so that differentiating them raises.

    Only acts while grad mode is on (``create_graph=True``) and something in ``depends_on`` or
    ``grads`` requires a gradient; otherwise ``grads`` is returned unchanged.
    """
    if not torch.is_grad_enabled():
        return grads
    deps = tuple(t for t in depends_on if isinstance(t, torch.Tensor) and t.requires_grad)
    pos = [i for i, g in enumerate(grads) if isinstance(g, torch.Tensor)]
    if not pos or not deps:
        return grads
    marked = _RefuseDoubleBackward.apply(stage, len(pos), *(grads[i].detach() for i in pos), *deps)
    out = list(grads)
    for i, t in zip(pos, marked):
        out[i] = t
    return tuple(out)


def single_backward(stage: str) -> Callable:
    """Decorate a custom Function's ``backward(ctx, *grad_outputs)`` (under ``@staticmethod``).

    The body runs under ``torch.no_grad()``; with ``create_graph=True`` its results are routed
    through :func:`refuse_double_backward`, depending on the saved tensors and grad outputs.
    """

    def deco(backward: Callable) -> Callable:
        @functools.wraps(backward)
        def wrapper(ctx: Any, *grad_outputs):
            building = torch.is_grad_enabled()
            deps = tuple(ctx.saved_tensors) + grad_outputs if building else ()
            with torch.no_grad():
                result = backward(ctx, *grad_outputs)
            if not building:
                return result
            single = not isinstance(result, tuple)
            result = refuse_double_backward(stage, (result,) if single else result, deps)
            return result[0] if single else result

        return wrapper

    return deco
