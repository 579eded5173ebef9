"""Which function implements which program stage on which backend.

Backends are loaded from :data:`BACKEND_MODULES`, a table of module names imported with
``importlib`` on first use; each backend module exports two explicit tables, ``STAGES``
(stage type -> ``fn(stage, env, ctx) -> dict of outputs``) and ``SOURCES`` (stage type ->
``fn(stage, q_len) -> Path`` of its generated kernel file). The runtime looks implementations up
with :func:`stage_impl`. A new family outside the package can add its stages with
``register_stage("torch", MyStage)(run)``, without touching the runtime.
"""

from __future__ import annotations

import importlib
from typing import Callable

from attncompiler.errors import UnsupportedError

from .context import RunContext

BACKENDS = ("torch", "triton")
BACKEND_MODULES = {"torch": "attncompiler.codegen.pytorch.stages", "triton": "attncompiler.codegen.triton.stages"}

_IMPLS: dict[tuple[str, type], Callable] = {}
_SOURCES: dict[type, Callable] = {}
_LOADED: set[str] = set()

__all__ = ["BACKENDS", "BACKEND_MODULES", "RunContext", "register_stage", "stage_impl", "stage_source"]


def register_stage(backend: str, stage_type: type):
    """Register ``fn(stage, env, ctx) -> dict of outputs`` for ``stage_type`` on ``backend``."""

    def deco(fn):
        _IMPLS[(backend, stage_type)] = fn
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


def _load(backend: str) -> None:
    """Import ``backend``'s module from the table once and copy its tables in (explicit
    registrations made earlier with :func:`register_stage` win)."""
    if backend in _LOADED:
        return
    if backend not in BACKEND_MODULES:
        raise UnsupportedError(f"unknown backend {backend!r}; choose one of {BACKENDS} or 'auto'")
    try:
        module = importlib.import_module(BACKEND_MODULES[backend])
    except ImportError as e:
        if backend == "torch":
            raise
        raise UnsupportedError(f"the {backend} backend is not available: {e}") from e
    for stage_type, fn in module.STAGES.items():
        _IMPLS.setdefault((backend, stage_type), fn)
    for stage_type, fn in module.SOURCES.items():
        _SOURCES.setdefault(stage_type, fn)
    _LOADED.add(backend)
