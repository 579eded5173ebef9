"""The family benchmarks live in ``attncompiler.bench``; ``benchmarks/*_bench.py`` are their thin CLIs.

Each CLI must start and print its options; one runs end to end at a tiny size, and the
diffusion benchmark's memory child (``python -m attncompiler.bench.diffusion --child ...``)
answers with one JSON line, as the parent reads it.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# CLI -> an option only that benchmark has (its --help must list it)
CLIS = {"combiner": "--shared-slots", "diffusion": "--hops", "distributed": "--causal-len",
        "memory": "--mem-seq-len", "reuse": "--mlp-ratio"}


def _run(*args: str, timeout: float = 120) -> str:
    res = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{args} failed ({res.returncode}):\n{res.stderr[-3000:]}"
    return res.stdout


@pytest.mark.parametrize("name", sorted(CLIS))
def test_cli_prints_its_options(name):
    out = _run(f"benchmarks/{name}_bench.py", "--help")
    assert out.startswith("usage:"), out[:200]
    assert CLIS[name] in out


def test_every_family_benchmark_has_a_thin_cli():
    assert sorted(p.name for p in (ROOT / "benchmarks").glob("*_bench.py")) == sorted(f"{n}_bench.py" for n in CLIS)
    for name in CLIS:
        text = (ROOT / "benchmarks" / f"{name}_bench.py").read_text()
        assert f"from attncompiler.bench.{name} import main" in text
        assert len(text.splitlines()) < 10, f"benchmarks/{name}_bench.py should only call main()"


def test_reuse_benchmark_runs_and_counts_the_predicted_drop():
    out = _run("benchmarks/reuse_bench.py", "--seq-len", "256", "--layers", "4", "--heads", "2", "--head-dim", "16",
               "--window", "32", "--block", "16", "--reps", "1", "--threads", "1", "--no-breakdown")
    assert "reuse plan: ReusePlan(4 layers x 2 heads, 4 heads reused" in out, out
    m = re.search(r"drop with stored P: predicted (-?[\d.]+)%, counted (-?[\d.]+)%", out)
    assert m, out
    predicted, counted = map(float, m.groups())
    assert 0 < predicted and abs(predicted - counted) < 1.0, out


def test_diffusion_memory_child_answers_json():
    out = _run("-m", "attncompiler.bench.diffusion", "--child", "ours", "128", "1", "1", "8", "1", "fwd", "32")
    res = json.loads(out.strip().splitlines()[-1])
    assert res["impl"] == "ours" and isinstance(res["peak_mib"], float)


def test_cpu_grid_cli_prints_its_options():
    out = _run("benchmarks/cpu_grid.py", "--help")
    assert out.startswith("usage:") and "--threads" in out and "--load" in out and "--quick" in out


def test_gpu_suite_fails_loudly_without_a_gpu(tmp_path):
    """The GPU suite parses, needs its output argument, and stops with a named failure (non-zero)
    when no CUDA device is present (pip is stubbed: the checkout is already installed here)."""
    import os

    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the suite would run for real")
    script = ROOT / "benchmarks" / "gpu_suite.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert subprocess.run(["bash", str(script)], capture_output=True, cwd=ROOT).returncode != 0
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/bash\nif [ "$1" = "-m" ] && [ "$2" = "pip" ]; then exit 0; fi\nexec {sys.executable} "$@"\n')
    fake.chmod(0o755)
    res = subprocess.run(["bash", str(script), str(tmp_path / "out.md")], capture_output=True, text=True,
                         cwd=ROOT, env={**os.environ, "PYTHON": str(fake)}, timeout=120)
    assert res.returncode == 1 and "FAILED: no usable CUDA device" in res.stderr, res.stderr


def test_varlen_layout_benchmark_runs_and_hits_its_cache(capsys):
    from attncompiler.bench.varlen import main

    assert main(["--seq-len", "4096", "--docs", "8", "--window", "128", "--repeats", "2"]) == 0
    out = capsys.readouterr().out
    assert "new cu_seqlens" in out and "cached" in out


def test_edge_weight_benchmark_checks_and_times_every_variant(capsys):
    from attncompiler.bench.edge_weights import main

    assert main(["--seq-len", "128", "--repeats", "1", "--patterns", "sliding_window"]) == 0
    out = capsys.readouterr().out
    assert out.count("softcap") == 2 and out.count("alibi") == 2  # fwd and fwd+bwd lines


def test_compile_benchmark_cli_prints_its_options(capsys):
    from attncompiler.bench.compile import main

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "--seq-len" in capsys.readouterr().out
