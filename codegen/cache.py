"""On-disk cache of generated kernel modules.

Generated source is written atomically (temporary file + rename) to a cache directory, named
by a content hash, and imported from that file. Triton's ``@jit`` reads a kernel's source from
its file, so exec'ing a string works under the interpreter and then fails on a GPU; importing
a real file works on both. A cache entry whose text differs from what the renderer produces
(corrupt, half-written, edited) is rewritten, not trusted.

The directory is ``$ATTNC_CACHE_DIR`` when set, else ``$XDG_CACHE_HOME/attncompiler/kernels``
(``~/.cache/attncompiler/kernels``).

Files in the cache are imported (generated Python) and loaded (compiled C libraries), so the
directory must be private: it is created with mode 0700, and a directory that other users can
write (owned by another user, group- or world-writable without the sticky bit, inside another
user's directory or a world-writable non-sticky one, reached through another user's symlink) is refused with a
:class:`CodegenError`; otherwise a shared ``/tmp`` cache could be used to plant code. An entry
that is not a regular file owned by this user and writable only by it is never imported or
loaded: it is replaced by freshly generated content (see :func:`trusted_file`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import stat
import sys
import tempfile
import warnings
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
    """The kernel cache directory: created private (0700) on first use and checked to be private.

    Raises:
        CodegenError: the directory (or the path to it) can be written by other users.
    """
    env = os.environ.get("ATTNC_CACHE_DIR")
    if env:
        path = Path(env).expanduser()
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        path = base / "attncompiler" / "kernels"
    path = Path(os.path.abspath(path))
    if str(path) not in _VERIFIED or not path.is_dir():
        try:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            raise CodegenError(f"cannot create the kernel cache directory {path}: {e}; "
                               "set ATTNC_CACHE_DIR to a private directory") from None
        check_private_dir(path)
        _VERIFIED.add(str(path))
    return path


_VERIFIED: set[str] = set()  # cache directories checked in this process


def _owner_ok(uid: int) -> bool:
    return uid in (os.geteuid(), 0)


def check_private_dir(path: Path) -> None:
    """Raise unless only this user (and root) can write ``path`` and the path leading to it.

    The directory itself must be owned by this user and not group- or world-writable (unless
    sticky: others may add files but not replace ours, and foreign files are never trusted). On
    the way to it, every parent and symlink must belong to this user or root, and no parent may
    be world-writable without the sticky bit (their owner, or anyone, could swap the directory).

    Raises:
        CodegenError: naming the offending path, its owner and mode, with a hint.
    """
    if not hasattr(os, "geteuid"):  # no POSIX ownership (Windows): nothing to check
        return
    hint = ("set ATTNC_CACHE_DIR to a directory only you can write (e.g. `mkdir -m 700 DIR`), "
            "or fix the permissions with `chmod 700`")
    for p in (path, *path.parents):
        st = os.lstat(p)
        if stat.S_ISLNK(st.st_mode) and not _owner_ok(st.st_uid):
            raise CodegenError(f"kernel cache path {path} goes through symlink {p} owned by uid {st.st_uid}, "
                               f"another user, who could redirect it; {hint}")
    real = path.resolve()
    st = os.stat(real)
    if not stat.S_ISDIR(st.st_mode):
        raise CodegenError(f"kernel cache path {real} is not a directory; {hint}")
    if st.st_uid != os.geteuid():
        raise CodegenError(f"kernel cache directory {real} is owned by uid {st.st_uid}, not by this user "
                           f"(uid {os.geteuid()}); its files would be imported as code; {hint}")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
        raise CodegenError(f"kernel cache directory {real} has mode {stat.S_IMODE(st.st_mode):o}: other users can "
                           f"write it and plant code; {hint}")
    for p in real.parents:
        pst = os.stat(p)
        if not _owner_ok(pst.st_uid):
            raise CodegenError(f"kernel cache directory {real} lies in {p}, owned by uid {pst.st_uid}, another "
                               f"user, who could replace it; {hint}")
        if pst.st_mode & stat.S_IWOTH and not pst.st_mode & stat.S_ISVTX:
            raise CodegenError(f"kernel cache directory {real} lies in {p}, which is world-writable without the "
                               f"sticky bit (mode {stat.S_IMODE(pst.st_mode):o}): anyone could replace it; {hint}")


def trusted_file(path: Path) -> bool:
    """Whether an existing cache entry may be imported or loaded: a regular file (not a symlink)
    owned by this user that no one else can write. False also when it does not exist."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    if not stat.S_ISREG(st.st_mode):
        return False
    if not hasattr(os, "geteuid"):
        return True
    return st.st_uid == os.geteuid() and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def _untrusted_warning(path: Path) -> None:
    warnings.warn(f"kernel cache entry {path} is not a private file of this user (foreign owner, "
                  "writable by others, or not a regular file); it is not used and is replaced", RuntimeWarning,
                  stacklevel=3)


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
    existing = _read_trusted(path)
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
    if _read_trusted(path) == source:
        return path
    atomic_write(path, source)
    STATS.writes += 1
    return path


def _read_trusted(path: Path) -> str | None:
    """The text of an existing trusted entry; None when it is missing, unreadable or untrusted."""
    if not path.exists() and not path.is_symlink():
        return None
    if not trusted_file(path):
        _untrusted_warning(path)
        return None
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


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
