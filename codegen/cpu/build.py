"""Build and load the C kernels of the torch backend's CPU stages (the ``*.c`` files beside it,
which may include the ``*.h`` headers beside it).

A kernel source is compiled once per machine with the system C compiler (``$CC``, else ``cc``;
Triton needs one too) into the kernel cache directory (:func:`.cache.cache_dir`), named by a
hash of the source, the flags and the compiler, and loaded with :mod:`ctypes` (a foreign call
releases the GIL, so row ranges can run on several threads). Nothing is needed at install time.
A library already in the cache is loaded only when it is a private file of this user
(:func:`.cache.trusted_file`); anything else is rebuilt over it, never loaded.

The kernels use AVX2 and FMA. Where they cannot run (another architecture, a CPU without AVX2,
no compiler, a failed build, or ``ATTNC_CPU_KERNELS=0``) :func:`load` returns None and the
callers keep their plain torch path; the reason is in :data:`STATUS`.
"""

from __future__ import annotations

import ctypes
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

from ..cache import cache_dir, content_key, trusted_file

FLAGS = ("-O3", "-mavx2", "-mfma", "-shared", "-fPIC", "-std=c11")
TEMPLATES = Path(__file__).parent
STATUS: dict[str, str] = {}  # kernel name -> "loaded" or why not
_LIBS: dict[str, ctypes.CDLL | None] = {}
_LOCK = threading.Lock()


def enabled() -> bool:
    """Whether the C kernels may be used: ``ATTNC_CPU_KERNELS`` is not 0 and the CPU is an
    x86-64 with AVX2 (as torch reports it)."""
    if os.environ.get("ATTNC_CPU_KERNELS", "1") == "0":
        return False
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def load(name: str) -> ctypes.CDLL | None:
    """The compiled library of ``<name>.c`` (built on first use), or None."""
    with _LOCK:
        if name not in _LIBS:
            _LIBS[name] = _build(name)
        return _LIBS[name]


def _build(name: str) -> ctypes.CDLL | None:
    if not enabled():
        STATUS[name] = "disabled (ATTNC_CPU_KERNELS=0, or not an x86-64 CPU with AVX2)"
        return None
    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None:
        STATUS[name] = "no C compiler ($CC or cc) on PATH"
        return None
    source = (TEMPLATES / f"{name}.c").read_text()
    headers = {h.name: h.read_text() for h in sorted(TEMPLATES.glob("*.h"))}  # included sources change the build
    key = content_key({"source": source, "headers": headers, "flags": FLAGS, "cc": cc,
                       "machine": platform.machine()})
    lib_path = cache_dir() / f"{name}_{key}.so"
    if (lib_path.exists() or lib_path.is_symlink()) and not trusted_file(lib_path):
        warnings.warn(f"compiled kernel {lib_path} is not a private file of this user (foreign owner, writable "
                      "by others, or not a regular file); it is not loaded but rebuilt", RuntimeWarning, stacklevel=3)
    if not trusted_file(lib_path):
        with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
            src = Path(tmp) / f"{name}.c"
            src.write_text(source)
            out = Path(tmp) / "lib.so"
            res = subprocess.run([cc, *FLAGS, "-I", str(TEMPLATES), "-o", str(out), str(src), "-lm"],
                                 capture_output=True, text=True)
            if res.returncode != 0:
                STATUS[name] = f"build failed: {res.stderr.strip()[-400:]}"
                return None
            os.chmod(out, 0o700)  # never group/world-writable, whatever the umask
            os.replace(out, lib_path)  # atomic: a concurrent builder writes the same bytes
    try:
        lib = ctypes.CDLL(str(lib_path))
    except OSError as err:
        STATUS[name] = f"load failed: {err}"
        return None
    STATUS[name] = "loaded"
    return lib
