"""The pattern commands of ``attnc`` (list, show, verify, bench, bench-layout) and pictures."""

from __future__ import annotations

import dataclasses
import json
import re
import sys

import numpy as np
import pytest
import torch

import attncompiler as ac
from attncompiler import patterns
from attncompiler.bench.peers import allowed_pairs, flex_mask_mod
from attncompiler.bench.attention import run_bench
from attncompiler.bench.layout import run_layout_bench
from attncompiler.cli.main import main
from attncompiler.codegen.registry import register_stage
from attncompiler.layout.picture import cell_grid, render_text, save_png
from attncompiler.program.stages import BlockSparseAttention, Program, Stage, register_lowering
from attncompiler.program.reference import reference, register_reference


# ---------------------------------------------------------------------------------------------
# A toy non-mask family, to check that verify / bench / show are family-generic
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Doubled(ac.Pattern):
    """Twice the attention of a sliding window (a stand-in for Combiner/Diffuser/ABC)."""

    window: int
    family = "cli_test_doubled"


@dataclasses.dataclass(frozen=True)
class DoubleStage(Stage):
    inputs: tuple[str, ...] = ("out",)
    outputs: tuple[str, ...] = ("out",)


@register_lowering("cli_test_doubled")
def _lower_doubled(pattern, schedule):
    return Program(pattern, (BlockSparseAttention(pattern=ac.sliding_window(pattern.window), schedule=schedule),
                             DoubleStage()))


@register_stage("torch", DoubleStage)
def _run_double(stage, env, ctx):
    return {"out": 2 * env["out"]}


@register_reference("cli_test_doubled")
def _ref_doubled(pattern, q, k, v, scale):
    out, lse = reference(ac.sliding_window(pattern.window), q, k, v, scale, return_lse=True)
    return 2 * out, lse


def doubled(window: int = 8) -> ac.Pattern:
    """Doubled sliding window (test family).

    Args:
        window: keys on each side.
    """
    return Doubled(window)


def odd_names(seq_len: int = 3, lengths: tuple[int, ...] = (2, 3), causal: bool = False) -> ac.Pattern:
    """A pattern whose parameter names collide with command options (test only)."""
    p = ac.document(lengths) | ac.sliding_window(seq_len)
    return p.causal() if causal else p


@pytest.fixture
def catalogue(monkeypatch):
    cat = dict(patterns.CATALOGUE, doubled=doubled, odd_names=odd_names)
    monkeypatch.setattr(patterns, "CATALOGUE", cat)
    return cat


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------------------------------------
# list / show
# ---------------------------------------------------------------------------------------------

def test_list_names_every_pattern_with_its_description(capsys):
    code, out, _ = run(capsys, "list")
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == len(patterns.CATALOGUE)
    for name, line in zip(patterns.CATALOGUE, lines):
        assert line.split()[0] == name
        assert patterns.describe(name) in line


def test_list_verbose_shows_options(capsys):
    code, out, _ = run(capsys, "list", "-v")
    assert code == 0 and "--window-blocks" in out and "--global-indices" in out


def _brute_grid(dense: torch.Tensor, cm: int, cn: int) -> np.ndarray:
    Lq, Lk = dense.shape
    rows, cols = -(-Lq // cm), -(-Lk // cn)
    out = np.zeros((rows, cols), dtype=np.uint8)
    for r in range(rows):
        for c in range(cols):
            cell = dense[r * cm:(r + 1) * cm, c * cn:(c + 1) * cn]
            out[r, c] = 2 if bool(cell.all()) else (1 if bool(cell.any()) else 0)
    return out


@pytest.mark.parametrize("pattern, L, width, block", [
    (ac.sliding_window(9), 100, 16, 64),                 # cells smaller than the block: exact layout
    (patterns.bigbird(block=16, seed=3), 512, 8, 16),    # cells merge several blocks
    (ac.dilated_window(3, 4) | ac.global_tokens([5]), 200, 64, 32),
    (patterns.sparse_transformer_fixed(stride=32, summary=4), 300, 10, 16),
])
def test_picture_cells_match_brute_force(pattern, L, width, block):
    grid = cell_grid(pattern, L, width=width, block=block)
    assert grid.kinds.shape[0] <= width and grid.kinds.shape[1] <= width
    np.testing.assert_array_equal(grid.kinds, _brute_grid(pattern.to_dense(L), grid.cell_m, grid.cell_n))
    text = render_text(pattern, L, width=width, block=block, legend=False).splitlines()
    assert [len(line) for line in text] == [grid.kinds.shape[1]] * grid.kinds.shape[0]
    assert "".join(text).count("#") == int((grid.kinds == 2).sum())


def test_picture_of_a_layout_and_of_each_head():
    p = patterns.sparse_transformer_strided(stride=16)  # heads alternate local / strided
    lay = p.layout(128, 128, 8, heads=2)
    for head in (0, 1):
        grid = cell_grid(lay, width=16, head=head)
        dense = p.to_dense(128, h=head)
        np.testing.assert_array_equal(grid.kinds, _brute_grid(dense, 8, 8))
    assert render_text(lay, width=16, head=0) != render_text(lay, width=16, head=1)


def test_picture_errors():
    with pytest.raises(ac.PatternError, match="seq_len"):
        render_text(ac.causal())
    with pytest.raises(ac.UnsupportedError, match="only mask patterns"):
        render_text(Doubled(4), 64)
    with pytest.raises(ac.PatternError, match="charset"):
        render_text(ac.causal(), 64, charset="ab")


def test_save_png_without_matplotlib_says_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    with pytest.raises(ac.UnsupportedError, match="pip install matplotlib"):
        save_png(ac.causal(), str(tmp_path / "p.png"), 64)


def test_show_mask_pattern_prints_picture_and_exact_density(capsys):
    code, out, _ = run(capsys, "show", "sliding_window", "--seq-len", 256, "--window", 16, "--width", 32)
    assert code == 0
    picture = [line for line in out.splitlines() if re.fullmatch(r"[.+#]+", line)]
    assert len(picture) == 32 and all(len(line) == 32 for line in picture)
    dense = ac.sliding_window(16).to_dense(256)
    m = re.search(r"density: ([0-9.]+) \((\d+) of (\d+)", out)
    assert int(m.group(2)) == int(dense.sum()) and int(m.group(3)) == 256 * 256


def test_show_bigbird_block_option_sets_pattern_and_layout_block(capsys):
    code, out, _ = run(capsys, "show", "bigbird", "--seq-len", 512, "--block", 32, "--window-blocks", 5)
    assert code == 0
    assert "ac.block_window(2, block=32)" in out and "layout: block 32, 16 x 16 blocks" in out


def test_show_png_missing_matplotlib_is_an_error(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code, _, err = run(capsys, "show", "causal", "--seq-len", 64, "--png", tmp_path / "x.png")
    assert code == 2 and "UnsupportedError" in err and "matplotlib" in err


def test_show_other_family_prints_its_program(capsys, catalogue):
    code, out, _ = run(capsys, "show", "doubled", "--window", 3)
    assert code == 0
    assert "family: cli_test_doubled" in out and "DoubleStage" in out and "BlockSparseAttention" in out


# ---------------------------------------------------------------------------------------------
# Option parsing from constructor signatures, errors
# ---------------------------------------------------------------------------------------------

def test_sequences_bools_and_colliding_names(capsys, catalogue):
    code, out, _ = run(capsys, "show", "odd_names", "--seq-len", 40, "--pattern-seq-len", 2,
                       "--lengths", "10,20", "--causal", "--width", 40)
    assert code == 0
    expected = (ac.document([10, 20]) | ac.sliding_window(2)).causal()
    assert repr(expected) in out
    m = re.search(r"\((\d+) of", out)
    assert int(m.group(1)) == int(expected.to_dense(40).sum())


@pytest.mark.parametrize("argv, message", [
    (["show", "bigbrid"], "unknown pattern 'bigbrid'; did you mean bigbird"),
    (["show", "bigbird", "--window-blocks", "x"], "'x' is not an integer"),
    (["show", "bigbird", "--window-blocks", "4"], "window_blocks=4 must be a positive odd number"),
    (["show", "bigbird", "--no-such-option", "1"], "unrecognized arguments: --no-such-option"),
    (["verify", "document", "--lengths", "5,a"], "'a' is not an integer"),
    (["bench", "causal", "--seq-len", "0"], "0 must be a positive integer"),
    (["bench", "causal", "--dtype", "int8"], "invalid choice: 'int8'"),
])
def test_bad_command_lines_exit_2_with_a_message(capsys, argv, message):
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert message in err


# ---------------------------------------------------------------------------------------------
# verify
# ---------------------------------------------------------------------------------------------

def _errors(out: str) -> dict[str, float]:
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"max \|(\w+) - reference\| = (\S+)", out)}


def test_verify_forward_and_backward(capsys):
    code, out, _ = run(capsys, "verify", "bigbird", "--seq-len", 200, "--block", 16, "--heads", 2,
                       "--head-dim", 8, "--backward")
    assert code == 0 and out.strip().endswith("OK")
    errs = _errors(out)
    assert set(errs) == {"out", "dq", "dk", "dv"}
    assert 0 < max(errs.values()) < 1e-4  # random inputs: a real, small float32 error


def test_verify_reports_a_mismatch(capsys, monkeypatch):
    real = ac.CompiledAttention.reference
    monkeypatch.setattr(ac.CompiledAttention, "reference", lambda self, q, k, v, *a, **kw: real(self, q, k, v) + 1e-3)
    code, out, _ = run(capsys, "verify", "causal", "--seq-len", 64)
    assert code == 1 and "MISMATCH" in out
    assert abs(_errors(out)["out"] - 1e-3) < 1e-5


def test_verify_other_family(capsys, catalogue):
    code, out, _ = run(capsys, "verify", "doubled", "--window", 5, "--seq-len", 96, "--backward")
    assert code == 0 and "OK" in out and len(_errors(out)) == 4


# ---------------------------------------------------------------------------------------------
# bench
# ---------------------------------------------------------------------------------------------

def test_bench_json_tiny(capsys):
    code, out, err = run(capsys, "bench", "sliding_window", "--window", 8, "--seq-len", 128, "--heads", 2,
                         "--head-dim", 16, "--batch", 2, "--repeats", 2, "--no-flex", "--json")
    assert code == 0 and "round 2/2" in err  # progress on stderr
    res = json.loads(out)
    by = {c["name"]: c for c in res["contenders"]}
    assert set(by) == {"attnc", "sdpa"}
    pairs = int(ac.sliding_window(8).to_dense(128).sum()) * 2 * 2
    assert res["allowed_pairs"] == pairs
    for c in by.values():
        assert len(c["times_s"]) == 2 and c["median_s"] > 0 and c["peak_bytes"] > 0
        assert c["gflops"] == pytest.approx(4 * pairs * 16 / c["median_s"] / 1e9)
    assert by["sdpa"]["max_abs_diff"] < 1e-5
    assert res["speedups"]["attnc"]["sdpa"] == pytest.approx(by["sdpa"]["median_s"] / by["attnc"]["median_s"])


def test_bench_table_skips_sdpa_over_the_mask_cap(capsys):
    # (causal and full use SDPA's own mask-free path, so take a pattern that needs the dense mask)
    code, out, _ = run(capsys, "bench", "sliding_window", "--window", 8, "--seq-len", 64, "--heads", 1,
                       "--head-dim", 8, "--repeats", 2, "--no-flex", "--mask-cap-gb", "1e-9", "--backward",
                       "--no-memory", "--quiet")
    assert code == 0
    assert re.search(r"sdpa\s+skipped: dense mask would take", out)
    assert re.search(r"attnc\s+[0-9.]+", out) and "forward + backward" in out


def test_bench_other_family_runs_ours_and_explains_the_rest(capsys, catalogue):
    code, out, _ = run(capsys, "bench", "doubled", "--seq-len", 64, "--heads", 1, "--head-dim", 8,
                       "--repeats", 2, "--no-flex", "--quiet")
    assert code == 0
    assert "sdpa     skipped: cli_test_doubled patterns have no dense mask" in out
    assert "GFLOP/s not reported" in out


def test_run_bench_python_api_result_is_frozen():
    res = run_bench(ac.block_local(16), 64, heads=1, head_dim=8, repeats=2, contenders=("attnc",),
                    measure_memory=False)
    assert res.contender("attnc").median_s > 0 and res.density == pytest.approx(0.25)
    with pytest.raises(dataclasses.FrozenInstanceError):
        res.repeats = 3
    with pytest.raises(ac.InputError, match="contenders"):
        run_bench(ac.causal(), 64, contenders=("nope",))


@pytest.mark.parametrize("pattern", [
    patterns.bigbird(block=16, seed=1),                     # traced (buffers)
    patterns.sparse_transformer_strided(stride=8),          # per-head traced parts
    ac.mask(lambda b, h, q, k: torch.tensor(q.numpy() >= k.numpy())),  # opaque
])
def test_flex_mask_mod_matches_the_dense_mask(pattern):
    L = 96
    mod, _ = flex_mask_mod(pattern, L, L)
    q, k = torch.arange(L)[:, None], torch.arange(L)[None, :]
    for h in (0, 1):
        got = mod(torch.tensor(0), torch.tensor(h), q, k)
        assert torch.equal(got, pattern.to_dense(L, h=h))
    assert allowed_pairs(pattern, L, L, heads=2) == sum(int(pattern.to_dense(L, h=h).sum()) for h in (0, 1))


def test_flex_mask_mod_gives_flex_the_same_block_mask_as_our_layout():
    from torch.nn.attention.flex_attention import create_block_mask

    p, L = patterns.bigbird(block=32, seed=2), 256
    mod, _ = flex_mask_mod(p, L, L)
    bm = create_block_mask(mod, None, None, L, L, device="cpu", BLOCK_SIZE=32)
    ours = p.layout(L, L, 32).bcsr()
    for key in ("kv_num_blocks", "full_kv_num_blocks"):
        assert torch.equal(getattr(bm, key).cpu().int(), ours[key])
    for row in range(L // 32):
        n = int(ours["full_kv_num_blocks"][0, 0, row])
        assert sorted(bm.full_kv_indices[0, 0, row, :n].tolist()) == sorted(ours["full_kv_indices"][0, 0, row, :n].tolist())


def test_bench_layout_runs_builders_in_subprocesses(capsys):
    code, out, _ = run(capsys, "bench-layout", "bigbird", "--seq-len", 256, "--block", 32, "--repeats", 2,
                       "--no-flex", "--json", "--quiet")
    assert code == 0
    (entry,) = json.loads(out)["entries"]
    assert entry["name"] == "attnc" and entry["seq_len"] == 256
    assert entry["blocks"] == patterns.bigbird(block=32).layout(256, 256, 32).num_blocks
    assert 0 < entry["median_s"] and entry["peak_rss_bytes"] >= 0


def test_bench_layout_skips_create_block_mask_over_the_cap():
    res = run_layout_bench(ac.sliding_window(64), 4096, block=64, builders=("flex",), mem_cap_bytes=10 << 20)
    (entry,) = res.entries
    assert entry.name == "flex" and entry.median_s is None
    assert entry.skipped.startswith("would need about 0.4 GiB")
    assert "skipped: would need" in str(res)
    with pytest.raises(ac.UnsupportedError, match="mask patterns only"):
        run_layout_bench(Doubled(3), 64)
