"""One pattern grammar on every ``attnc`` command: a catalogue name with ``--param value``
options or a DSL expression (read by an ast interpreter, never ``eval``); bad expressions are
refused with a caret under the offending column."""

from __future__ import annotations

import json
import os
import re
import stat

import pytest

import attncompiler as ac
from attncompiler.cli.common import caret, parse_expression
from attncompiler.cli.main import main
from attncompiler.errors import InputError, PatternError


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


CATALOGUE_FORM = ("sliding_window", "--window", 16)
EXPRESSION_FORM = ("sliding_window(16)",)
OLD_FORM = ("sliding_window(window=16)",)
WANT = ac.sliding_window(16)


# ---------------------------------------------------------------------------------------------
# Both grammars on every command
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("form", [CATALOGUE_FORM, EXPRESSION_FORM, OLD_FORM, ("ac.sliding_window(16)",)])
def test_show_takes_every_spelling(capsys, form):
    code, out, _ = run(capsys, "show", *form, "--seq-len", 128, "--width", 16)
    assert code == 0
    assert f": {WANT!r}" in out
    pairs = int(re.search(r"\((\d+) of", out).group(1))
    assert pairs == int(WANT.to_dense(128).sum())


def test_show_expression_with_operators(capsys):
    text = "sliding_window(8) | global_tokens([0, 1]) & causal()"
    code, out, _ = run(capsys, "show", text, "--seq-len", 64, "--width", 16)
    want = ac.sliding_window(8) | ac.global_tokens([0, 1]) & ac.causal()
    assert code == 0 and repr(want) in out
    assert int(re.search(r"\((\d+) of", out).group(1)) == int(want.to_dense(64).sum())


@pytest.mark.parametrize("form", [CATALOGUE_FORM, EXPRESSION_FORM])
def test_verify_takes_both(capsys, form):
    code, out, _ = run(capsys, "verify", *form, "--seq-len", 100, "--head-dim", 8)
    assert code == 0 and out.strip().endswith("OK") and repr(WANT) in out


@pytest.mark.parametrize("form", [CATALOGUE_FORM, EXPRESSION_FORM])
def test_bench_takes_both(capsys, form):
    code, out, _ = run(capsys, "bench", *form, "--seq-len", 64, "--heads", 1, "--head-dim", 8, "--no-flex",
                       "--no-sdpa", "--no-memory", "--repeats", 1, "--json", "--quiet")
    assert code == 0 and json.loads(out)["pattern"] == repr(WANT)


@pytest.mark.parametrize("form", [CATALOGUE_FORM, EXPRESSION_FORM])
def test_bench_layout_takes_both(capsys, form):
    code, out, _ = run(capsys, "bench-layout", *form, "--seq-len", 256, "--no-flex", "--repeats", 1,
                       "--json", "--quiet")
    assert code == 0 and json.loads(out)["pattern"] == repr(WANT)


def test_compile_takes_both_and_emits_readable_files(capsys, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert run(capsys, "compile", *CATALOGUE_FORM, "--seq-len", 256, "--emit", a)[0] == 0
    assert run(capsys, "compile", *EXPRESSION_FORM, "--seq-len", 256, "--emit", b)[0] == 0
    [fa], [fb] = list(a.iterdir()), list(b.iterdir())
    assert fa.name == "sliding_window_bfloat16.py" and fb.name == "sliding_window_16_bfloat16.py"
    assert fa.read_text() == fb.read_text()
    for f in (fa, fb):  # copies for the user: readable by others (the cache stays private)
        assert stat.S_IMODE(f.stat().st_mode) == 0o644


@pytest.mark.parametrize("form", [CATALOGUE_FORM, EXPRESSION_FORM])
def test_explain_takes_both(capsys, form):
    code, out, _ = run(capsys, "explain", *form, "--seq-len", 256)
    assert code == 0 and f": {WANT!r}" in out


def _analysis(out: str) -> dict:
    d = json.loads(out)
    d.pop("seconds")
    return d


def test_analyze_takes_every_spelling_and_options_anywhere(capsys):
    results = []
    for argv in (("analyze", *CATALOGUE_FORM, "-L", 256), ("analyze", "-L", 256, *CATALOGUE_FORM),
                 ("analyze", *EXPRESSION_FORM, "-L", 256), ("analyze", "-L", 256, *OLD_FORM)):
        code, out, _ = run(capsys, *argv, "--json")
        assert code == 0, argv
        results.append(_analysis(out))
    assert all(r == results[0] for r in results)
    assert results[0]["pattern"] == repr(WANT) and results[0]["level"] == "token"


def test_analyze_old_keyword_form_of_catalogue_parameters(capsys):
    code, out, _ = run(capsys, "analyze", "sliding_window(window=8, causal=True)", "-L", 64, "--json")
    assert code == 0 and json.loads(out)["pattern"] == repr(ac.sliding_window(8).causal())


def test_compare_mixes_names_and_expressions(capsys):
    code, out, _ = run(capsys, "compare", "causal", "sliding_window(16) | global_tokens([0])", "-L", 128, "--json")
    assert code == 0
    reps = json.loads(out)
    assert [r["pattern"] for r in reps] == [repr(ac.causal()), repr(ac.sliding_window(16) | ac.global_tokens([0]))]


def test_plan_takes_both(capsys):
    outs = []
    for form in (CATALOGUE_FORM, EXPRESSION_FORM, OLD_FORM):
        code, out, _ = run(capsys, "plan", *form, "-L", 1024, "-P", 2, "--json")
        assert code == 0
        outs.append(json.loads(out))
    assert outs[0] == outs[1] == outs[2] and outs[0]["pattern"] == repr(WANT)


def test_help_of_a_command_names_both_grammars(capsys):
    with pytest.raises(SystemExit) as e:
        main(["analyze", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "catalogue name" in out and "DSL" in out
    with pytest.raises(SystemExit):
        main(["show", "bigbird", "--help"])
    assert "--window-blocks" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# Bad expressions
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cmd", ["show", "verify", "bench", "bench-layout", "explain", "analyze", "plan"])
def test_unknown_name_points_at_it_on_every_command(capsys, cmd):
    extra = {"analyze": ["-L", 64], "plan": ["-L", 64, "-P", 2]}.get(cmd, [])
    code, _, err = run(capsys, cmd, "sliding_window(8) | foo(1)", *extra)
    assert code == 2 and "'foo' is not a pattern constructor" in err
    text, marker = err.splitlines()[-2:]
    assert marker.index("^") == text.index("foo")


@pytest.mark.parametrize("text, message", [
    ("sliding_window(wndow=3)", "unexpected keyword argument 'wndow'"),
    ("sliding_window(-1)", "window=-1 must be >= 0"),
    ("sliding_window('a')", "sliding_window"),
    ("sliding_window(8) |", "cannot parse pattern text"),
    ("bigbrid", "unknown pattern 'bigbrid'; did you mean bigbird"),
])
def test_bad_arguments_are_refused_with_the_reason(capsys, text, message):
    code, _, err = run(capsys, "show", text)
    assert code == 2 and message in err


@pytest.mark.parametrize("text", [
    "__import__('os').system('touch INJECTED')",
    "().__class__.__base__.__subclasses__()",
    "sliding_window(8) | open('INJECTED', 'w')",
    "[c for c in ().__class__.__mro__]",
    "eval('1')",
    "ac.__dict__",
])
def test_injected_code_is_refused_and_never_runs(capsys, tmp_path, monkeypatch, text):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, "show", text)
    assert code == 2 and "InputError" in err and out == ""
    assert not (tmp_path / "INJECTED").exists()
    with pytest.raises(InputError):
        parse_expression(text)


def test_caret_counts_leading_spaces_and_ignores_messages_without_a_column():
    assert caret("  foo(1)", "cannot parse: x at line 1, column 1") == "\n      foo(1)\n      ^"
    assert caret("foo", "no position here") == ""


def test_bare_dsl_name_is_called_and_unknown_names_suggest():
    assert parse_expression("full") == ac.full()
    with pytest.raises(PatternError, match="did you mean"):
        parse_expression("logsparce")
