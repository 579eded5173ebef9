"""Selecting a CPU kernel build (``avx2`` or ``generic``) for a test, shared by the kernel tests."""

import pytest

from attncompiler.codegen.cpu import build as cpu_build

BUILDS = ("avx2", "generic")


def use_build(mp: pytest.MonkeyPatch, build: str) -> str:
    """Make ``build`` the kernels' build for the test (through ``ATTNC_CPU_KERNELS``); skip where
    this CPU has none (only the avx2 build, on a CPU without AVX2 + FMA)."""
    mp.setenv("ATTNC_CPU_KERNELS", "generic" if build == "generic" else "1")
    if cpu_build.default_variant() != build:
        pytest.skip(f"no {build} build on this CPU")
    return build
