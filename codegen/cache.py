"""On-disk cache of generated kernel modules.

Generated source is written atomically (temporary file + rename) to a cache directory, named
by a content hash, and imported from that file. Triton's ``@jit`` reads a kernel's source from
its file, so exec'ing a string works under the interpreter and then fails on a GPU; importing
a real file works on both. A cache entry whose text differs from what the renderer produces
(corrupt, half-written, edited) is rewritten, not trusted.

The directory is ``$ATTNC_CACHE_DIR`` when set, else ``$XDG_CACHE_HOME/attncompiler/kernels``
(``~/.cache/attncompiler/kernels``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from attncompiler.errors import CodegenError


@dataclass
class CacheStats:
    """Counters for tests and ``attnc explain``: how often source was written or reused."""

    writes: int = 0  # files (re)written
    rebuilt: int = 0  # of which replaced a corrupt or stale entry
    disk_hits: int = 0  # existing files imported as they were
    memory_hits: int = 0  # modules reused within this process


STATS = CacheStats()
_MODULES: dict[tuple[str, str], ModuleType] = {}


def cache_dir() -> Path:
    """The kernel cache directory (created on first use)."""
    env = os.environ.get("ATTNC_CACHE_DIR")
    if env:
        path = Path(env).expanduser()
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        path = base / "attncompiler" / "kernels"
    path.mkdir(parents=True, exist_ok=True)
    return path


def content_key(material: dict) -> str:
    """A stable content hash of JSON-serializable key material (20 hex digits)."""
    blob = json.dumps(material, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def entry_path(key: str, prefix: str = "attnc") -> Path:
    """Where the entry for ``key`` lives in the current cache directory."""
    return cache_dir() / f"{prefix}_{key}.py"


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load(key: str, source: str, prefix: str = "attnc") -> tuple[ModuleType, Path]:
    """Import the module for ``key``, writing ``source`` first when the entry is missing or differs.

    Raises:
        CodegenError: the generated file cannot be imported (names the file).
    """
    path = entry_path(key, prefix)
    mem_key = (str(path), key)
    mod = _MODULES.get(mem_key)
    if mod is not None and path.exists():
        STATS.memory_hits += 1
        return mod, path
    try:
        existing = path.read_text()
    except (OSError, UnicodeDecodeError):
        existing = None
    if existing == source:
        STATS.disk_hits += 1
    else:
        if existing is not None:
            STATS.rebuilt += 1
        atomic_write(path, source)
        STATS.writes += 1
    mod = _import(path, f"attncompiler_generated.{prefix}_{key}")
    _MODULES[mem_key] = mod
    return mod, path


def ensure(key: str, source: str, prefix: str = "attnc") -> Path:
    """Write the entry for ``key`` unless it already holds ``source``; returns its path (no import)."""
    path = entry_path(key, prefix)
    try:
        if path.read_text() == source:
            return path
    except (OSError, UnicodeDecodeError):
        pass
    atomic_write(path, source)
    STATS.writes += 1
    return path


def _import(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise CodegenError(f"cannot import generated kernel file {path}")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
    except Exception as e:
        sys.modules.pop(name, None)
        raise CodegenError(f"generated kernel file {path} failed to import: {type(e).__name__}: {e}; "
                           "delete it to force regeneration and report the pattern") from e
    return mod


def clear_memory() -> None:
    """Forget modules imported in this process (tests use it to exercise the disk path)."""
    _MODULES.clear()
