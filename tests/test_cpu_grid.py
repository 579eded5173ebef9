"""The CPU benchmark grid (``attnc bench --grid``): quick mode runs every pattern, both modes and
two thread counts, checks every contender against the float64 oracle before timing, and reports
a contender that disagrees instead of timing it. FlexAttention is left out here (its
``torch.compile`` takes minutes on CPU); its setup is the one ``attnc bench`` uses."""

import pytest
import torch

from attncompiler.bench import grid
from attncompiler.cli.main import main
from attncompiler.errors import InputError


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_quick_grid_structure_and_oracle():
    res = grid.run_grid(quick=True, threads=(1, 2), contenders=("attnc", "attnc_block", "sdpa"), repeats=1)
    names = list(grid.grid_patterns(grid.QUICK_LENGTHS[0], quick=True))
    assert len(names) == 7 and "full" in names and "causal" in names
    assert len(res.rows) == 7 * 2 * 2
    assert {(r.pattern, r.backward, r.threads) for r in res.rows} == \
        {(n, b, t) for n in names for b in (False, True) for t in (1, 2)}
    for r in res.rows:
        dense = r.pattern in ("causal", "full")
        want = {"attnc", "sdpa"} | ({"attnc_block"} if dense else set())
        assert set(r.medians_ms) == want and set(r.checks) == want, r
        assert all(isinstance(e, float) and e <= 1e-3 for e in r.checks.values()), r.checks
        assert all(t > 0 for t in r.medians_ms.values())
        assert r.peak_gflops > 0 and 0 < r.peak_fraction() < 5
    table = str(res).splitlines()
    header = table[1].split("|")
    assert all(len(line.split("|")) == len(header) for line in table[3:3 + len(res.rows)])
    assert "FAILED" not in str(res)


def test_contender_disagreeing_with_oracle_is_reported_not_timed(monkeypatch):
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **kw: sdpa(*a, **kw) * 1.001)
    res = grid.run_grid(quick=True, threads=(1,), modes=(False,), patterns=("full", "bigbird"),
                        contenders=("attnc", "sdpa"), repeats=1)
    assert len(res.rows) == 2
    for r in res.rows:
        assert isinstance(r.checks["attnc"], float) and "sdpa" not in r.medians_ms
        assert not isinstance(r.checks["sdpa"], float)
    assert "FAILED: sdpa" in str(res)


def test_cli_grid_and_threads(capsys, tmp_path):
    out = tmp_path / "grid.md"
    code = main(["bench", "--grid", "--quick", "--threads", "1", "--mode", "fwd", "--patterns", "full",
                 "--no-flex", "--repeats", "1", "--quiet", "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 0 and "| full | 384 | fwd | 1 | quiet |" in text and out.read_text().strip() == text.strip()
    with pytest.raises(InputError):
        grid.main(["--quick", "--threads", "0"])
    code = main(["bench", "causal", "--seq-len", "64", "--threads", "1", "--no-flex", "--no-memory",
                 "--repeats", "1", "--quiet"])
    assert code == 0 and torch.get_num_threads() == 1


def test_flex_mask_mod_of_full_is_a_tensor_mask():
    """FlexAttention vmaps the mask_mod: full()'s constant predicate must come back as a tensor."""
    import attncompiler as ac
    from attncompiler.bench.peers import flex_mask_mod

    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    q, k = torch.arange(7)[:, None], torch.arange(5)[None, :]
    for pattern, want in ((ac.full(), True), (~ac.full(), False)):
        mod, _ = flex_mask_mod(pattern, 256, 256)
        got = mod(torch.tensor(0), torch.tensor(0), q, k)
        assert isinstance(got, torch.Tensor) and got.shape == (7, 5) and bool((got == want).all())
    mod, _ = flex_mask_mod(ac.full(), 256, 256)
    bm = flex.create_block_mask(mod, None, None, 256, 256, device="cpu", BLOCK_SIZE=128)  # vmaps: no error
    assert bm.sparsity() == 0.0


def test_several_thread_counts_run_in_one_child_process_each(capsys, tmp_path):
    """Each thread count is timed in a process started at that count (its rows carry it); the
    JSON rows and the table agree."""
    import json

    path = tmp_path / "rows.json"
    code = grid.main(["--quick", "--threads", "2,1", "--mode", "fwd", "--patterns", "causal",
                      "--contenders", "attnc,sdpa", "--repeats", "1", "--quiet", "--json-out", str(path)])
    text = capsys.readouterr().out
    rows = json.loads(path.read_text())["rows"]
    assert code == 0 and [(r["pattern"], r["threads"]) for r in rows] == [("causal", 2), ("causal", 1)]
    assert all(set(r["medians_ms"]) == {"attnc", "sdpa"} for r in rows)
    assert "| causal | 384 | fwd | 2 | quiet |" in text and "| causal | 384 | fwd | 1 | quiet |" in text
