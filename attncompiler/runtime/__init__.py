"""The runtime: ``compile()`` and the ``torch.nn.Module`` s that run programs on a backend."""

from .compile import MODULES, compile
from .diffusion import DiffusionAttention
from .memory import MemoryAttention
from .module import CompiledAttention, compile_program, resolve_backend

__all__ = ["MODULES", "CompiledAttention", "DiffusionAttention", "MemoryAttention", "compile", "compile_program",
           "resolve_backend"]
