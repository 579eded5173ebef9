"""The thread-scaling bench (``python -m attncompiler.bench.threads``): every variant is checked
against the kernels' 1-thread result before timing; ``--no-plan`` leaves out the ATen split."""

import torch

from attncompiler.bench import threads


def test_measure_variants_with_and_without_the_plan_split():
    n = torch.get_num_threads()
    pattern = threads.grid_patterns(256, quick=True)["bigbird"]
    got = threads.measure(pattern, 256, 2, repeats=1, mode="fwdbwd", plan=False)
    assert set(got) == {"kernel@1", "kernel@2"} and all(t > 0 for t in got.values())
    got = threads.measure(pattern, 256, 2, repeats=1, mode="fwd")
    assert set(got) == {"kernel@1", "kernel@2", "plan split@2"}
    assert torch.get_num_threads() == n


def test_cli_rows(capsys):
    assert threads.main(["--seq-len", "256", "--pattern", "sliding_window", "--repeats", "1", "--no-plan"]) == 0
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| sliding_window")]
    assert len(rows) == 1 and rows[0].split("|")[6].strip() == "-"
