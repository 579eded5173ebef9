"""Which function implements which program stage on which backend.

Backends register stage implementations with :func:`register_stage`; the runtime looks them up
with :func:`stage_impl`. New pattern families add their stages here without touching the
runtime: ``@register_stage("torch", MyStage) def run(stage, env, ctx): ...``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from attncompiler.errors import UnsupportedError

BACKENDS = ("torch", "triton")

_IMPLS: dict[tuple[str, type], Callable] = {}


@dataclass
class RunContext:
    """What a stage implementation may need besides its inputs."""

    scale: float
    batch: int
    heads: int
    extra: dict[str, Any] = field(default_factory=dict)


def register_stage(backend: str, stage_type: type):
    """Register ``fn(stage, env, ctx) -> dict of outputs`` for ``stage_type`` on ``backend``."""

    def deco(fn):
        _IMPLS[(backend, stage_type)] = fn
        return fn

    return deco


_SOURCES: dict[type, Callable] = {}


def register_source(stage_type: type):
    """Register ``fn(stage, q_len) -> Path`` of the generated Triton file that runs ``stage_type``
    stages (written to the kernel cache), so ``attnc compile/explain`` can show every kernel a
    program uses, not only the block-sparse attention ones."""

    def deco(fn):
        _SOURCES[stage_type] = fn
        return fn

    return deco


def stage_source(stage, q_len: int):
    """The generated Triton file behind ``stage`` at length ``q_len``, or None when its stage
    type has no kernel file of its own (it runs as PyTorch ops or through another stage)."""
    _load("triton")
    fn = _SOURCES.get(type(stage))
    return None if fn is None else fn(stage, q_len)


def stage_impl(backend: str, stage_type: type) -> Callable:
    """The registered implementation, or :class:`UnsupportedError` naming what is missing."""
    _load(backend)
    fn = _IMPLS.get((backend, stage_type))
    if fn is None:
        raise UnsupportedError(f"the {backend} backend has no implementation of {stage_type.__name__} stages")
    return fn


def supports(backend: str, stage_type: type) -> bool:
    """Whether ``backend`` implements ``stage_type``."""
    try:
        _load(backend)
    except UnsupportedError:
        return False
    return (backend, stage_type) in _IMPLS


def _load(backend: str) -> None:
    if backend == "torch":
        from .pytorch import stages as torch_backend  # noqa: F401  (registers its stages)
    elif backend == "triton":
        try:
            from .triton import backend as triton_backend  # noqa: F401
        except ImportError as e:
            raise UnsupportedError(f"the triton backend is not available: {e}") from e
    else:
        raise UnsupportedError(f"unknown backend {backend!r}; choose one of {BACKENDS} or 'auto'")
