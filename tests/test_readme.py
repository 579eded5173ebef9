"""README's commands and code run as written.

The fenced ``attnc ...`` lines of README.md are run in-process (the fast ones: long benchmarks
and million-token analyses are left to the benchmark pages), and README's Python code blocks are
executed in a fresh namespace. A README edit that breaks a command breaks this test.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from attncompiler.cli import main as attnc_main

README = Path(__file__).resolve().parent.parent / "README.md"
SLOW_COMMANDS = ("bench", "bench-layout", "similarity")  # timed runs or a checkpoint file
MAX_TOKENS = 16384  # longer lengths are benchmark figures; `plan` only plans, so it may go further


def fenced_blocks(language: str) -> list[str]:
    """The bodies of README's fenced code blocks of ``language``."""
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


def attnc_lines() -> list[str]:
    """Every ``attnc`` command line in README's bash blocks."""
    lines = []
    for block in fenced_blocks("bash"):
        for line in block.splitlines():
            line = line.split(" #", 1)[0].strip()
            if line.startswith("attnc "):
                lines.append(line)
    return lines


def is_fast(argv: list[str]) -> bool:
    if argv[0] in SLOW_COMMANDS or "--png" in argv:
        return False
    lengths = [int(argv[i + 1]) for i, a in enumerate(argv[:-1]) if a in ("--seq-len", "-L")]
    return argv[0] == "plan" or all(n <= MAX_TOKENS for n in lengths)


def test_readme_has_commands():
    lines = attnc_lines()
    assert len([ln for ln in lines if is_fast(shlex.split(ln)[1:])]) >= 6, lines


@pytest.mark.parametrize("line", [ln for ln in attnc_lines() if is_fast(shlex.split(ln)[1:])])
def test_readme_command_runs(line):
    argv = shlex.split(line)[1:]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = attnc_main(argv)
    assert code == 0, f"{line!r} exited {code}:\n{out.getvalue()}\n{err.getvalue()}"
    assert out.getvalue().strip(), f"{line!r} printed nothing"


def python_programs() -> list[str]:
    """README's Python blocks that are programs (a block starting ``# signature`` is an excerpt)."""
    return [b for b in fenced_blocks("python") if not b.startswith("# signature")]


def test_readme_has_programs():
    assert len(python_programs()) >= 2


@pytest.mark.parametrize("index", range(len(python_programs())))
def test_readme_python_runs(index):
    code = python_programs()[index]
    with contextlib.redirect_stdout(io.StringIO()):
        exec(compile(code, f"README.md python block {index}", "exec"), {"__name__": "readme"})
