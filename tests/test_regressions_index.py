"""Index semantics of traced mask_mods (issue 15): int64 arithmetic in rendered Triton predicates,
torch's indexing rules for captured tensors (negative indices wrap, out of range is an error),
n-D tables indexed by ``b``/``h``, and opaque mask_mods that depend on ``b``/``h`` unannounced.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import attncompiler as ac
from attncompiler import ir as E
from attncompiler.codegen.triton.render import render_predicate

from oracle import assert_matches_oracle

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from attncompiler.program import schedule as S  # noqa: E402
from attncompiler.codegen import cache  # noqa: E402
from attncompiler.codegen.triton.kernels import cache_key, kernel_source  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(tmp_path / "kernels"))


def _qkv(B=1, H=1, L=64, D=16, dtype=torch.float32):
    return [torch.randn(B, H, L, D, dtype=dtype, device=DEVICE, requires_grad=True) for _ in range(3)]


def _dense_from_python(fn, L, b=0, h=0):
    """The mask by calling ``fn`` on Python ints, one element at a time (arbitrary precision)."""
    return torch.tensor([[bool(fn(b, h, q, k)) for k in range(L)] for q in range(L)])


def _check_backends(p, q, k, v, backends=("torch", "triton")):
    for be in backends:
        out = ac.compile(p, backend=be)(q, k, v)
        assert_matches_oracle(out, ac.reference(p, q, k, v), (q, k, v))


# ---------------------------------------------------------------------------------------------
# Item 2: int64 index arithmetic
# ---------------------------------------------------------------------------------------------

def test_products_beyond_int32_are_exact_on_every_backend():
    fn = lambda b, h, q, k: (q * 40_000_000) % 7 == k % 7  # noqa: E731
    p = ac.mask(fn)
    assert p.traced
    assert torch.equal(p.to_dense(64), _dense_from_python(fn, 64))  # rows 54..63 wrapped in int32
    q, k, v = _qkv()
    _check_backends(p, q, k, v)


def test_constants_beyond_int32_render_as_int64():
    fn = lambda b, h, q, k: (q * 2**40 + k) % 3 == 0  # noqa: E731
    p = ac.mask(fn)
    text = render_predicate(p.expr)
    assert "tl.full([], 1099511627776, tl.int64)" in text
    assert torch.equal(p.to_dense(48), _dense_from_python(fn, 48))
    q, k, v = _qkv(L=48)
    _check_backends(p, q, k, v, backends=("triton",))


def test_int32_only_where_bounds_prove_it():
    assert "int64" not in render_predicate(ac.sliding_window(3).predicate(1, 1))
    assert "int64" not in render_predicate(ac.strided(5).predicate(1, 1))
    assert "int64" not in render_predicate(ac.mask(lambda b, h, q, k: (q // 64 - k // 64) * 3 < h).expr)
    # q + k may exceed int32 (positions are int32, up to 2**31 - 1): computed in int64.
    assert "q_idx.to(tl.int64) + kv_idx" in render_predicate(ac.mask(lambda b, h, q, k: (q + k) % 2 == 0).expr)


@pytest.mark.parametrize("value", [2**63, -(2**63) - 1, 10**30])
def test_constants_beyond_int64_are_a_pattern_error_at_trace_time(value):
    with pytest.raises(ac.PatternError, match="int64"):
        ac.mask(lambda b, h, q, k: q * value == k)


def test_folded_constants_beyond_int64_are_a_pattern_error():
    with pytest.raises(ac.PatternError, match="int64"):
        ac.mask(lambda b, h, q, k: q * (2**62 * 4) == k)


def test_floor_semantics_for_negative_operands_on_triton():
    fns = [
        lambda b, h, q, k: (q - k) // 3 == -2,
        lambda b, h, q, k: (q - k) % -5 == -1,
        lambda b, h, q, k: (k - q) // (q + 1) == -1,
        lambda b, h, q, k: (k - 2 * q) % (q % 4 - 2 + (q % 4 == 2)) == 0,
    ]
    q, k, v = _qkv(L=24)
    for fn in fns:
        p = ac.mask(fn)
        assert p.traced
        assert torch.equal(p.to_dense(24), _dense_from_python(fn, 24))
        _check_backends(p, q, k, v, backends=("triton",))


def test_division_by_zero_is_a_pattern_error():
    p = ac.mask(lambda b, h, q, k: q % (q - k) == 0)
    with pytest.raises(ac.PatternError, match="by zero"):
        p.to_dense(8)


def test_torch_evaluation_is_int64_for_int32_positions():
    e = ac.mask(lambda b, h, q, k: (q * 40_000_000) % 7 == 0).expr
    q32 = torch.arange(64, dtype=torch.int32)
    assert torch.equal(e.evaluate({"q_idx": q32}), torch.tensor([(i * 40_000_000) % 7 == 0 for i in range(64)]))


# ---------------------------------------------------------------------------------------------
# Item 5: torch's indexing rules
# ---------------------------------------------------------------------------------------------

def test_index_past_the_end_is_an_error_naming_the_tensor():
    ids = torch.tensor([0, 0, 1])
    p = ac.mask(lambda b, h, q, k: ids[q] == ids[k])
    assert p.traced
    with pytest.raises(ac.PatternError, match=r"shape \(3,\).*\[0, 5\].*\[-3, 2\]"):
        p.to_dense(6)
    with pytest.raises(ac.PatternError, match=r"shape \(3,\)"):
        p.layout(6, block_m=2)
    q, k, v = _qkv(L=6)
    with pytest.raises(ac.PatternError, match=r"shape \(3,\)"):
        ac.reference(p, q, k, v)
    for be in ("torch", "triton"):
        with pytest.raises(ac.PatternError, match=r"shape \(3,\)"):
            ac.compile(p, backend=be)(q, k, v)
    assert torch.equal(p.to_dense(3), ids[:, None] == ids[None, :])


def test_negative_index_wraps_once_like_torch():
    ids = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3])
    fn = lambda b, h, q, k: ids[q - 1] <= ids[k]  # noqa: E731
    p = ac.mask(fn)
    assert p.traced
    L = len(ids)
    qi, ki = torch.arange(L)[:, None], torch.arange(L)[None, :]
    want = fn(0, 0, qi, ki)  # torch's own indexing: ids[-1] is the last entry
    assert torch.equal(p.to_dense(L), want)
    q, k, v = _qkv(L=L)
    _check_backends(p, q, k, v)
    with pytest.raises(ac.PatternError, match=r"q_idx - 17.*\[-17, -2\]"):
        ac.mask(lambda b, h, q, k: ids[q - 17] == 1).to_dense(L)


def test_relative_table_with_both_positions():
    rel = torch.tensor([1, 1, 0, 1, 0, 0, 1, 1, 1])  # rel[q - k] for |q - k| <= 4 (negatives wrap)
    p = ac.mask(lambda b, h, q, k: rel[q - k] == 1)
    qi, ki = torch.arange(5)[:, None], torch.arange(5)[None, :]
    assert torch.equal(p.to_dense(5), rel[qi - ki] == 1)
    with pytest.raises(ac.PatternError, match=r"\[-9, 9\]"):
        p.to_dense(10)


# ---------------------------------------------------------------------------------------------
# Item 3: n-D tables indexed by b and h
# ---------------------------------------------------------------------------------------------

def _docs(L, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 3, (2, L), generator=g).sort(-1).values


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_per_batch_document_table_matches_separate_calls(backend):
    L = 40
    docs = _docs(L)
    p = ac.mask(lambda b, h, q, k: (docs[b, q] == docs[b, k]) & (k <= q))
    assert p.traced and p.batch_dependent and p.head_period == 1
    q, k, v = _qkv(B=2, H=2, L=L)
    out = ac.compile(p, backend=backend)(q, k, v)
    ref = ac.reference(p, q, k, v)
    assert_matches_oracle(out, ref, (q, k, v))
    for bi in range(2):  # each batch entry alone, with its own 1-D table
        row = docs[bi].clone()
        pb = ac.mask(lambda b, h, q, k: (row[q] == row[k]) & (k <= q))
        sl = [x[bi:bi + 1].detach() for x in (q, k, v)]
        torch.testing.assert_close(out[bi:bi + 1].double(), ac.reference(pb, *sl), rtol=1e-5, atol=2e-5)
    assert not torch.equal(p.to_dense(L, b=0), p.to_dense(L, b=1))


def test_chained_and_tuple_indexing_trace_the_same():
    docs = _docs(16)
    a = ac.mask(lambda b, h, q, k: docs[b, q] == docs[b, k])
    c = ac.mask(lambda b, h, q, k: docs[b][q] == docs[b][k])
    assert a.traced and a == c
    t = torch.arange(36).reshape(6, 6) % 4
    m = ac.mask(lambda b, h, q, k: t[q][k] == 1)
    qi, ki = torch.arange(6)[:, None], torch.arange(6)[None, :]
    assert m.traced and torch.equal(m.to_dense(6), t[qi, ki] == 1)


def test_batch_beyond_the_table_is_an_error():
    docs = _docs(16)
    p = ac.mask(lambda b, h, q, k: docs[b, q] == docs[b, k])
    q, k, v = _qkv(B=3, L=16)
    with pytest.raises(ac.PatternError, match=r"shape \(2, 16\).*dimension 0"):
        ac.compile(p, backend="torch")(q, k, v)
    with pytest.raises(ac.PatternError, match=r"shape \(2, 16\)"):
        ac.reference(p, q, k, v)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_per_head_window_table(backend):
    win = torch.tensor([[1], [4], [0]])
    p = ac.mask(lambda b, h, q, k: abs(q - k) <= win[h, 0])
    assert p.traced and p.head_period is None and not p.batch_dependent
    q, k, v = _qkv(B=1, H=3, L=32)
    out = ac.compile(p, backend=backend)(q, k, v)
    assert_matches_oracle(out, ac.reference(p, q, k, v), (q, k, v))
    for hi, w in enumerate(win[:, 0].tolist()):
        sl = [x[:, hi:hi + 1].detach() for x in (q, k, v)]
        torch.testing.assert_close(out[:, hi:hi + 1].double(), ac.reference(ac.sliding_window(w), *sl),
                                   rtol=1e-5, atol=2e-5)


def test_bias_table_indexed_by_head_and_distance():
    bias = torch.tensor([[0, 1, 1, 0, 1], [1, 0, 0, 1, 1]])
    p = ac.mask(lambda b, h, q, k: (bias[h, q - k] == 1) & (k <= q))
    assert p.traced
    for h in range(2):
        qi, ki = torch.arange(5)[:, None], torch.arange(5)[None, :]
        want = (bias[h][(qi - ki).clamp(-5, 4)] == 1) & (ki <= qi)
        assert torch.equal(p.to_dense(5, h=h), want)


# ---------------------------------------------------------------------------------------------
# Item 3b: opaque mask_mods that depend on b or h
# ---------------------------------------------------------------------------------------------

def _opaque_per_batch(docs):
    def per_doc(b, h, q_idx, kv_idx):
        d = docs.float()  # float math: not traceable
        return (d[b, q_idx] == d[b, kv_idx]) & (kv_idx <= q_idx)
    return per_doc


def test_opaque_batch_dependent_mask_without_per_batch_raises():
    docs = _docs(24)
    fn = _opaque_per_batch(docs)
    p = ac.mask(fn)
    assert not p.traced
    q, k, v = _qkv(B=2, L=24)
    with pytest.raises(ac.PatternError, match="per_batch=True"):
        ac.compile(p, backend="torch")(q, k, v)
    with pytest.raises(ac.PatternError, match="per_batch=True"):
        ac.reference(p, q, k, v)
    ac.reference(p, *[x[:1] for x in (q, k, v)])  # one batch entry: nothing to disagree


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opaque_per_batch_mask_matches_the_traced_one(backend):
    docs = _docs(24)
    opaque = ac.mask(_opaque_per_batch(docs), per_batch=True, per_head=False)
    traced = ac.mask(lambda b, h, q, k: (docs[b, q] == docs[b, k]) & (k <= q))
    q, k, v = _qkv(B=2, L=24)
    out = ac.compile(opaque, backend=backend)(q, k, v)
    assert_matches_oracle(out, ac.reference(traced, q, k, v), (q, k, v))


def test_opaque_head_dependent_mask_is_detected():
    def by_head(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx).abs().le(h.item())  # .item(): not traceable, h not touched by tracing
    p = ac.mask(by_head)
    assert p.per_head is None
    q, k, v = _qkv(H=3, L=16)
    with pytest.raises(ac.PatternError, match="per_head=True"):
        ac.compile(p, backend="torch")(q, k, v)
    ok = ac.mask(by_head, per_head=True)
    out = ac.compile(ok, backend="torch")(q, k, v)
    for hi in range(3):
        sl = [x[:, hi:hi + 1].detach() for x in (q, k, v)]
        torch.testing.assert_close(out[:, hi:hi + 1].double(), ac.reference(ac.sliding_window(hi), *sl),
                                   rtol=1e-5, atol=2e-5)


def test_tracing_that_touched_b_makes_an_opaque_mask_per_batch():
    p = ac.mask(lambda b, h, q, k: q >= k if b == 0 else q <= k)
    assert not p.traced and p.per_batch is True and p.batch_dependent
    q, k, v = _qkv(B=2, L=8)
    out = ac.compile(p, backend="torch")(q, k, v)
    torch.testing.assert_close(out[1:].double(), ac.reference(ac.mask(lambda b, h, q, k: q <= k), *[x[1:] for x in (q, k, v)]))


# ---------------------------------------------------------------------------------------------
# Python `if` on an index
# ---------------------------------------------------------------------------------------------

def test_python_if_on_an_index_falls_back_to_elementwise_evaluation():
    def branchy(b, h, q_idx, kv_idx):
        if q_idx > kv_idx:
            return (q_idx - kv_idx) % 3 == 0
        return q_idx == kv_idx
    p = ac.mask(branchy)
    assert not p.traced
    assert torch.equal(p.to_dense(12), _dense_from_python(branchy, 12))
    q, k, v = _qkv(L=12)
    _check_backends(p, q, k, v, backends=("torch",))
    with pytest.raises(ac.PatternError, match=r"torch\.where"):
        p.to_dense(300)


# ---------------------------------------------------------------------------------------------
# Property: torch evaluation == rendered Triton == Python ints
# ---------------------------------------------------------------------------------------------

_CONSTS = st.sampled_from([1, 2, 3, 7, -1, -3, -8, 40_000_000, -40_000_000, 2**31 - 1, -(2**31), 2**31 + 5,
                           2**40, -(2**40) + 3])


def _int_source(depth: int):
    leaf = st.one_of(st.sampled_from(["q", "k"]), _CONSTS.map(lambda c: f"C({c})"))
    if depth == 0:
        return leaf
    sub = _int_source(depth - 1)
    return st.one_of(
        leaf,
        st.tuples(sub, st.sampled_from(["+", "-", "*"]), sub).map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
        st.tuples(sub, st.sampled_from(["//", "%"]), _CONSTS.filter(bool)).map(lambda t: f"({t[0]} {t[1]} C({t[2]}))"),
        st.tuples(sub, st.sampled_from(["//", "%"]), sub).map(lambda t: f"({t[0]} {t[1]} (abs({t[2]}) + 1))"),
        sub.map(lambda s: f"abs({s})"),
        sub.map(lambda s: f"(-{s})"),
        st.tuples(sub, st.sampled_from(["<", "==", ">="]), sub, sub, sub).map(
            lambda t: f"where({t[0]} {t[1]} {t[2]}, {t[3]}, {t[4]})"),
    )


def _py_where(c, a, b):
    return a if c else b


_INT64 = (-(2**63), 2**63 - 1)


class _Checked(int):
    """A Python int that fails the example when an intermediate leaves int64 (torch would wrap)."""

    def _wrap(self, v):
        if isinstance(v, bool):
            return v
        assume(_INT64[0] <= v <= _INT64[1])
        return _Checked(v)

    def __add__(self, o): return self._wrap(int(self) + int(o))
    def __radd__(self, o): return self._wrap(int(o) + int(self))
    def __sub__(self, o): return self._wrap(int(self) - int(o))
    def __rsub__(self, o): return self._wrap(int(o) - int(self))
    def __mul__(self, o): return self._wrap(int(self) * int(o))
    def __rmul__(self, o): return self._wrap(int(o) * int(self))
    def __floordiv__(self, o): return self._wrap(int(self) // int(o))
    def __rfloordiv__(self, o): return self._wrap(int(o) // int(self))
    def __mod__(self, o): return self._wrap(int(self) % int(o))
    def __rmod__(self, o): return self._wrap(int(o) % int(self))
    def __neg__(self): return self._wrap(-int(self))
    def __abs__(self): return self._wrap(abs(int(self)))


@triton.jit
def _eval_int_predicate(Out, bufs, buf_meta, q0, k0, PRED: tl.constexpr, TM: tl.constexpr, TN: tl.constexpr):
    q = q0 + tl.arange(0, TM)[:, None]
    k = k0 + tl.arange(0, TN)[None, :]
    val = PRED(0, 0, q, k, bufs, buf_meta).to(tl.int64) + tl.zeros([TM, TN], dtype=tl.int64)
    tl.store(Out + tl.arange(0, TM)[:, None] * TN + tl.arange(0, TN)[None, :], val)


def _triton_values(expr, q0: int, k0: int, n: int = 8) -> torch.Tensor:
    src = kernel_source(ac.full(), expr, S.Schedule(), torch.float32)
    key = cache_key(src)
    mod, _ = cache.load(key, src.render(key))
    out = torch.zeros(n, n, dtype=torch.int64, device=DEVICE)
    bufs, meta = torch.zeros(1, dtype=torch.int64, device=DEVICE), torch.zeros(1, 2, dtype=torch.int64, device=DEVICE)
    _eval_int_predicate[(1,)](out, bufs, meta, q0, k0, PRED=mod._predicate, TM=n, TN=n)
    return out.cpu()


@settings(max_examples=12, deadline=None)
@given(srcs=st.lists(_int_source(3), min_size=3, max_size=3),
       origin=st.sampled_from([(0, 0), (0, 1000), (2**31 - 9, 3), (5, 2**31 - 9)]))
def test_int_expressions_agree_across_torch_triton_and_python(srcs, origin):
    # Three expressions per kernel: e0 + e1 * 0 would not do (overflow), so the kernel reads
    # where(q % 3 == 0, e0, where(q % 3 == 1, e1, e2)) and each element checks one of them.
    src = f"where(q % 3 == 0, {srcs[0]}, where(q % 3 == 1, {srcs[1]}, {srcs[2]}))"
    q0, k0 = origin
    n = 8
    py = eval(f"lambda q, k: {src}", {"where": _py_where, "abs": abs, "C": _Checked})  # noqa: S307
    want = torch.tensor([[int(py(_Checked(q), _Checked(k))) for k in range(k0, k0 + n)] for q in range(q0, q0 + n)])
    traced = eval(f"lambda b, h, q, k: {src}", {"where": ac.where, "abs": abs, "C": int})  # noqa: S307
    out = traced(*(E.Sym(v) for v in E.INDEX_VARS))
    expr = E.as_expr(out)
    env = {"q_idx": torch.arange(q0, q0 + n)[:, None], "kv_idx": torch.arange(k0, k0 + n)[None, :]}
    got_torch = torch.broadcast_to(expr.evaluate(env), (n, n))
    assert torch.equal(got_torch, want)
    got_mod = E.to_mask_mod(expr)(0, 0, env["q_idx"].to(torch.int32), env["kv_idx"].to(torch.int32))
    assert torch.equal(torch.broadcast_to(torch.as_tensor(got_mod), (n, n)), want)
    if isinstance(expr, E.Const):
        return
    assert torch.equal(_triton_values(expr, q0, k0, n), want), render_predicate(expr)
