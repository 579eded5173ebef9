"""The Triton kernels of the default schedule compile ahead of time for sm_90 and sm_80 without a
GPU (Triton's compiler and its shipped ptxas), and none of them spills registers, except one known
defect: on sm_80 the dk/dv kernel (255 registers, no wgmma) spills 432/464 bytes per thread at
the default 64 x 64 tiles (still 16/8 at 32 x 32 tiles, 260/276 with 8 warps); a strict xfail
keeps that visible until the kernel is fixed.

Runs in a fresh process: ahead-of-time compilation needs ``TRITON_INTERPRET`` unset.
"""

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

_SCRIPT = """
import torch
from attncompiler.codegen.triton.aot import format_report, resource_report
rows = resource_report(archs=(90, 80), dtypes=(torch.bfloat16,), head_dims=(64,), opaque=(False,))
print(format_report(rows))
"""


_ROWS: list = []
KNOWN_SPILL = ("sm_80", "_attn_bwd_dkdv")


def _report(tmp_path_factory) -> list[list[str]]:
    """The report's rows (compiled once per session)."""
    if not _ROWS:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["ATTNC_CACHE_DIR"] = str(tmp_path_factory.mktemp("aot"))
        res = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=900)
        assert res.returncode == 0, res.stderr[-3000:]
        _ROWS.extend(line.split("|")[1:-1] for line in res.stdout.splitlines() if line.startswith("| sm_"))
    return _ROWS


@pytest.mark.slow
def test_default_kernels_compile_for_sm90_and_sm80_without_spills(tmp_path_factory):
    rows = _report(tmp_path_factory)
    # (arch, kernel, variant) for the forward (EVEN_N True / False), dk/dv and dq kernels
    assert sorted((r[0].strip(), r[4].strip(), r[5].strip()) for r in rows) == sorted(
        (f"sm_{a}", k, v) for a in (90, 80)
        for k, v in (("_attn_fwd", "EVEN_N=True"), ("_attn_fwd", "EVEN_N=False"), ("_attn_bwd_dkdv", "-"),
                     ("_attn_bwd_dq", "-")))
    for r in rows:
        regs, spills, shared = int(r[7]), r[8].strip(), int(r[9])
        assert 0 < regs <= 255 and shared > 0, r
        if (r[0].strip(), r[4].strip()) != KNOWN_SPILL:
            assert spills == "0/0", f"kernel spills registers: {r}"


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="known: the sm_80 dk/dv kernel spills at the default tiles")
def test_sm80_dkdv_kernel_does_not_spill(tmp_path_factory):
    rows = [r for r in _report(tmp_path_factory) if (r[0].strip(), r[4].strip()) == KNOWN_SPILL]
    assert len(rows) == 1 and rows[0][8].strip() == "0/0", rows
