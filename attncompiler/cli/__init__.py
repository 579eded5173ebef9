"""The ``attnc`` command line: :func:`main`, one module per command group."""

from .main import main

__all__ = ["main"]
