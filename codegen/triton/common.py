"""Helpers the Triton stages share: device checks, kernel tiles, head-dim padding, dot precision,
and the tool versions that key the kernel cache."""

from __future__ import annotations

import contextlib
import os
import sys

import torch

from attncompiler.errors import UnsupportedError
from attncompiler.version import __version__


VALID_TILES = (16, 32, 64, 128)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs use exact products (the 1e-5 contract); fp16/bf16 use tensor cores anyway."""
    return "ieee" if dtype == torch.float32 else "tf32"


def tool_versions() -> dict[str, str]:
    """Versions of attncompiler, triton ("none" if missing), torch and python, for kernel cache keys."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:  # `attnc compile --emit` works without triton installed
        triton_version = "none"
    return {"attncompiler": __version__, "triton": triton_version,
            "torch": torch.__version__.split("+")[0], "python": f"{sys.version_info[0]}.{sys.version_info[1]}"}


def pad_dim(d: int) -> int:
    """Head dimension padded to a power of two, at least 16 (what ``tl.dot`` tiles need)."""
    return max(16, 1 << (d - 1).bit_length())


def on_device(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensors' one."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def interpreting() -> bool:
    """Whether Triton runs in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_device(q: torch.Tensor) -> None:
    """Raise :class:`UnsupportedError` unless ``q`` is on CUDA (or on CPU under TRITON_INTERPRET=1)."""
    if q.is_cuda or (q.device.type == "cpu" and interpreting()):
        return
    raise UnsupportedError(
        f"the triton backend runs on CUDA tensors (or on CPU under TRITON_INTERPRET=1), got a tensor on "
        f"{q.device}; use backend='torch' or 'auto' for this device")
