"""Untrusted inputs: pattern text is parsed, never evaluated; the kernel cache must be private.

A checkpoint stores each layer's pattern as text. The crafted payloads below would run a shell
command under a restricted ``eval`` (the first one is shown to do so); here they must raise
:class:`InputError` and leave the sentinel file uncreated.
"""

from __future__ import annotations

import inspect
import os
import shlex
import stat
import time
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attncompiler as ac
from attncompiler import patterns
from attncompiler.codegen import cache
from attncompiler.codegen.cpu import build as cpu_build
from attncompiler.nn import TransformerStack, load_checkpoint, save_checkpoint
from attncompiler.patterns.text import MAX_CHARS, MAX_DEPTH, MAX_NODES, parse_pattern
from attncompiler.dsl.mask_mod import Mask

from strategies import bool_exprs, expressions


def _walk_payload(cmd: str) -> str:
    """The restricted-eval escape of the issue: object's subclasses -> a class whose module holds
    the real builtins -> os.system."""
    return ("[c for c in ().__class__.__base__.__subclasses__() if c.__name__ == 'catch_warnings'][0]()"
            f"._module.__builtins__['__import__']('os').system({cmd!r})")


def _payloads(cmd: str) -> list[str]:
    return [
        _walk_payload(cmd),
        f"__import__('os').system({cmd!r})",
        f"ac.causal().__class__.__init__.__globals__['os'].system({cmd!r})",
        f"ac.nn.torch.os.system({cmd!r})",
        f"ac.sliding_window(1).causal.__self__.__class__.__mro__[-1].__subclasses__()",
        f"(lambda: __import__('os').system({cmd!r}))()",
        f"ac.mask(lambda b, h, q_idx, kv_idx: __import__('os').system({cmd!r}) == 0)",
        f"ac.mask(lambda b, h, q_idx, kv_idx: (q_idx == kv_idx) | (__import__('os').system({cmd!r}) == 0))",
        f"f\"{{__import__('os').system({cmd!r})}}\"",
        f"ac.__dict__['eval']('__import__(\"os\").system({cmd!r})')",
        f"[__import__('os').system({cmd!r}) for _ in range(1)]",
        f"ac.per_head([ac.causal() for _ in [__import__('os').system({cmd!r})]])",
        f"ac.causal() if __import__('os').system({cmd!r}) else ac.full()",
        f"ac.causal() or __import__('os').system({cmd!r})",
        f"ac.sliding_window((x := __import__('os')).system({cmd!r}))",
        f"ac.sliding_window(*[__import__('os').system({cmd!r})])",
        f"ac.memory(**{{'slots': __import__('os').system({cmd!r})}})",
        f"patterns.describe(__import__('os').system({cmd!r}))",
        f"ac.compile(ac.causal()).__class__",
        f"os.system({cmd!r})",
        f"ac.sliding_window(ac.nn.load_checkpoint({cmd!r}))",
    ]


_HUGE = [
    "ac.sliding_window(10**10**10)",
    "ac.sliding_window(9 ** 9 ** 9)",
    "ac.sliding_window(" + "9" * 5000 + ")",
    "ac.global_tokens([0] * 10**9)",
    "ac.global_tokens(range(10000000000))",
    "ac.document(range(1, 1 << 62))",
    "ac.global_tokens([" + ", ".join(["1"] * (MAX_NODES + 10)) + "])",
    "ac.sliding_window('" + "x" * (MAX_CHARS + 1) + "')",
    "~" * 10_000 + "ac.causal()",
    "~" * (MAX_DEPTH + 5) + "ac.causal()",
    "ac.per_head([" * (MAX_DEPTH + 5) + "ac.causal()" + "])" * (MAX_DEPTH + 5),
    "ac.mask(lambda b, h, q_idx, kv_idx: " + "abs(" * (MAX_DEPTH + 5) + "q_idx" + ")" * (MAX_DEPTH + 5) + " == 0)",
    "ac.mask(lambda b, h, q_idx, kv_idx: 4611686018427387904 * 4611686018427387904 * q_idx == 0)",
    "ac.mask(lambda b, h, q_idx, kv_idx: q_idx ** 99999999 == 0)",
    "ac.mask(lambda b, h, q_idx, kv_idx: q_idx << 99999999 == 0)",
    "(" * 300 + "ac.causal()" + ")" * 300,
]


def test_the_walk_payload_is_a_real_escape_of_a_restricted_eval(tmp_path):
    # What load_checkpoint did before: this documents that the payload is not a toothless string.
    sentinel = tmp_path / "escaped"
    eval(_walk_payload(f"touch {shlex.quote(str(sentinel))}"), {"__builtins__": {"range": range}, "ac": ac})  # noqa: S307
    assert sentinel.exists()


@pytest.mark.parametrize("index", range(len(_payloads("x"))))
def test_code_in_pattern_text_is_refused_without_running(tmp_path, index):
    sentinel = tmp_path / "pwned"
    text = _payloads(f"touch {shlex.quote(str(sentinel))}")[index]
    with pytest.raises(ac.InputError, match=r"cannot parse pattern text.*(line|column)"):
        parse_pattern(text)
    assert not sentinel.exists()


@pytest.mark.parametrize("text", _HUGE, ids=lambda t: t[:40])
def test_huge_or_deep_text_is_refused_quickly(text):
    t0 = time.perf_counter()
    with pytest.raises(ac.InputError):
        parse_pattern(text)
    assert time.perf_counter() - t0 < 5.0  # no evaluation: parsing alone, bounded


def test_errors_name_the_offending_node_and_position():
    with pytest.raises(ac.InputError, match=r"`ac\.causal\(\)\[0\]` at line 2, column 4"):
        parse_pattern("(ac.full() |\n   ac.causal()[0])")
    with pytest.raises(ac.InputError, match=r"dunder attribute '__class__'"):
        parse_pattern("ac.causal().__class__")
    with pytest.raises(ac.InputError, match=r"unknown name 'os'"):
        parse_pattern("ac.sliding_window(os)")
    with pytest.raises(ac.InputError, match=r"window=-3 must be >= 0.*`ac\.sliding_window\(-3\)`"):
        parse_pattern("ac.sliding_window(-3)")
    with pytest.raises(ac.InputError, match="not an attention pattern"):
        parse_pattern("ac.MLPControl()")
    with pytest.raises(ac.InputError, match="must be a str"):
        parse_pattern(b"ac.causal()")  # type: ignore[arg-type]


def _stack(pats) -> TransformerStack:
    return TransformerStack(16, 2, pats, backend="torch")


def _crafted_checkpoint(tmp_path, text: str):
    path = tmp_path / "model.pt"
    save_checkpoint(_stack([ac.causal(), ac.sliding_window(3)]), path)
    ck = torch.load(path, weights_only=True)
    ck["config"]["patterns"][1] = text
    torch.save(ck, path)
    return path


@pytest.mark.parametrize("index", [0, 1, 2, 6, 8])
def test_crafted_checkpoint_is_refused_without_side_effects(tmp_path, index):
    sentinel = tmp_path / "pwned"
    path = _crafted_checkpoint(tmp_path, _payloads(f"touch {shlex.quote(str(sentinel))}")[index])
    with pytest.raises(ac.InputError, match="cannot rebuild the pattern"):
        load_checkpoint(path, backend="torch")
    assert not sentinel.exists()


def test_malformed_checkpoint_configs_are_input_errors(tmp_path):
    path = tmp_path / "model.pt"
    save_checkpoint(_stack([ac.causal()]), path)
    ck = torch.load(path, weights_only=True)
    for bad in ({**ck["config"], "patterns": [1]}, {**ck["config"], "d_model": "x"},
                {**ck["config"], "surprise": 1}, [1, 2]):
        torch.save({**ck, "config": bad}, path)
        with pytest.raises(ac.InputError, match="malformed"):
            load_checkpoint(path, backend="torch")


def test_checkpoint_round_trip_through_the_parser(tmp_path):
    pats = [patterns.sparse_transformer_fixed(stride=4, summary=2), patterns.logsparse(),
            patterns.bigbird(block=8, random_blocks=1) & ac.causal()]
    st_ = _stack(pats)
    path = tmp_path / "stack.pt"
    save_checkpoint(st_, path)
    back = load_checkpoint(path, backend="torch")
    assert back.patterns == st_.patterns
    x = torch.randn(2, 21, 16)
    torch.testing.assert_close(back(x), st_(x))


def _opaque(b, h, q_idx, kv_idx):
    return (q_idx - kv_idx).remainder(3) == 0  # Tensor.remainder is not traced


def test_opaque_masks_cannot_be_saved_or_parsed(tmp_path):
    p = ac.mask(_opaque)
    assert p.predicate(4, 4) is None
    with pytest.raises(ac.InputError, match="stored as text"):
        save_checkpoint(_stack([p]), tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()
    with pytest.raises(ac.InputError, match="stored as text"):
        parse_pattern(repr(ac.mask(lambda b, h, q, k: (q - k).remainder(2) == 0)))  # ac.mask(<lambda>)
    table = torch.tensor([1, 0, 1, 1])
    reads = ac.mask(lambda b, h, q_idx, kv_idx: table[kv_idx % 4] == 1)  # traced, but reads a tensor
    assert reads.predicate(4, 4) is not None
    with pytest.raises(ac.InputError, match="reads a tensor cannot be stored as text"):
        parse_pattern(repr(reads))


# -- round trips ------------------------------------------------------------------------------

def _catalogue_variants():
    for name, fn in sorted(patterns.CATALOGUE.items()):
        yield name, fn()
        params = inspect.signature(fn).parameters
        if "causal" in params and not (name == "abc_window"):
            yield name + "_causal", fn(causal=True)
    yield "bigbird_custom", patterns.bigbird(block=16, window_blocks=1, global_blocks=3, random_blocks=2, seed=7)
    yield "combiner_pool", patterns.combiner_fixed(span=8, pool="mean")
    yield "axial_horizontal", patterns.combiner_axial(cols=8, variant="horizontal", causal=True)
    yield "diffuser_heat_t", patterns.diffuser_heat(window=8, hops=3, t=0.25)


@pytest.mark.parametrize("name,p", list(_catalogue_variants()), ids=lambda x: x if isinstance(x, str) else "")
def test_every_catalogue_pattern_round_trips(name, p):
    assert parse_pattern(repr(p)) == p


def test_every_dsl_constructor_round_trips():
    ps = [ac.full(), ac.causal(), ac.sliding_window(5), ac.dilated_window(2, 3), ac.block_local(4),
          ac.block_window(1, block=8), ac.strided(3), ac.global_tokens(range(20)), ac.global_tokens([3, 1]),
          ac.random_blocks(2, block=4, seed=9), ac.prefix_lm(7), ac.document([3, 4, 5]),
          ac.per_head([ac.causal(), ac.strided(2)]), ~ac.block_local(3) & ac.prefix_lm(2),
          ac.mask(lambda b, h, q, k: ac.where(h == 0, q >= k, ac.minimum(q, k) > ac.maximum(-3, 2 - k))),
          ac.diffuse(ac.sliding_window(2), hops=2, alpha=0.25), ac.diffuse(ac.causal(), kernel="heat", t=0.5),
          ac.combiner_mixture(ac.combiner_fixed(4), ac.combiner_logsparse(causal=True)),
          ac.combiner_axial(4, rows=3), ac.memory(slots=3, control=ac.LinformerControl(max_len=64)),
          ac.memory(slots=2, control=ac.ClusterControl(), causal=True), ac.memory(4)]
    for p in ps:
        assert parse_pattern(repr(p)) == p, repr(p)


def test_other_spellings():
    assert parse_pattern("sliding_window(64)") == ac.sliding_window(64)
    assert parse_pattern("attncompiler.block_local(8).causal()") == ac.block_local(8) & ac.causal()
    assert parse_pattern("patterns.bigbird(block=32)") == patterns.bigbird(block=32)
    assert parse_pattern("ac.patterns.sliding_window(16, causal=True)") == patterns.sliding_window(16, causal=True)
    assert parse_pattern("bigbird(block=32) | causal()") == patterns.bigbird(block=32) | ac.causal()
    assert parse_pattern("  ac.global_tokens((0, 2, 4))\n") == ac.global_tokens([0, 2, 4])
    assert parse_pattern("ac.diffuse(ac.causal(), hops=2, alpha=-0.0)") == ac.diffuse(ac.causal(), hops=2, alpha=0.0)
    assert parse_pattern("ac.union(ac.strided(3), ac.causal())") == ac.strided(3) | ac.causal()
    assert parse_pattern("ac.mask(lambda b, h, q, k: -q < -k)") == ac.mask(lambda b, h, q, k: -q < -k)


def _storable(p: ac.Pattern) -> bool:
    if isinstance(p, Mask):
        return p.expr is not None and not p.expr.buffers()
    return all(_storable(c) for c in p.children())


@settings(max_examples=150, deadline=None)
@given(expressions(48, max_leaves=6))
def test_random_dsl_trees_round_trip(p):
    if _storable(p):
        assert parse_pattern(repr(p)) == p
    else:  # opaque masks (and masks reading tensors) have no text form: a clear error
        with pytest.raises(ac.InputError, match="stored as text"):
            parse_pattern(repr(p))


def _families() -> st.SearchStrategy[ac.Pattern]:
    """Patterns of every family with random parameters (masks come from ``expressions``)."""
    pos, flt = st.integers(1, 64), st.floats(0.0, 1.0, allow_nan=False)
    pool = st.sampled_from(["max", "mean"])
    combiners = st.one_of(
        st.builds(ac.combiner_fixed, pos, causal=st.booleans(), pool=pool),
        st.builds(ac.combiner_logsparse, causal=st.booleans(), pool=pool),
        st.builds(ac.combiner_axial, pos, rows=st.none() | pos, variant=st.sampled_from(["vertical", "horizontal"]),
                  causal=st.booleans(), pool=pool))
    controls = st.sampled_from([ac.MLPControl(), ac.ClusterControl(), ac.LinformerControl(max_len=99)])
    storable = expressions(48, max_leaves=3).filter(_storable)
    return st.one_of(
        st.builds(ac.diffuse, storable, hops=st.integers(0, 6), alpha=flt),
        st.builds(ac.diffuse, storable, hops=st.integers(0, 6), kernel=st.just("heat"),
                  t=st.floats(0.01, 10.0, allow_nan=False)),
        combiners,
        st.lists(combiners, min_size=2, max_size=3).map(lambda ps: ac.combiner_mixture(*ps)),
        st.builds(ac.memory, pos, controls, causal=st.booleans()),
        st.lists(storable, min_size=2, max_size=3).map(ac.per_head),
    )


@settings(max_examples=100, deadline=None)
@given(_families())
def test_random_patterns_of_every_family_round_trip(p):
    assert parse_pattern(repr(p)) == p


@settings(max_examples=150, deadline=None)
@given(bool_exprs(max_leaves=8))
def test_random_traced_masks_round_trip(e):
    p = ac.mask(lambda b, h, q_idx, kv_idx: e)
    back = parse_pattern(repr(p))
    assert back == p and back.expr == e


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 30), min_size=1, max_size=40), st.integers(0, 50))
def test_random_literals_round_trip(lengths, start):
    for p in (ac.document(lengths), ac.global_tokens([start + x for x in lengths]),
              ac.global_tokens(range(start, start + 3 * len(lengths)))):
        assert parse_pattern(repr(p)) == p


# -- the kernel cache directory ---------------------------------------------------------------

def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_cache_dir_is_created_private(tmp_path, monkeypatch):
    target = tmp_path / "a" / "kernels"
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(target))
    assert cache.cache_dir() == target
    assert _mode(target) == 0o700


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o722])
def test_cache_dir_writable_by_others_is_refused(tmp_path, monkeypatch, mode):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, mode)
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(shared))
    with pytest.raises(ac.CodegenError, match=f"mode {mode:o}: other users can write"):
        cache.cache_dir()
    with pytest.raises(ac.CodegenError, match="other users can write"):
        cache.load("k" * 20, "x = 1\n")
    assert not list(shared.iterdir())


def test_cache_dir_inside_a_world_writable_dir_is_refused(tmp_path, monkeypatch):
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(open_dir / "kernels"))
    with pytest.raises(ac.CodegenError, match="world-writable without the sticky bit"):
        cache.cache_dir()
    os.chmod(open_dir, 0o1777)  # sticky, like /tmp: others cannot replace our directory
    assert _mode(cache.cache_dir()) == 0o700


def test_cache_dir_owned_by_another_user_is_refused(tmp_path, monkeypatch):
    mine = tmp_path / "theirs"
    mine.mkdir(mode=0o700)
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(mine))
    real = os.geteuid()
    monkeypatch.setattr(os, "geteuid", lambda: real + 4242)  # the directory now belongs to "someone else"
    with pytest.raises(ac.CodegenError, match="not by this user"):
        cache.cache_dir()


def test_planted_kernel_file_is_replaced_not_imported(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(tmp_path / "kernels"))
    sentinel = tmp_path / "pwned"
    key = "0123456789abcdef0123"
    path = cache.entry_path(key)
    path.write_text(f"open({str(sentinel)!r}, 'w').close()\nVALUE = 'planted'\n")
    os.chmod(path, 0o666)  # writable by anyone: not trusted, even with the expected content
    with pytest.warns(RuntimeWarning, match="not a private file"):
        mod, got = cache.load(key, "VALUE = 'generated'\n", prefix="attnc")
    assert got == path and mod.VALUE == "generated" and not sentinel.exists()
    assert _mode(path) & 0o022 == 0
    assert not cache.trusted_file(tmp_path / "missing.py")


def test_planted_shared_library_is_rebuilt_not_loaded(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(tmp_path / "kernels"))
    monkeypatch.setattr(cpu_build, "enabled", lambda: True)
    fake_cc = tmp_path / "fakecc"  # writes a marker where the library should go (not a real ELF)
    fake_cc.write_text('#!/bin/sh\nwhile [ $# -gt 0 ]; do if [ "$1" = -o ]; then echo built > "$2"; fi; shift; done\n')
    os.chmod(fake_cc, 0o755)
    monkeypatch.setenv("CC", str(fake_cc))
    assert cpu_build._build("cpu_diffusion") is None  # the marker is not a loadable library
    (lib,) = (tmp_path / "kernels").glob("cpu_diffusion_*.so")
    assert lib.read_text() == "built\n" and _mode(lib) & 0o077 == 0
    lib.write_text("planted\n")
    os.chmod(lib, 0o666)
    with pytest.warns(RuntimeWarning, match="not loaded but rebuilt"):
        cpu_build._build("cpu_diffusion")
    assert lib.read_text() == "built\n" and _mode(lib) & 0o077 == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a private library is used as it is
        cpu_build._build("cpu_diffusion")
