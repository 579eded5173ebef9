"""The runtime: ``compile()`` and the ``torch.nn.Module`` s that run programs on a backend."""

from .module import CompiledAttention, compile

__all__ = ["CompiledAttention", "compile"]
