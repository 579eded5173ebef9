"""score_mod (edge weights) and attention sinks on the torch backend, against the float64 reference
and an independent dense oracle: built-ins, composed and user functions, captured-tensor gradients,
GQA, odd lengths, large logits, random schedules, positions, and the errors."""

import math

import pytest
import torch

import attncompiler as ac
from attncompiler.dsl.score_mod import captured_tensors, t5_bucket
from attncompiler.errors import InputError, PatternError, UnexpectedArgumentError, UnsupportedError

H, HKV, D = 4, 2, 8


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)  # parameters drawn with the global generator: the same every run


def qkv(B=2, Lq=37, Lk=37, mag=10.0, seed=0, dtype=torch.float32):
    """Random q, k, v (requires_grad) whose logits reach ~mag**2 * D**0.5 (hundreds)."""
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, H, Lq, D, generator=g) * mag).to(dtype).requires_grad_()
    k = (torch.randn(B, HKV, Lk, D, generator=g) * mag).to(dtype).requires_grad_()
    v = torch.randn(B, HKV, Lk, D, generator=g).to(dtype).requires_grad_()
    return q, k, v


def schedule(seed):
    g = torch.Generator().manual_seed(seed)
    bm, bn = (int(x) for x in torch.tensor([4, 8, 16])[torch.randint(0, 3, (2,), generator=g)])
    kbs = int(torch.randint(1, 4, (1,), generator=g))
    return ac.Schedule(block_m=bm, block_n=bn, key_blocks_per_step=kbs)


def compare(out, ref, inputs, rtol=2e-5, atol=2e-5, grad_tol=2e-4):
    """Outputs and gradients w.r.t. ``inputs`` agree (a random upstream gradient; relative to the
    largest reference gradient so that large-logit cases are judged by scale)."""
    torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=atol)
    up = torch.randn(ref.shape, dtype=ref.dtype, generator=torch.Generator().manual_seed(1234))
    got = torch.autograd.grad(out, inputs, up.to(out.dtype), allow_unused=True, retain_graph=True)
    want = torch.autograd.grad(ref, inputs, up, allow_unused=True)
    for i, (a, b) in enumerate(zip(got, want)):
        assert (a is None) == (b is None), f"input {i}: gradient presence differs"
        if a is not None:
            # a gradient that is zero in exact arithmetic (one visible key) is judged absolutely
            err = (a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-6)
            assert err < grad_tol, f"input {i}: relative gradient error {float(err):.3g}"


def builtins():
    g = torch.Generator().manual_seed(5)
    slopes = ac.alibi_slopes(H).requires_grad_()
    table = (torch.randn(H, 32, generator=g) * 3).requires_grad_()
    bias = (torch.randn(H, 37, 37, generator=g) * 5).requires_grad_()
    return {
        "softcap": (ac.softcap(20.0), []),
        "alibi": (ac.alibi(slopes), [slopes]),
        "relative_bias": (ac.relative_bias(table, num_buckets=32, max_distance=16), [table]),
        "bias": (ac.bias(bias), [bias]),
        "softcap_alibi": (ac.softcap(30.0) @ ac.alibi(slopes), [slopes]),
    }


PATTERNS = {
    "causal": ac.causal(),
    "window_global": ac.sliding_window(5) | ac.global_tokens([0, 9]),
    "full": ac.full(),
    "strided_causal": ac.strided(3) & ac.causal(),
}


@pytest.mark.parametrize("name", ["softcap", "alibi", "relative_bias", "bias", "softcap_alibi"])
@pytest.mark.parametrize("pname", list(PATTERNS))
def test_builtin_matches_reference(name, pname):
    mod, tensors = builtins()[name]
    p = PATTERNS[pname]
    i, j = list(builtins()).index(name), list(PATTERNS).index(pname)
    q, k, v = qkv(seed=10 * i + j)
    m = ac.compile(p, backend="torch", score_mod=mod, schedule=schedule(j))
    out, lse = m(q, k, v, return_lse=True)
    ref, ref_lse = ac.reference(p, q, k, v, score_mod=mod, return_lse=True)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-4)
    # logits of a few hundred: float32 rounding of a score is ~2e-5 (the plain path's floor too)
    compare(out, ref, [q, k, v, *tensors], atol=5e-5)


def dense_oracle(q, k, v, fn, mask, scale, sinks=None):
    """Elementwise definition: s[b,h,i,j] = fn(score, b, h, i, j) with Python ints, one entry at a time
    (FlexAttention's scalar semantics), then masked softmax with the sink column."""
    q, k, v = q.double(), k.double(), v.double()
    B, Hq, Lq, _ = q.shape
    G = Hq // k.shape[1]
    out = torch.zeros(B, Hq, Lq, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            s = q[b, h] @ k[b, h // G].T * scale
            rows = []
            for i in range(Lq):
                rows.append(torch.stack([fn(s[i, j], torch.tensor(b), torch.tensor(h), torch.tensor(i),
                                            torch.tensor(j)) for j in range(s.shape[1])]))
            s = torch.stack(rows).masked_fill(~mask[b, h], -math.inf)
            if sinks is not None:
                s = torch.cat([s, sinks[h].double().expand(Lq, 1)], dim=1)
            p = torch.softmax(s, dim=-1).nan_to_num(0.0)
            out[b, h] = p[:, :k.shape[2]] @ v[b, h // G]
    return out


def test_user_function_with_closure_global_and_module_tensors():
    lin = torch.nn.Linear(1, H)
    scale_t = torch.tensor([0.5, -0.25, 0.125, 1.0], requires_grad=True)

    def mod(score, b, h, q_idx, kv_idx):
        dist = (q_idx - kv_idx).abs().to(score.dtype)
        gate = torch.sigmoid(lin.weight[h, 0] * 0.1 + GLOBAL_BIAS[h])
        return torch.where(dist < 3, score * gate, score - scale_t[h] * torch.log1p(dist)) + b * 0.5

    p = ac.sliding_window(7)
    q, k, v = qkv(B=2, Lq=13, Lk=13, mag=3.0, seed=3)
    found = {id(t) for t in captured_tensors(mod)}
    assert {id(lin.weight), id(lin.bias), id(scale_t), id(GLOBAL_BIAS)} <= found
    m = ac.compile(p, backend="torch", score_mod=mod, schedule=ac.Schedule(block_m=4, block_n=4))
    out = m(q, k, v)
    ref = ac.reference(p, q, k, v, score_mod=mod)
    oracle = dense_oracle(q, k, v, mod, torch.stack([torch.stack([p.to_dense(13, 13)] * H)] * 2), D ** -0.5)
    torch.testing.assert_close(ref, oracle, rtol=1e-10, atol=1e-10)
    compare(out, ref, [q, k, v, scale_t, lin.weight, GLOBAL_BIAS])


GLOBAL_BIAS = torch.tensor([0.1, 0.2, -0.3, 0.4], requires_grad=True)


def test_sinks_match_dense_oracle_and_empty_rows_give_zero():
    sinks = torch.tensor([0.5, -1.0, 2.0, 30.0], requires_grad=True)
    slopes = ac.alibi_slopes(H).requires_grad_()
    mod = ac.alibi(slopes)
    # rows 0..2 see no key (keys start at 3): output 0, lse = the sink
    p = ac.mask(lambda b, h, q, k: (k >= 3) & (k <= q))
    q, k, v = qkv(B=1, Lq=11, Lk=11, mag=4.0, seed=5)
    m = ac.compile(p, backend="torch", score_mod=mod, sinks=sinks, schedule=ac.Schedule(block_m=4, block_n=4))
    out, lse = m(q, k, v, return_lse=True)
    assert torch.equal(out[:, :, :3], torch.zeros_like(out[:, :, :3]))
    torch.testing.assert_close(lse[0, :, 0], sinks.detach())
    mask = p.to_dense(11, 11).expand(1, H, 11, 11)
    oracle = dense_oracle(q, k, v, mod, mask, D ** -0.5, sinks)
    ref = ac.reference(p, q, k, v, score_mod=mod, sinks=sinks)
    torch.testing.assert_close(ref, oracle, rtol=1e-10, atol=1e-10)
    compare(out, ref, [q, k, v, slopes, sinks])


def test_sinks_without_score_mod():
    sinks = torch.randn(H, requires_grad=True)
    p = ac.causal()
    q, k, v = qkv(B=2, Lq=19, Lk=19, seed=6)
    out = ac.compile(p, backend="torch", sinks=sinks)(q, k, v)
    compare(out, ac.reference(p, q, k, v, sinks=sinks), [q, k, v, sinks])


def test_positions_q_offset_kv_lens_and_batch_index():
    """Decoding rows (Lq != Lk, q_offset per batch entry) and key padding: the score_mod sees the
    caller's b and the query positions."""
    bias = (torch.randn(3, H, 40, 29) * 4).requires_grad_()
    table = torch.randn(H, 16, requires_grad=True)
    mod = ac.bias(bias) @ ac.relative_bias(table, num_buckets=16, max_distance=32, bidirectional=False)
    p = ac.sliding_window(6) & ac.causal()
    g = torch.Generator().manual_seed(7)
    q = (torch.randn(3, H, 9, D, generator=g) * 8).requires_grad_()
    k = (torch.randn(3, HKV, 29, D, generator=g) * 8).requires_grad_()
    v = torch.randn(3, HKV, 29, D, generator=g).requires_grad_()
    m = ac.compile(p, backend="torch", score_mod=mod, schedule=ac.Schedule(block_m=4, block_n=8))
    kw = dict(q_offset=torch.tensor([20, 5, 31]), kv_lens=torch.tensor([29, 17, 29]))
    out = m(q, k, v, **kw)
    ref = ac.reference(p, q, k, v, score_mod=mod, **kw)
    compare(out, ref, [q, k, v, bias, table])
    out2 = m(q, k, v, align="bottom_right")
    compare(out2, ac.reference(p, q, k, v, score_mod=mod, align="bottom_right"), [q, k, v, bias, table])


def test_per_head_layouts_and_float64_gradcheck():
    table = torch.randn(H, 8, dtype=torch.float64, requires_grad=True)
    sinks = torch.randn(H, dtype=torch.float64, requires_grad=True)
    mod = ac.softcap(3.0) @ ac.relative_bias(table, num_buckets=8, max_distance=12)
    p = ac.per_head([ac.sliding_window(2), ac.causal()])
    m = ac.compile(p, backend="torch", score_mod=mod, sinks=sinks, schedule=ac.Schedule(block_m=4, block_n=4))
    q, k, v = qkv(B=1, Lq=7, Lk=7, mag=1.0, seed=8, dtype=torch.float64)
    compare(m(q, k, v), ac.reference(p, q, k, v, score_mod=mod, sinks=sinks), [q, k, v, table, sinks],
            rtol=1e-10, atol=1e-10, grad_tol=1e-9)
    torch.autograd.gradcheck(lambda q, k, v, t, s: m(q, k, v), (q, k, v, table, sinks))


def test_alibi_slopes_are_the_papers():
    assert torch.allclose(ac.alibi_slopes(8), torch.tensor([2.0 ** -i for i in range(1, 9)]))
    # 6 heads: the 4-head slopes, then every other one of the 8-head slopes
    want = [2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8, 2.0 ** -1, 2.0 ** -3]
    assert torch.allclose(ac.alibi_slopes(6), torch.tensor(want))
    assert ac.alibi_slopes(12).shape == (12,)


def test_alibi_reach():
    mod = ac.alibi(torch.tensor([0.5, 2.0 ** -8, 0.0, 3.0]))
    reach = mod.reach(20.0)
    assert reach == [41, 5121, 0, 7]
    q_idx = torch.tensor(reach[:2] + [0, reach[3]])
    bias = mod(torch.zeros(4), 0, torch.arange(4), q_idx, torch.zeros(4, dtype=torch.long))
    assert bool((bias[[0, 1, 3]] < -20).all())
    before = mod(torch.zeros(4), 0, torch.arange(4), q_idx - 1, torch.zeros(4, dtype=torch.long))
    assert bool((before[[0, 1, 3]] >= -20).all())


def test_t5_bucketing_matches_transformers():
    t5 = pytest.importorskip("transformers.models.t5.modeling_t5")
    r = torch.arange(-300, 300)
    for bidirectional in (True, False):
        for nb, md in ((32, 128), (16, 64), (8, 20)):
            want = t5.T5Attention._relative_position_bucket(r, bidirectional, nb, md)
            assert torch.equal(t5_bucket(r, bidirectional, nb, md), want)
            # the module's saturating table gives the same buckets for kv_idx - q_idx = r
            mod = ac.relative_bias(torch.zeros(H, nb), num_buckets=nb, max_distance=md, bidirectional=bidirectional)
            assert torch.equal(mod.bucket(torch.zeros_like(r), r), want)


def test_errors():
    p = ac.causal()
    q, k, v = qkv(B=1, Lq=9, Lk=9)
    with pytest.raises(InputError, match="shape"):
        ac.compile(p, backend="torch", score_mod=lambda s, b, h, qi, ki: s[..., :1, :1].sum(-1))(q, k, v)
    with pytest.raises(InputError, match="dtype"):
        ac.compile(p, backend="torch", score_mod=lambda s, b, h, qi, ki: s.double())(q, k, v)
    meta = torch.zeros(H, device="meta")
    with pytest.raises(InputError, match="meta"):
        ac.compile(p, backend="torch", score_mod=lambda s, b, h, qi, ki: s + meta[h])(q, k, v)
    with pytest.raises(PatternError, match="callable"):
        ac.compile(p, score_mod=3.0)
    with pytest.raises(PatternError, match="cap"):
        ac.softcap(-1.0)
    with pytest.raises(InputError, match="slopes"):
        ac.compile(p, backend="torch", score_mod=ac.alibi(torch.ones(3)))(q, k, v)
    with pytest.raises(InputError, match="bias"):
        ac.compile(p, backend="torch", score_mod=ac.bias(torch.ones(H, 5, 9)))(q, k, v)
    with pytest.raises(InputError, match="sinks"):
        ac.compile(p, backend="torch", sinks=torch.ones(3))(q, k, v)
    with pytest.raises(UnexpectedArgumentError):
        ac.compile(p, backend="torch", score_mod=ac.softcap(5.0))(q, k, v, score_mod=None)
    with pytest.raises(TypeError):
        ac.compile(p, score_mod=ac.softcap(5.0), scoremod=1)
    with pytest.raises(UnsupportedError, match="triton.*opaque.*sort"):
        ac.compile(p, backend="triton", score_mod=lambda s, b, h, qi, ki: torch.sort(s, -1)[0])(q, k, v)
    with pytest.raises(UnsupportedError, match="memory slots"):
        ac.compile(ac.memory(4, ac.MLPControl()), score_mod=ac.softcap(5.0))


class Holder:
    """A plain object holding a parameter: not an nn.Module, so its tensor is not discoverable."""

    def __init__(self):
        self.w = torch.randn(H, requires_grad=True)

    def mod(self, score, b, h, q_idx, kv_idx):
        return score + self.w[h] * kv_idx


def test_undiscoverable_tensor_requiring_grad_raises():
    q, k, v = qkv(B=1, Lq=9, Lk=9)
    holder = Holder()
    m = ac.compile(ac.causal(), backend="torch", score_mod=holder.mod)
    with pytest.raises(InputError, match="requires grad"):
        m(q, k, v)
    with torch.no_grad():  # no gradient wanted: nothing can be lost
        torch.testing.assert_close(m(q, k, v).double(),
                                   ac.reference(ac.causal(), q, k, v, score_mod=holder.mod), rtol=1e-5, atol=1e-5)
    # a tensor computed from a parameter (non-leaf) in a closure is fine: its graph is followed
    base = torch.randn(H, requires_grad=True)
    derived = base * 2.0
    fn = lambda s, b, h, qi, ki: s + derived[h] * (ki - qi)  # noqa: E731  (a row constant would not count)
    out = ac.compile(ac.causal(), backend="torch", score_mod=fn)(q, k, v)
    compare(out, ac.reference(ac.causal(), q, k, v, score_mod=fn), [q, k, v, base])


def test_double_backward_raises_and_no_grad_inference_matches():
    p = ac.sliding_window(4)
    q, k, v = qkv(B=1, Lq=21, Lk=21, seed=11)
    m = ac.compile(p, backend="torch", score_mod=ac.softcap(10.0), schedule=ac.Schedule(block_m=8, block_n=8))
    out = m(q, k, v)
    (g,) = torch.autograd.grad(out.sum(), q, create_graph=True)
    with pytest.raises(Exception, match="double|twice|backward"):
        g.sum().backward()
    with torch.no_grad():
        torch.testing.assert_close(m(q, k, v), out.detach(), rtol=1e-6, atol=1e-6)


@pytest.mark.filterwarnings("ignore::hypothesis.errors.NonInteractiveExampleWarning")
def test_random_patterns_lengths_schedules_property():
    """Random pattern, odd lengths, GQA, q_offset, block sizes and steps, built-in or composed
    score_mod, large logits: forward and gradients equal the float64 reference. In float64, so the
    comparison is exact to rounding (in float32 a table's gradient, a sum of terms that cancel per
    row, carries ~1e-4 relative rounding error, see the float32 tests above)."""
    hyp = pytest.importorskip("hypothesis")
    st = hyp.strategies

    pats = [ac.causal(), ac.sliding_window(3) | ac.global_tokens([1]),  # token 1 exists: Lq, Lk >= 2 ac.strided(2) & ac.causal(),
            ac.block_local(5), ac.dilated_window(2, 2)]

    @hyp.settings(max_examples=12, deadline=None, derandomize=True)
    @hyp.given(pi=st.integers(0, len(pats) - 1), lq=st.integers(2, 23), extra=st.integers(0, 9),
               bm=st.sampled_from([4, 8, 16]), bn=st.sampled_from([4, 8, 16]), kbs=st.integers(1, 3),
               mi=st.integers(0, 2), off=st.booleans(), seed=st.integers(0, 99))
    def check(pi, lq, extra, bm, bn, kbs, mi, off, seed):
        lk = lq + extra
        slopes = (ac.alibi_slopes(H, torch.float64) * 4).requires_grad_()
        table = torch.randn(H, 8, dtype=torch.float64, requires_grad=True)
        mod = [ac.softcap(7.0), ac.alibi(slopes) @ ac.relative_bias(table, num_buckets=8, max_distance=10),
               ac.softcap(50.0) @ ac.alibi(slopes)][mi]
        q, k, v = qkv(B=1, Lq=lq, Lk=lk, mag=12.0, seed=seed, dtype=torch.float64)
        kw = {"q_offset": extra} if off else {}
        m = ac.compile(pats[pi], backend="torch", score_mod=mod,
                       schedule=ac.Schedule(block_m=bm, block_n=bn, key_blocks_per_step=kbs))
        compare(m(q, k, v, **kw), ac.reference(pats[pi], q, k, v, score_mod=mod, **kw), [q, k, v, slopes, table],
                rtol=1e-10, atol=1e-10, grad_tol=1e-7)  # saturated rows: gradients ~1e-9, errors ~1e-14

    check()


def test_score_mod_returning_minus_inf_empties_rows_without_nan():
    """A score_mod may mask (FlexAttention allows -inf): a row it empties gives zeros, no NaN,
    in the inference path and with gradients."""
    p = ac.sliding_window(4)
    q, k, v = qkv(B=1, Lq=19, Lk=19, seed=12)
    mod = lambda s, b, h, qi, ki: torch.where((qi % 5 == 0) | (ki > qi), torch.full_like(s, -math.inf), s)  # noqa: E731
    m = ac.compile(p, backend="torch", score_mod=mod, schedule=ac.Schedule(block_m=8, block_n=8))
    ref = ac.reference(p, q, k, v, score_mod=mod)
    with torch.no_grad():
        inf_out = m(q, k, v)
    assert not torch.isnan(inf_out).any()
    torch.testing.assert_close(inf_out.double(), ref, rtol=2e-5, atol=2e-5)
    assert torch.equal(inf_out[:, :, ::5], torch.zeros_like(inf_out[:, :, ::5]))
    compare(m(q, k, v), ref, [q, k, v])


def test_diagonal_bias_equals_its_dense_form():
    """``ac.bias(t, diagonal=True)`` adds ``t[h, kv - q + M - 1]``: the same as the dense bias
    gathered from it, with the table's gradient; odd lengths, q_offset, GQA, large logits."""
    g = torch.Generator().manual_seed(8)
    t = (torch.randn(H, 2 * 60 - 1, generator=g) * 3).requires_grad_()
    shared = (torch.randn(2 * 60 - 1, generator=g) * 3).requires_grad_()
    p = ac.sliding_window(9) | ac.global_tokens([0])
    q, k, v = qkv(B=2, Lq=23, Lk=51, seed=12)
    pos_q, pos_k = torch.arange(20, 43)[:, None], torch.arange(51)[None, :]
    for table, dense in ((t, t[:, pos_k - pos_q + 59]), (shared, shared[pos_k - pos_q + 59])):
        m = ac.compile(p, backend="torch", score_mod=ac.bias(table, diagonal=True), schedule=schedule(3))
        out = m(q, k, v, q_offset=20)
        ref = ac.reference(p, q, k, v, score_mod=ac.bias(table, diagonal=True), q_offset=20)
        full = torch.zeros(dense.shape[:-2] + (43, 51), dtype=dense.dtype)
        full = torch.cat([full[..., :20, :], dense], dim=-2)  # rows are indexed by position
        dense_ref = ac.reference(p, q, k, v, score_mod=ac.bias(full), q_offset=20)
        torch.testing.assert_close(ref, dense_ref, rtol=1e-10, atol=1e-10)
        compare(out, ref, [q, k, v, table], atol=5e-5)
    with pytest.raises(PatternError, match="odd length"):
        ac.bias(torch.zeros(H, 10), diagonal=True)
    with pytest.raises(InputError, match="covers distances up to 4"):
        ac.compile(p, backend="torch", score_mod=ac.bias(torch.zeros(H, 9), diagonal=True))(q, k, v)
    with pytest.raises(InputError, match="rows for heads=4"):
        ac.compile(p, backend="torch", score_mod=ac.bias(torch.zeros(3, 119), diagonal=True))(q, k, v)
