"""One BLAS thread for small dense linear algebra (the analysis' dense eigen-solves).

OpenBLAS threads a 256 x 256 ``eigvalsh`` over every core; on a machine whose cores are busy
its threads wait for each other and the call takes 0.1-1 s instead of 5 ms (measured on two
loaded cores). :func:`one_blas_thread` sets the loaded OpenBLAS libraries (numpy's and
scipy's wheels each bundle one) to one thread for the duration of a block and restores their
counts after it. Results do not change beyond rounding; where no OpenBLAS is found (another
BLAS, another platform) the block runs unchanged.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import threading

_LOCK = threading.Lock()
# (getter, setter) symbol names: scipy-openblas wheels (64- and 32-bit integers), then plain OpenBLAS
_SYMBOLS = (("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
            ("scipy_openblas_get_num_threads", "scipy_openblas_set_num_threads"),
            ("openblas_get_num_threads", "openblas_set_num_threads"))


@functools.lru_cache(maxsize=1)
def openblas_controls() -> tuple[tuple[object, object], ...]:
    """``(get, set)`` thread-count functions of every OpenBLAS loaded in this process (cached)."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            paths = {line.split()[-1] for line in f if "openblas" in line.lower() and "/" in line}
    except OSError:  # not Linux: leave the BLAS alone
        return ()
    found = []
    for path in sorted(paths):
        if not os.path.isfile(path):
            continue
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for get_name, set_name in _SYMBOLS:
            get, put = getattr(lib, get_name, None), getattr(lib, set_name, None)
            if get is not None and put is not None:
                get.restype, get.argtypes = ctypes.c_int, []
                put.restype, put.argtypes = None, [ctypes.c_int]
                found.append((get, put))
                break
    return tuple(found)


@contextlib.contextmanager
def one_blas_thread():
    """Run the block with every loaded OpenBLAS limited to one thread (restored afterwards)."""
    controls = openblas_controls()
    if not controls:
        yield
        return
    with _LOCK:  # concurrent users would otherwise restore each other's counts
        old = [get() for get, _ in controls]
        for (_, put), n in zip(controls, old):
            if n != 1:
                put(1)
        try:
            yield
        finally:
            for (_, put), n in zip(controls, old):
                if n != 1:
                    put(n)
