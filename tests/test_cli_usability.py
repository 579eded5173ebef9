"""What a new user meets first: verify at sparse lengths, explain for this machine's backend,
readable lists, quiet benchmarks, clean failures without a GPU, pictures, fast start."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import attncompiler as ac
from attncompiler import patterns
from attncompiler.cli.main import main
from attncompiler.cli.patterns import VERIFY_ODD_LENGTH, density, first_sentence, verify_lengths

ROOT = Path(__file__).resolve().parent.parent
HAS_MPL = importlib.util.find_spec("matplotlib") is not None


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def python(*args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)


def attnc(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """The ``attnc`` entry point in a fresh interpreter."""
    return python("-c", "import sys; from attncompiler.cli.main import main; sys.exit(main(sys.argv[1:]))", *args,
                  timeout=timeout)


# ---------------------------------------------------------------------------------------------
# verify
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pattern, length", [
    (patterns.sliding_window(), 1024),       # window 256: dense at 256 and 512
    (patterns.bigbird(), 1024),
    (ac.sliding_window(16), 512),
    (ac.full(), 4096),                       # never sparse: the largest length, said so
])
def test_verify_picks_the_smallest_sparse_length(pattern, length):
    lengths, why = verify_lengths(pattern, heads=2)
    assert lengths == [length, VERIFY_ODD_LENGTH]
    d = density(pattern, length, heads=2)
    assert f"density {d:.4f}" in why
    want = float(pattern.to_dense(length).float().mean())
    assert abs(d - want) < 1e-12
    assert (d <= 0.5) == ("dense here" not in why)


def test_verify_by_default_checks_two_lengths_and_batch_and_heads(capsys):
    p = "per_head([sliding_window(16), causal()])"
    code, out, _ = run(capsys, "verify", p, "--head-dim", 8)
    assert code == 0 and out.strip().endswith("OK")
    assert "lengths 512, 333 (density" in out and "batch 2 x heads 2" in out and "period 2" in out
    errs = re.findall(r"L=(\d+): max \|out - reference\| = (\S+)", out)
    assert [int(L) for L, _ in errs] == [512, 333]
    assert all(0 < float(e) < 1e-4 for _, e in errs)  # a real, small float32 error


def test_verify_non_mask_family_has_no_density(capsys):
    lengths, why = verify_lengths(patterns.diffuser(), heads=2)
    assert lengths == [512, VERIFY_ODD_LENGTH] and "not a mask pattern" in why


# ---------------------------------------------------------------------------------------------
# explain, list, bench
# ---------------------------------------------------------------------------------------------

def _steps(out: str) -> list[int]:
    return [int(m) for m in re.findall(r"^(\d+)\. ", out, flags=re.M)]


@pytest.mark.parametrize("name", ["diffuser", "bigbird", "abc_mlp", "combiner_fixed"])
@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_explain_numbers_its_steps_consecutively(capsys, name, backend):
    code, out, _ = run(capsys, "explain", name, "--seq-len", 256, "--backend", backend)
    assert code == 0
    steps = _steps(out)
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 3


@pytest.mark.skipif(torch.cuda.is_available(), reason="auto means triton on a CUDA machine")
def test_explain_auto_describes_the_torch_path_on_cpu(capsys):
    code, out, _ = run(capsys, "explain", "bigbird", "--seq-len", 512)
    assert code == 0 and "on torch" in out and "_attn_fwd" not in out and "--backend triton" in out
    code, out, _ = run(capsys, "explain", "bigbird", "--seq-len", 512, "--backend", "triton")
    assert code == 0 and "on triton" in out and "_attn_fwd" in out


def test_list_shows_whole_first_sentences(capsys):
    code, out, _ = run(capsys, "list")
    assert code == 0
    lines = dict(line.split(None, 1) for line in out.splitlines())
    for name in patterns.CATALOGUE:
        assert lines[name].rstrip().endswith("."), lines[name]
    assert "Vaswani et al. 2017, sec. 3.2.3." in lines["causal"]


def test_first_sentence_rules():
    assert first_sentence("A b (c. D) e. F g.") == "A b (c. D) e."
    assert first_sentence("Wide\n    window, as in Smith et al. 2020.\n\nArgs: x") == "Wide window, as in Smith et al. 2020."
    assert first_sentence("No period") == "No period"


def test_bench_quiet_prints_no_profiler_lines():
    proc = attnc("bench", "causal", "--seq-len", "64", "--heads", "1",
                  "--head-dim", "8", "--no-flex", "--repeats", "1", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "USDT" not in proc.stderr and "USDT" not in proc.stdout
    assert "peak MiB" in proc.stdout and proc.stderr.strip() == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_triton_sweep_without_cuda_says_so_and_exits_2():
    proc = python("-m", "attncompiler.bench.triton", "--quick")
    assert proc.returncode == 2 and "needs a CUDA device" in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------
# pictures
# ---------------------------------------------------------------------------------------------

def _is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


@pytest.mark.skipif(not HAS_MPL, reason="matplotlib (the plot extra) is not installed")
def test_show_and_analyze_write_pngs(capsys, tmp_path):
    a, b = tmp_path / "show.png", tmp_path / "analyze.png"
    assert run(capsys, "show", "bigbird", "--seq-len", 1024, "--png", a)[0] == 0
    assert run(capsys, "analyze", "sliding_window(32) | global_tokens([0])", "-L", 512, "--png", b)[0] == 0
    assert _is_png(a) and _is_png(b)


# ---------------------------------------------------------------------------------------------
# fast start
# ---------------------------------------------------------------------------------------------

HEAVY = ("torch", "triton", "sympy", "networkx", "scipy", "matplotlib")


def _loaded_after(code: str) -> list[str]:
    proc = python("-c", f"import json, sys\n{code}\nprint(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_and_help_load_no_heavy_module():
    assert _loaded_after("import attncompiler") == []
    assert _loaded_after("from attncompiler.cli.main import build_parser; build_parser().format_help()") == []
    # the DSL needs torch, but not the analysis (sympy, networkx, scipy) nor the Triton backend
    assert _loaded_after("import attncompiler as ac; ac.sliding_window(8) | ac.causal()") == ["torch"]


def test_help_is_fast():
    t0 = time.perf_counter()
    proc = attnc("--help")
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0 and "analyze" in proc.stdout
    assert elapsed < 10  # generous: about 0.3 s on a quiet 2-core machine, torch alone takes ~3 s


def test_lazy_names_match_the_public_api():
    import attncompiler

    for name in ("sliding_window", "compile", "reference", "analyze", "nn", "Pattern", "CompiledAttention",
                 "memory", "ReusePlan", "__version__", "InputError"):
        assert getattr(attncompiler, name) is not None and name in dir(attncompiler)
    assert ac.analyze.__module__ == "attncompiler.analysis.report"
    with pytest.raises(AttributeError):
        attncompiler.no_such_name


# ---------------------------------------------------------------------------------------------
# examples never touch tracked files
# ---------------------------------------------------------------------------------------------

def _git_status(path: str) -> str | None:
    try:
        proc = subprocess.run(["git", "status", "--porcelain", path], cwd=ROOT, capture_output=True, text=True,
                              timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 else None


def test_reuse_lm_example_writes_to_a_temporary_folder_by_default(tmp_path):
    before = _git_status("examples/")
    stamps = {p: p.stat().st_mtime_ns for p in (ROOT / "examples").glob("reuse_lm_loss.*")}
    proc = python(str(ROOT / "examples" / "reuse_lm.py"), "--steps", "2", "--eval-every", "2", "--seeds", "0",
                  "--seq-len", "16", "--layers", "2", "--d-model", "8", "--heads", "2", cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out_dir = Path(re.search(r"results in (\S+)", proc.stdout).group(1))
    assert out_dir.resolve() != (ROOT / "examples").resolve() and (out_dir / "reuse_lm_loss.csv").exists()
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    if before is not None:
        assert _git_status("examples/") == before
