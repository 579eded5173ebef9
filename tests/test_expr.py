"""The index-expression IR: structural equality, hashing, repr, tracing, evaluation, bounds."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attncompiler as ac
from attncompiler import ir as E
from attncompiler.ir import ops as expr_ops
from attncompiler.ir.expr import B, H, KV, Q

from strategies import bool_exprs, int_exprs

ENV_NAMES = ("b", "h", "q_idx", "kv_idx")


def _grid_env(n: int = 7, lo: int = -6) -> dict[str, torch.Tensor]:
    """Every combination of the four variables over ``[lo, lo + n)``, as broadcast tensors."""
    r = torch.arange(lo, lo + n)
    return {"b": r.view(-1, 1, 1, 1), "h": r.view(1, -1, 1, 1), "q_idx": r.view(1, 1, -1, 1),
            "kv_idx": r.view(1, 1, 1, -1)}


# -- structural equality, hashing ----------------------------------------------------------------

def test_eq_is_structural_and_eq_method_is_elementwise():
    a, b = Q - KV + 1, Q - KV + 1
    assert (a == b) is True
    assert (a == Q - KV + 2) is False
    elem = a.eq(b)
    assert isinstance(elem, E.Expr) and elem.kind == E.BOOL
    assert repr(elem) == "q_idx - kv_idx + 1 == q_idx - kv_idx + 1"
    assert isinstance(a.ne(3), E.BinOp) and a.ne(3).op == "ne"


def test_const_bool_and_int_differ():
    assert E.Const(True) != E.Const(1)
    assert E.Const(False) != E.Const(0)
    assert hash(E.Const(True)) != hash(E.Const(1))
    assert E.Const(True).kind == E.BOOL and E.Const(1).kind == E.INT


@given(int_exprs())
def test_equal_expressions_hash_equal(e):
    rebuilt = E.substitute(e, {})  # rebuilds the tree node by node
    assert rebuilt == e and hash(rebuilt) == hash(e)
    assert {e: 1}[rebuilt] == 1


def test_buffers_compare_by_content():
    b1 = E.Buffer("ids", np.array([0, 0, 1, 1]))
    b2 = E.Buffer("ids", [0, 0, 1, 1])
    b3 = E.Buffer("ids", [0, 1, 1, 1])
    assert b1 == b2 and hash(b1) == hash(b2)
    assert b1 != b3
    assert E.Load(b1, Q) == E.Load(b2, Q)
    with pytest.raises(ValueError):
        b1.data[0] = 5  # read-only: a buffer's digest must keep describing its data


def test_bool_of_expr_raises_pattern_error():
    with pytest.raises(ac.PatternError, match="truth value"):
        bool(Q < KV)
    with pytest.raises(ac.PatternError):
        if Q < KV:  # noqa: SIM108 - the point is the implicit bool()
            pass


def test_non_integer_constants_are_rejected():
    with pytest.raises(ac.PatternError, match="float"):
        Q + 0.5
    with pytest.raises(ac.PatternError, match="division by zero"):
        Q // 0
    with pytest.raises(ac.PatternError, match="division by zero"):
        Q % 0


def test_constant_folding_and_identities():
    assert E.as_expr(3) + 4 == E.Const(7)
    assert Q + 0 == Q and 0 + Q == Q and Q * 1 == Q
    assert ((Q < KV) & True) == (Q < KV)
    assert ((Q < KV) | True) == E.Const(True)
    assert ~~(Q < KV) == (Q < KV)
    assert E.where(True, Q, KV) == Q


# -- evaluation ----------------------------------------------------------------------------------

@given(int_exprs())
def test_evaluation_matches_python_semantics(e):
    env = _grid_env(5, -2)
    got = e.evaluate(env)
    for vals in itertools.islice(itertools.product(range(-2, 3), repeat=4), 0, None, 37):
        py = _python_eval(e, dict(zip(ENV_NAMES, vals)))
        idx = tuple(v + 2 for v in vals)
        val = torch.broadcast_to(torch.as_tensor(got), (5, 5, 5, 5))[idx].item()
        assert val == py, (e, vals)


def _python_eval(e: E.Expr, env: dict[str, int]):
    """A direct Python reading of an expression: the semantics the IR promises (floor div/mod)."""
    match e:
        case E.Var(name):
            return env[name]
        case E.Const(v):
            return v
        case E.BinOp(op, a, b):
            return expr_ops.PY_BINOPS[op](_python_eval(a, env), _python_eval(b, env))
        case E.UnOp("abs", a):
            return abs(_python_eval(a, env))
        case E.UnOp("invert", a):
            x = _python_eval(a, env)
            return (not x) if a.kind == E.BOOL else ~x
        case E.Where(c, a, b):
            return _python_eval(a, env) if _python_eval(c, env) else _python_eval(b, env)
        case E.Load(buf, idx, fill):
            i = _python_eval(idx, env)
            return int(buf.data[i]) if 0 <= i < len(buf) else fill
    raise AssertionError(e)


def test_floor_division_semantics_on_negative_values():
    d = torch.arange(-7, 8)
    env = {"q_idx": d, "kv_idx": torch.zeros_like(d)}
    assert torch.equal((Q // 3).evaluate(env), torch.tensor([x // 3 for x in range(-7, 8)]))
    assert torch.equal((Q % 3).evaluate(env), torch.tensor([x % 3 for x in range(-7, 8)]))
    assert torch.equal((Q % -3).evaluate(env), torch.tensor([x % -3 for x in range(-7, 8)]))


def test_load_reads_fill_outside_the_table():
    buf = E.Buffer("t", [5, 6, 7])
    out = E.Load(buf, Q, fill=-9).evaluate({"q_idx": torch.arange(-2, 5)})
    assert out.tolist() == [-9, -9, 5, 6, 7, -9, -9]


def test_substitute_specializes_and_folds():
    e = E.where(H.eq(1), Q.eq(KV), Q >= KV)
    assert E.substitute(e, {"h": 1}) == Q.eq(KV)
    assert E.substitute(e, {"h": 0}) == (Q >= KV)
    assert E.substitute(e, {"h": 0}).variables() == {"q_idx", "kv_idx"}


# -- interval bounds ------------------------------------------------------------------------------

def _boxes():
    ends = st.tuples(st.integers(-20, 40), st.integers(0, 12)).map(lambda t: (t[0], t[0] + t[1]))
    return st.fixed_dictionaries({n: ends for n in ENV_NAMES})


def _check_bounds(e: E.Expr, box: dict, seed: int) -> None:
    env = {n: (np.int64(lo), np.int64(hi)) for n, (lo, hi) in box.items()}
    lo, hi = e.bounds(env)
    gen = torch.Generator().manual_seed(seed)
    pts = {n: torch.randint(a, b + 1, (64,), generator=gen) for n, (a, b) in box.items()}
    # Corners are where bounds are most often wrong: include them.
    for n, (a, b) in box.items():
        pts[n][:2] = torch.tensor([a, b])
    vals = e.evaluate(pts)
    vals = torch.broadcast_to(torch.as_tensor(vals), (64,)).to(torch.int64).numpy()
    assert (np.int64(lo) <= vals).all() and (vals <= np.int64(hi)).all(), (e, box, lo, hi)


@given(int_exprs(), _boxes(), st.integers(0, 2**16))
def test_int_bounds_are_conservative(e, box, seed):
    _check_bounds(e, box, seed)


@given(bool_exprs(), _boxes(), st.integers(0, 2**16))
def test_bool_bounds_are_conservative(e, box, seed):
    _check_bounds(e, box, seed)


@given(_boxes(), st.integers(0, 2**16), st.lists(st.integers(-5, 9), min_size=1, max_size=30),
       st.integers(-3, 3))
def test_load_bounds_are_conservative(box, seed, data, fill):
    buf = E.Buffer("t", data)
    e = E.Load(buf, Q - KV, fill).eq(E.Load(buf, KV, fill - 1)) | (E.Load(buf, Q // 2, fill) > 3)
    _check_bounds(e, box, seed)
    _check_bounds(E.Load(buf, Q + H, fill) * 2 - 1, box, seed)


def test_bounds_decide_simple_boxes():
    env = {"q_idx": (np.int64(10), np.int64(19)), "kv_idx": (np.int64(0), np.int64(9))}
    assert tuple(map(int, (KV <= Q).bounds(env))) == (1, 1)  # surely true
    assert tuple(map(int, (KV > Q).bounds(env))) == (0, 0)  # surely false
    assert tuple(map(int, ((Q - KV) % 2).eq(0).bounds(env))) == (0, 1)  # undecided


# -- tracing ----------------------------------------------------------------------------------------

def test_trace_arithmetic_and_comparisons():
    e = E.trace(lambda b, h, q, k: (abs(q - k) <= 3) & ((q - k) % 2 == 0) | (k < 1))
    assert e == ((abs(Q - KV) <= 3) & ((Q - KV) % 2).eq(0)) | (KV < 1)


def test_trace_torch_where_and_torch_functions():
    e = E.trace(lambda b, h, q, k: torch.where(q < 8, k <= q, torch.remainder(q - k, 4) == 0))
    assert e == E.where(Q < 8, KV <= Q, ((Q - KV) % 4).eq(0))
    e2 = E.trace(lambda b, h, q, k: torch.logical_and(torch.abs(q - k) < 2, torch.logical_not(k == 0)))
    assert e2 == (abs(Q - KV) < 2) & ~KV.eq(0)


def test_ir_functions_inside_a_mask_mod_stay_symbolic():
    # ac.where / minimum / maximum return proxies during tracing, so a later `== 0` is
    # element-wise rather than a structural comparison that would trace a constant.
    e = E.trace(lambda b, h, q, k: ac.where(q < 5, q, k) % 2 == 0)
    assert e == (E.where(Q < 5, Q, KV) % 2).eq(0)
    e = E.trace(lambda b, h, q, k: E.minimum(q, k) + E.maximum(q - 3, 0) == 4)
    assert e == (E.minimum(Q, KV) + E.maximum(Q - 3, 0)).eq(4)
    e = E.trace(lambda b, h, q, k: torch.minimum(q, k) == torch.maximum(k, q - 2))
    assert e == E.minimum(Q, KV).eq(E.maximum(KV, Q - 2))


def test_trace_document_id_tensor_indexing():
    doc = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    e = E.trace(lambda b, h, q, k: doc[q] == doc[k])
    assert e is not None and len(e.buffers()) == 1
    assert e.buffers()[0].data.tolist() == doc.tolist()
    got = e.evaluate({"q_idx": torch.arange(9)[:, None], "kv_idx": torch.arange(9)[None, :]})
    assert torch.equal(got, doc[:, None] == doc[None, :])
    flags = torch.tensor([True, False, True])
    e2 = E.trace(lambda b, h, q, k: flags[k])
    assert e2.kind == E.BOOL
    assert e2.evaluate({"kv_idx": torch.arange(3)}).tolist() == [True, False, True]


def test_trace_detects_batch_and_head_use():
    assert E.trace(lambda b, h, q, k: (h == 1) | (q >= k)).variables() == {"h", "q_idx", "kv_idx"}
    assert "b" in E.trace(lambda b, h, q, k: (b % 2 == 0) & (q >= k)).variables()


@pytest.mark.parametrize("fn", [
    lambda b, h, q, k: q >= k if h == 0 else q == k,  # Python `if` on an index
    lambda b, h, q, k: (h < 1) and (q >= k),  # `and` calls bool()
    lambda b, h, q, k: q >= k + int(h),  # int() of an index
    lambda b, h, q, k: (q - k).remainder(2) == 0,  # a tensor method the tracer does not model
    lambda b, h, q, k: torch.sin(q.float()) > 0,  # float math
    lambda b, h, q, k: q * 0.5 < k,  # a float constant
], ids=["if", "and", "int", "method", "float-fn", "float-const"])
def test_untraceable_mask_mods_fall_back_to_opaque(fn):
    assert E.trace(fn) is None
    p = ac.mask(fn)
    assert not p.traced and p.predicate(8, 8) is None
    q, k = torch.arange(8)[:, None], torch.arange(8)[None, :]
    expected = torch.broadcast_to(fn(torch.tensor(0), torch.tensor(0), q, k), (8, 8))
    assert torch.equal(p.to_dense(8), expected)


def test_trace_rejects_integer_result():
    with pytest.raises(ac.PatternError, match="boolean"):
        E.trace(lambda b, h, q, k: q - k)


# -- repr ----------------------------------------------------------------------------------------------

def _round_trip(e: E.Expr) -> E.Expr:
    p = eval(f"ac.mask(lambda b, h, q_idx, kv_idx: {e!r})", {"ac": ac})
    assert p.traced, repr(e)
    return p.expr


@given(bool_exprs())
@settings(max_examples=60)
def test_repr_round_trips_through_a_traced_mask(e):
    once = _round_trip(e)
    # Python reflects `0 < b` into `b > 0`, so the first trip may reorder a comparison; it
    # must mean the same, and from then on repr is a structural fixed point.
    env = _grid_env(5, -2)
    assert torch.equal(torch.broadcast_to(once.evaluate(env), (5,) * 4),
                       torch.broadcast_to(e.evaluate(env), (5,) * 4))
    assert _round_trip(once) == once


def test_repr_round_trip_is_structural_without_reflected_constants():
    e = E.where(Q < 5, (Q - KV) % 3 == 1, abs(Q - KV) <= 2) & ~(H.eq(1) | (B // 2 >= KV - 3))
    assert _round_trip(e) == e


def test_repr_uses_python_precedence():
    assert repr((Q - KV) - (Q - KV)) == "q_idx - kv_idx - (q_idx - kv_idx)"
    assert repr(Q // (KV + 1)) == "q_idx // (kv_idx + 1)"
    assert repr((Q < KV) & (KV < 3)) == "(q_idx < kv_idx) & (kv_idx < 3)"
    assert repr(~(Q < KV)) == "~(q_idx < kv_idx)"
    assert repr(E.where(Q < 1, Q, KV)) == "ac.where(q_idx < 1, q_idx, kv_idx)"
    assert repr(E.minimum(Q, KV + 1)) == "ac.minimum(q_idx, kv_idx + 1)"


def test_bounds_never_wrap_around():
    # (q // k) (k may be 0) has no useful bound; doubling the "unknown" interval must not wrap in
    # int64 and turn into a (wrong) sure answer. This once made a layout all-empty for an all-true mask.
    env = {n: (np.int64(0), np.int64(7)) for n in ENV_NAMES}
    lo, hi = ((Q // KV) * 2 >= 0).bounds(env)
    assert (int(lo), int(hi)) == (0, 1)
    p = ac.mask(lambda b, h, q_idx, kv_idx: (q_idx & kv_idx) * 2 + 1 > 0)
    assert p.to_dense(8).all() and (p.layout(8, block_m=4).block_kinds() == 2).all()
