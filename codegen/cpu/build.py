"""Build and load the C kernels of the torch backend's CPU stages (the ``*.c`` files beside it,
which may include the ``*.h`` headers beside it).

A kernel source is compiled once per machine with the system C compiler (``$CC``, else ``cc``;
Triton needs one too) into the kernel cache directory (:func:`.cache.cache_dir`), named by a
hash of the source, the variant, the flags and the compiler, and loaded with :mod:`ctypes` (a
foreign call releases the GIL, so row ranges can run on several threads). Nothing is needed at
install time. A library already in the cache is loaded only when it is a private file of this
user (:func:`.cache.trusted_file`); anything else is rebuilt over it, never loaded.

The kernels are written against the 8-lane vectors of ``cpu_common.h``, built in one of two
:data:`VARIANTS`: ``"avx2"`` (AVX2 + FMA intrinsics; the default on an x86-64 CPU with AVX2) and
``"generic"`` (the compiler's vector extensions, no target flags: NEON on aarch64, SSE2 on an
x86-64 without AVX2; opt-in with ``ATTNC_CPU_KERNELS=generic``, see :data:`OPT_IN_NOTE`).
``ATTNC_CPU_KERNELS=0`` switches the kernels off. Where no kernel can run (no
compiler, a failed build, switched off) :func:`load` returns None and the callers keep their
plain torch path; the reason is in :data:`STATUS`.
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

from attncompiler.errors import InputError

from ..cache import cache_dir, content_key, trusted_file

_COMMON = ("-shared", "-fPIC", "-std=c11")
# Compiler flags per variant. The generic one names no target: on aarch64 NEON is baseline.
VARIANTS: dict[str, tuple[str, ...]] = {
    "avx2": ("-O3", "-mavx2", "-mfma", *_COMMON),
    "generic": ("-O3", "-ffp-contract=fast", *_COMMON),
}
TEMPLATES = Path(__file__).parent
# kernel name -> "loaded (<variant>)" or why not, for the default variant's last load; and
# "<name>:<variant>" -> the same for each variant built
STATUS: dict[str, str] = {}
_LIBS: dict[tuple[str, str], ctypes.CDLL | None] = {}
_LOCK = threading.Lock()
_SWITCH = "ATTNC_CPU_KERNELS"


def enabled() -> bool:
    """Whether the C kernels may be used: ``ATTNC_CPU_KERNELS`` is not 0."""
    return os.environ.get(_SWITCH, "1").strip() != "0"


def default_variant() -> str:
    """The variant :func:`load` builds by default: ``"generic"`` when ``ATTNC_CPU_KERNELS=generic``,
    else ``"avx2"`` on an x86-64 CPU with AVX2 (as torch reports it), else ``"generic"``."""
    setting = os.environ.get(_SWITCH, "1").strip().lower()
    if setting == "generic":
        return "generic"
    if setting not in ("", "0", "1", "auto"):
        warnings.warn(f"{_SWITCH}={setting!r} is not one of 0, 1, auto, generic; the kernels use their default "
                      "variant", RuntimeWarning, stacklevel=2)
    return "avx2" if _has_avx2() else "generic"


# Why the generic build is opt-in: it is correct everywhere (tested on x86 and, under qemu, as
# aarch64 builds it) but measured 1.7-1.9x slower than ATen's ops on an x86-64 CPU (sliding window,
# L=4096; command in docs/internals.md), and it has not been timed on ARM hardware.
OPT_IN_NOTE = ("not used by default without AVX2: the generic build measured slower than ATen's ops on x86 and is "
               f"untimed on ARM; {_SWITCH}=generic runs it")


def _generic_forced() -> bool:
    return os.environ.get(_SWITCH, "1").strip().lower() == "generic"


def _has_avx2() -> bool:
    """An x86-64 CPU with AVX2 (and FMA, which every AVX2 CPU torch reports has), as torch reports it."""
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    return x86 and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def status(name: str, variant: str | None = None) -> str:
    """``"loaded (<variant>)"``, or why ``<name>.c`` is not available in ``variant`` (default:
    :func:`default_variant`), or ``"not built"`` before the first :func:`load`."""
    return STATUS.get(f"{name}:{_variant(variant)}", "not built")


def _variant(variant: str | None) -> str:
    if variant is None:
        return default_variant()
    if variant not in VARIANTS:
        raise InputError(f"kernel variant {variant!r} is unknown; hint: one of {sorted(VARIANTS)}")
    return variant


def load(name: str, variant: str | None = None) -> ctypes.CDLL | None:
    """The compiled library of ``<name>.c`` in ``variant`` (``"avx2"`` or ``"generic"``; default
    :func:`default_variant`), built on first use, or None (see :data:`STATUS`). The avx2 variant
    runs only on a CPU with AVX2 and FMA."""
    v = _variant(variant)
    if not enabled():  # read on every call: switching the kernels off takes effect at once
        return _build(name, variant)
    if variant is None and v == "generic" and not _generic_forced():
        STATUS[name] = STATUS[f"{name}:{v}"] = OPT_IN_NOTE
        return None
    with _LOCK:
        if (name, v) not in _LIBS:
            _LIBS[name, v] = _build(name, v)
        if variant is None:
            STATUS[name] = STATUS[f"{name}:{v}"]
        return _LIBS[name, v]


def compile_command(cc: str, variant: str) -> list[str]:
    """The compiler's arguments for ``variant``, without the source and output file."""
    return [cc, *VARIANTS[_variant(variant)], "-I", str(TEMPLATES)]


def _build(name: str, variant: str | None = None) -> ctypes.CDLL | None:
    """Build (or find in the cache) and load one library; records its status under
    ``"<name>:<variant>"`` and, when ``variant`` is None (the default variant), under ``name``."""
    v = _variant(variant)

    def note(text: str) -> None:
        STATUS[f"{name}:{v}"] = text
        if variant is None:
            STATUS[name] = text

    if not enabled():
        note(f"disabled ({_SWITCH}=0)")
        return None
    if v == "avx2" and not _has_avx2():
        note("the avx2 variant needs an x86-64 CPU with AVX2")
        return None
    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None:
        note("no C compiler ($CC or cc) on PATH")
        return None
    source = (TEMPLATES / f"{name}.c").read_text()
    headers = {h.name: h.read_text() for h in sorted(TEMPLATES.glob("*.h"))}  # included sources change the build
    key = content_key({"source": source, "headers": headers, "variant": v, "flags": VARIANTS[v], "cc": cc,
                       "machine": platform.machine()})
    lib_path = cache_dir() / f"{name}_{v}_{key}.so"
    if (lib_path.exists() or lib_path.is_symlink()) and not trusted_file(lib_path):
        warnings.warn(f"compiled kernel {lib_path} is not a private file of this user (foreign owner, writable "
                      "by others, or not a regular file); it is not loaded but rebuilt", RuntimeWarning, stacklevel=3)
    if not trusted_file(lib_path):
        with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
            src = Path(tmp) / f"{name}.c"
            src.write_text(source)
            out = Path(tmp) / "lib.so"
            res = subprocess.run([*compile_command(cc, v), "-o", str(out), str(src), "-lm"],
                                 capture_output=True, text=True)
            if res.returncode != 0:
                note(f"build failed ({v}): {res.stderr.strip()[-400:]}")
                return None
            os.chmod(out, 0o700)  # never group/world-writable, whatever the umask
            os.replace(out, lib_path)  # atomic: a concurrent builder writes the same bytes
    try:
        lib = ctypes.CDLL(str(lib_path))
    except OSError as err:
        note(f"load failed ({v}): {err}")
        return None
    note(f"loaded ({v})")
    return lib
