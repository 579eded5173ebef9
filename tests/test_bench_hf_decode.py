"""The transformers generation benchmark runs end to end at a tiny size."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from attncompiler.bench import hf_decode  # noqa: E402


@pytest.mark.parametrize("window", [None, 6])
def test_hf_decode_benchmark_runs_and_reports_a_ratio(window, capsys):
    argv = ["--hidden", "32", "--layers", "2", "--heads", "4", "--kv-heads", "2", "--vocab", "50", "--prompt", "9",
            "--new-tokens", "12", "--repeats", "2"] + ([] if window is None else ["--window", str(window)])
    res = hf_decode.main(argv)
    out = capsys.readouterr().out
    assert "ratio attncompiler/sdpa tokens/s" in out and "identical tokens" in out, out
    assert set(res["tokens_per_s"]) == {"attncompiler", "sdpa"}
    assert all(t > 0 for t in res["tokens_per_s"].values())
    assert res["ratio"] == pytest.approx(res["tokens_per_s"]["attncompiler"] / res["tokens_per_s"]["sdpa"])
    assert res["compiled_modules"] >= 1


def test_hf_decode_benchmark_prints_its_options(capsys):
    with pytest.raises(SystemExit) as e:
        hf_decode.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--new-tokens" in out and "--window" in out
