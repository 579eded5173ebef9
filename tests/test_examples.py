"""The examples run end to end (small sizes) and report success."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, *args: str) -> str:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_quickstart():
    out = run_example("quickstart.py", "--seq-len", "192", "--heads", "2", "--head-dim", "16")
    assert out.count("(ok)") == 2  # both patterns match the float64 reference
    assert "exact density" in out and "# full" in out


def test_custom_pattern():
    out = run_example("custom_pattern.py", "--seq-len", "300")
    for check in ("same dense mask", "same block layout", "same outputs", "both match the float64 reference"):
        assert f"ok   {check}" in out
    assert "traced into an expression: True" in out


def test_hf_long_context():
    import pytest

    pytest.importorskip("transformers")
    before = subprocess.run(["git", "status", "--porcelain", "--", str(EXAMPLES)], capture_output=True, text=True,
                            cwd=EXAMPLES).stdout
    out = run_example("hf_long_context.py", "--steps", "3", "--seq-len", "64", "--batch", "2", "--layers", "2",
                      "--window", "8")
    assert "hops_to_full" in out and "tokens/s" in out
    assert "compiled attention modules: 1" in out  # one pattern, one module, whatever the step
    after = subprocess.run(["git", "status", "--porcelain", "--", str(EXAMPLES)], capture_output=True, text=True,
                           cwd=EXAMPLES).stdout
    assert after == before  # the example writes nothing in the repository
