"""Triton code generation: predicate rendering, generated-source snapshots, the kernel cache, CLI.

Set ``ATTNC_UPDATE_SNAPSHOTS=1`` to rewrite the snapshots after an intended template change.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings

import attncompiler as ac
from attncompiler.ir import expr as E
from attncompiler import patterns as P
from attncompiler.program import schedule as S
from attncompiler.cli.main import main
from attncompiler.errors import CodegenError

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from attncompiler.codegen import cache  # noqa: E402
from attncompiler.codegen.triton.render import render_predicate  # noqa: E402
from attncompiler.codegen.triton.kernels import cache_key, kernel_predicate, kernel_source  # noqa: E402

from strategies import bool_exprs  # noqa: E402

SNAPSHOTS = Path(__file__).parent / "snapshots"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(tmp_path / "kernels"))


def _module_for(pattern, expr, dtype=torch.float32, schedule=S.Schedule()):
    src = kernel_source(pattern, expr, schedule, dtype)
    key = cache_key(src)
    return cache.load(key, src.render(key))


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------

def test_floor_division_only_where_needed():
    text = render_predicate(ac.block_local(64).predicate(1, 1))
    assert "q_idx // 64 == kv_idx // 64" in text and "_floordiv" not in text
    text = render_predicate(ac.strided(5).predicate(1, 1))
    assert "_mod_pos(q_idx - kv_idx, 5) == 0" in text
    text = render_predicate(ac.mask(lambda b, h, q, k: (q - k) // h == 1).predicate(1, 1))
    assert "_floordiv(q_idx - kv_idx, h) == 1" in text


def test_buffers_are_runtime_arguments_not_source():
    a = render_predicate(ac.document([10, 20]).predicate(30, 30))
    b = render_predicate(ac.document([7, 23]).predicate(30, 30))
    assert a == b and "_load_buf(bufs, buf_meta, 0, q_idx, -1)" in a


@triton.jit
def _eval_predicate(Out, bufs, buf_meta, b, h, q0, k0, PRED: tl.constexpr, TM: tl.constexpr, TN: tl.constexpr):
    q = q0 + tl.arange(0, TM)[:, None]
    k = k0 + tl.arange(0, TN)[None, :]
    ok = PRED(b, h, q, k, bufs, buf_meta) & (q > -(1 << 20)) & (k > -(1 << 20))  # broadcast to [TM, TN]
    tl.store(Out + tl.arange(0, TM)[:, None] * TN + tl.arange(0, TN)[None, :], ok.to(tl.int8))


def _rendered_matches(expr, b=1, h=2, q0=0, k0=5, bufs=None, meta=None):
    # Index variables are >= 0 in kernels (the renderer relies on it); differences such as
    # q_idx - kv_idx still take both signs here.
    mod, _ = _module_for(ac.full(), expr)
    out = torch.zeros(16, 16, dtype=torch.int8, device=DEVICE)
    if bufs is None:
        bufs, meta = torch.zeros(1, dtype=torch.int64, device=DEVICE), torch.zeros(1, 2, dtype=torch.int64, device=DEVICE)
    _eval_predicate[(1,)](out, bufs, meta, b, h, q0, k0, PRED=mod._predicate, TM=16, TN=16)
    q = torch.arange(q0, q0 + 16)[:, None]
    k = torch.arange(k0, k0 + 16)[None, :]
    ref = E.as_expr(expr).evaluate({"b": torch.tensor(b), "h": torch.tensor(h), "q_idx": q, "kv_idx": k})
    return torch.equal(out.cpu().bool(), torch.broadcast_to(ref.bool(), (16, 16)))


@settings(max_examples=15, deadline=None)
@given(expr=bool_exprs(max_leaves=3))
def test_rendered_predicate_equals_expression(expr):
    # Operands of both signs: Python floor semantics of // and % must survive rendering.
    assert _rendered_matches(expr)


def test_rendered_buffer_loads_read_fill_outside():
    buf = E.Buffer("ids", [5, 6, 7, 8])
    expr = E.Load(buf, E.Q - 3, -1).eq(E.Load(buf, E.KV // 2 - 2, -3) - 1)  # indices -3..12, -2..5
    bufs = torch.tensor([99, 5, 6, 7, 8], device=DEVICE)  # buffer 0 starts at offset 1
    meta = torch.tensor([[1, 4]], device=DEVICE)
    assert _rendered_matches(expr, q0=0, k0=0, bufs=bufs, meta=meta)


# ---------------------------------------------------------------------------------------------
# Snapshots of generated source
# ---------------------------------------------------------------------------------------------

SNAPSHOT_CASES = {
    "sliding_window_fp16": (ac.sliding_window(128), torch.float16, S.Schedule()),
    "bigbird_bf16": (P.bigbird(block=64), torch.bfloat16, S.tile(S.blocks(S.Schedule(), 128, 64), 128, 64)),
    "strided_per_head_fp32": (P.sparse_transformer_strided(stride=64), torch.float32, S.Schedule()),
}


def _normalize(text: str) -> str:
    return re.sub(r"(?m)^# cache key: \w+$", "# cache key: <key>", text)


@pytest.mark.parametrize("name", list(SNAPSHOT_CASES))
def test_generated_source_snapshot(name):
    pattern, dtype, sched = SNAPSHOT_CASES[name]
    src = kernel_source(pattern, kernel_predicate(pattern, 4096, 4096), sched, dtype)
    text = _normalize(src.render(cache_key(src)))
    path = SNAPSHOTS / f"triton_{name}.txt"
    if os.environ.get("ATTNC_UPDATE_SNAPSHOTS"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"missing snapshot {path.name}; run with ATTNC_UPDATE_SNAPSHOTS=1"
    assert text == path.read_text()
    compile(text, path.name, "exec")  # the generated file is valid Python


@pytest.mark.parametrize("name", ["common.py", "forward.py", "backward.py"])
def test_templates_are_valid_python(name):
    from attncompiler.codegen.triton.render import TEMPLATE_DIR

    text = (TEMPLATE_DIR / name).read_text()
    compile(text, name, "exec")
    assert "# --- template body ---" in text


def test_source_does_not_depend_on_length():
    for pattern in (ac.sliding_window(16), ac.document([40, 24]), P.bigbird(block=16, random_blocks=2),
                    ac.global_tokens(range(0, 40, 2))):
        texts = {kernel_source(pattern, kernel_predicate(pattern, n, n), S.Schedule(), torch.float16).render("k")
                 for n in (64, 100, 1000)}
        assert len(texts) == 1, pattern


_AOT_SCRIPT = """
import torch
from attncompiler import patterns as P
from attncompiler.codegen.triton.aot import compile_for_target
from attncompiler.program.schedule import Schedule
ks = compile_for_target(P.bigbird(block=64, random_blocks=2), torch.bfloat16, head_dim=48,
                        schedule=Schedule(block_m=128, block_n=64, kernel_block_m=64, kernel_block_n=32),
                        only=("_attn_fwd", "_attn_bwd_dkdv"))
print(sorted({k.variant for k in ks}), sorted({k.name for k in ks}))
"""


@pytest.mark.slow
def test_kernels_compile_for_sm90_without_a_gpu(tmp_path):
    # The interpreter forgives what compiled Triton rejects (e.g. non-constexpr globals), so the
    # generated bf16 kernels go through the real compiler and ptxas for an H100 target.
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["ATTNC_CACHE_DIR"] = str(tmp_path)
    res = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "['', 'EVEN_N=False', 'EVEN_N=True'] ['_attn_bwd_dkdv', '_attn_fwd']" in res.stdout


# ---------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------

def _run(pattern, L, D=16):
    q, k, v = (torch.randn(1, 1, L, D, device=DEVICE) for _ in range(3))
    out = ac.compile(pattern, backend="triton")(q, k, v)
    torch.testing.assert_close(out.double(), ac.reference(pattern, q, k, v), atol=2e-5, rtol=1e-5)


def _entries():
    return sorted(cache.cache_dir().glob("attnc_*.py"))


def test_cache_reuse_in_memory_and_on_disk():
    cache.clear_memory()
    before = dict(vars(cache.STATS))
    _run(ac.sliding_window(7), 40)
    _run(ac.sliding_window(7), 40)
    cache.clear_memory()
    _run(ac.sliding_window(7), 40)
    st = vars(cache.STATS)
    assert st["writes"] - before["writes"] == 1
    assert st["memory_hits"] - before["memory_hits"] >= 1
    assert st["disk_hits"] - before["disk_hits"] == 1
    assert len(_entries()) == 1


def test_new_length_does_not_regenerate():
    cache.clear_memory()
    writes = cache.STATS.writes
    for L in (48, 80, 33):
        _run(ac.document([20, 13]) | ac.sliding_window(3), L)
    assert cache.STATS.writes - writes == 1 and len(_entries()) == 1


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_entry_is_rebuilt(damage):
    cache.clear_memory()
    _run(ac.causal(), 40)
    (path,) = _entries()
    good = path.read_text()
    path.write_text({"garbage": "def broken(:\n", "truncated": good[: len(good) // 2], "empty": ""}[damage])
    cache.clear_memory()
    rebuilt = cache.STATS.rebuilt
    _run(ac.causal(), 40)
    assert cache.STATS.rebuilt == rebuilt + 1 and path.read_text() == good


def test_unimportable_source_names_the_file():
    with pytest.raises(CodegenError, match=r"attnc_deadbeef\.py"):
        cache.load("deadbeef", "this is not python(\n")


def test_cache_key_covers_what_the_kernel_depends_on():
    def key(pattern=ac.causal(), sched=S.Schedule(), dtype=torch.float16):
        return cache_key(kernel_source(pattern, kernel_predicate(pattern, 64, 64), sched, dtype))

    base = key()
    assert key(dtype=torch.bfloat16) != base
    assert key(sched=S.warps(S.Schedule(), 8)) != base
    assert key(sched=S.tile(S.Schedule(), 64, 32)) != base
    assert key(pattern=ac.sliding_window(3)) != base
    assert key(sched=S.chunk(S.Schedule(), tile_elems=1 << 10)) == base  # torch-only knob


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

def test_cli_compile_emits_source(tmp_path, capsys):
    assert main(["compile", "longformer", "--window", "64", "--global-indices", "0,3",
                 "--dtype", "float16", "--emit", str(tmp_path)]) == 0
    text = (tmp_path / "longformer_float16.py").read_text()
    assert "# pattern:   ac.sliding_window(64) | ac.global_tokens([0, 3])" in text
    assert "def _attn_fwd(" in text and "def _attn_bwd_dkdv(" in text and "def _attn_bwd_dq(" in text
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize("name, kernels", [("diffuser", ("_diff_probs", "_diff_hop")),
                                           ("abc_mlp", ("_mem_scan", "_mem_read_full"))])
def test_cli_compile_emits_family_kernels(tmp_path, capsys, name, kernels):
    """Structural families whose stages run their own kernel files emit those files too."""
    assert main(["compile", name, "--seq-len", "512", "--emit", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    files = list(tmp_path.glob(f"{name}_*.py"))
    assert files and "wrote" in out
    text = "\n".join(f.read_text() for f in files)
    for kernel in kernels:
        assert f"def {kernel}(" in text, kernel
    compile(text, "emitted", "exec")


def test_cli_explain_shows_every_layer(capsys):
    assert main(["explain", "bigbird", "--block", "32", "--seq-len", "512", "--tile", "32", "16",
                 "--backend", "triton"]) == 0
    out = capsys.readouterr().out
    for needle in ("1. pattern", "2. layout", "block 32x32", "full", "partial", "3. program",
                   "BlockSparseAttention", "4. schedule", "tile=(32, 16)", "5. kernels", "_predicate"):
        assert needle in out, needle
    path = re.search(r"5\. kernels\s+(\S+\.py)", out).group(1)
    assert Path(path).exists() and Path(path).parent == cache.cache_dir()


def test_cli_explain_per_head_pattern(capsys):
    assert main(["explain", "strided", "--stride", "32", "--seq-len", "256", "--heads", "2", "--backend", "triton"]) == 0
    out = capsys.readouterr().out
    assert "2 group(s) over 2 head(s)" in out and "h % 2 == 0" in out


def test_cli_explain_names_the_cpu_kernels_of_diffusion(capsys, monkeypatch):
    from attncompiler.codegen.cpu import build as cpu_build

    assert main(["explain", "diffuser", "--seq-len", "256"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"\d\. CPU", out) and "cpu_diffusion.c" in out and "stages [0, 1, 2, 3, 4, 5]" in out
    monkeypatch.setattr(cpu_build, "_LIBS", {})
    monkeypatch.setenv("ATTNC_CPU_KERNELS", "0")
    assert main(["explain", "diffuser", "--seq-len", "256"]) == 0
    assert "not used here: disabled" in capsys.readouterr().out
    assert main(["explain", "bigbird", "--seq-len", "256"]) == 0
    assert "CPU kernels" not in capsys.readouterr().out


def test_cli_bad_pattern_options(capsys):
    assert main(["explain", "bigbird", "--nonsense", "1"]) == 2
    assert "--nonsense" in capsys.readouterr().err
    assert main(["compile", "nope", "--emit", "x"]) == 2
    assert "unknown pattern 'nope'" in capsys.readouterr().err
