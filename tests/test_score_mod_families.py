"""score_mod (edge weights) on the Diffuser and Combiner families against the float64 reference with
the same function (built-ins, traced and opaque user functions; forward, dq/dk/dv and captured
tensors' gradients; gradcheck in float64), odd lengths, large logits, GQA; sinks on the Combiner;
and the errors: ABC (scores against memory slots), Diffuser sinks, the triton backend, a score_mod
of the wrong shape or dtype."""

import pytest
import torch

import attncompiler as ac
from attncompiler.errors import InputError, UnsupportedError
from attncompiler.ir.score_trace import trace_score_mod

H, HKV, D = 4, 2, 8


def qkv(B=2, L=37, mag=10.0, seed=0, dtype=torch.float32):
    """Random q, k, v (requires_grad) whose logits reach ~mag**2 * D**0.5 (hundreds at mag=10)."""
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, H, L, D, generator=g) * mag).to(dtype).requires_grad_()
    k = (torch.randn(B, HKV, L, D, generator=g) * mag).to(dtype).requires_grad_()
    v = torch.randn(B, HKV, L, D, generator=g).to(dtype).requires_grad_()
    return q, k, v


def traced(s, b, h, q_idx, kv_idx):
    """A user function the tracer represents (checked below): a per-head distance penalty, by batch."""
    return torch.where(q_idx >= kv_idx, s * 0.5, torch.tanh(s / 40.0) * 40.0) - (q_idx - kv_idx).abs() * (h + 1) + b


def opaque(s, b, h, q_idx, kv_idx):
    """A user function the tracer cannot represent (softplus): evaluated on tensors."""
    return s + torch.nn.functional.softplus(s * 0.01 - (q_idx - kv_idx).float())


def test_the_user_functions_are_traced_and_opaque():
    assert trace_score_mod(traced).expr is not None
    assert trace_score_mod(opaque).expr is None


def mods(name):
    """``(score_mod, captured tensors whose gradients are checked)``, fresh parameters each call."""
    g = torch.Generator().manual_seed(5)
    slopes = torch.nn.Parameter(ac.alibi_slopes(H))
    table = torch.nn.Parameter(torch.randn(H, 32, generator=g) * 3)
    return {
        "softcap": (ac.softcap(20.0), []),
        "alibi": (ac.alibi(slopes), [slopes]),
        "relative_bias": (ac.relative_bias(table, num_buckets=32, max_distance=16), [table]),
        "softcap_alibi": (ac.softcap(30.0) @ ac.alibi(slopes), [slopes]),
        "traced": (traced, []),
        "opaque": (opaque, []),
    }[name]


MODS = ["softcap", "alibi", "relative_bias", "softcap_alibi", "traced", "opaque"]


def compare(out, ref, inputs, atol=3e-5, grad_tol=3e-4):
    """Outputs and gradients w.r.t. ``inputs`` agree (a random upstream gradient; each gradient
    relative to the largest reference entry, so that large-logit cases are judged by scale)."""
    torch.testing.assert_close(out.double(), ref, rtol=3e-5, atol=atol)
    up = torch.randn(ref.shape, dtype=ref.dtype, generator=torch.Generator().manual_seed(1234))
    got = torch.autograd.grad(out, inputs, up.to(out.dtype), allow_unused=True, retain_graph=True)
    want = torch.autograd.grad(ref, inputs, up, allow_unused=True)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a is not None and b is not None, f"input {i}: no gradient"
        err = (a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-6)
        assert err < grad_tol, f"input {i}: relative gradient error {float(err):.3g}"


# ---------------------------------------------------------------------------------------------
# Diffuser: P = softmax(score_mod(scale q k^T) + mask), then the hops
# ---------------------------------------------------------------------------------------------

DIFFUSIONS = {
    "window_global": ac.diffuse(ac.sliding_window(3) | ac.global_tokens([0, 5]), hops=3, alpha=0.2),
    "causal_window": ac.diffuse(ac.sliding_window(5) & ac.causal(), hops=2, alpha=0.3),
    "heat_random": ac.diffuse(ac.sliding_window(2) | ac.random_blocks(1, 8, seed=1), hops=3, kernel="heat", t=1.5),
}


@pytest.mark.parametrize("mode", ["materialize", "recompute"])
@pytest.mark.parametrize("pname", list(DIFFUSIONS))
@pytest.mark.parametrize("name", MODS)
def test_diffusion_score_mod_matches_reference(name, pname, mode):
    mod, tensors = mods(name)
    p = DIFFUSIONS[pname]
    block = [8, 16][(MODS.index(name) + len(pname)) % 2]  # random-ish schedules
    attn = ac.compile(p, backend="torch", score_mod=mod, schedule=ac.Schedule(block_m=block, block_n=block))
    attn.hops_mode = mode
    q, k, v = qkv(seed=MODS.index(name))
    compare(attn(q, k, v), attn.reference(q, k, v), [q, k, v, *tensors])


def test_diffusion_score_mod_changes_the_result():
    """The score_mod is applied (not silently dropped): a strong ALiBi changes P and the output."""
    p = DIFFUSIONS["window_global"]
    q, k, v = qkv(mag=1.0)
    plain = ac.compile(p, backend="torch")(q, k, v)
    biased = ac.compile(p, backend="torch", score_mod=ac.alibi(torch.full((H,), 2.0)))(q, k, v)
    assert (plain - biased).abs().max() > 1e-2


@pytest.mark.parametrize("mode", ["materialize", "recompute"])
def test_diffusion_large_logits_without_softcap(mode):
    """Logits ~1000 (no softcap to bound them) with a learned ALiBi, float32 against float64."""
    mod, tensors = mods("alibi")
    attn = ac.compile(ac.diffuse(ac.sliding_window(4) & ac.causal(), hops=4, alpha=0.1), backend="torch",
                      score_mod=mod, schedule=ac.Schedule(block_m=8, block_n=8))
    attn.hops_mode = mode
    q, k, v = qkv(L=41, mag=30.0, seed=3)
    compare(attn(q, k, v), attn.reference(q, k, v), [q, k, v, *tensors], atol=1e-4, grad_tol=1e-3)


def test_diffusion_head_dependent_base():
    """A base graph that differs per head (one stored P per (batch, head)): the score_mod sees each
    entry's own b and h."""
    base = ac.mask(lambda b, h, q, k: (q - k).abs() <= h + 1)
    attn = ac.compile(ac.diffuse(base, hops=2), backend="torch", score_mod=traced,
                      schedule=ac.Schedule(block_m=8, block_n=8))
    q, k, v = qkv(L=21)
    compare(attn(q, k, v), attn.reference(q, k, v), [q, k, v])


@pytest.mark.parametrize("mode", ["materialize", "recompute"])
def test_diffusion_gradcheck_float64(mode):
    g = torch.Generator().manual_seed(7)
    slopes = torch.nn.Parameter(torch.rand(2, generator=g, dtype=torch.float64))
    table = torch.nn.Parameter(torch.randn(2, 8, generator=g, dtype=torch.float64))
    mod = ac.softcap(3.0) @ ac.alibi(slopes) @ ac.relative_bias(table, num_buckets=8, max_distance=6)
    attn = ac.compile(ac.diffuse(ac.sliding_window(2) | ac.global_tokens([1]), hops=2, alpha=0.3),
                      backend="torch", score_mod=mod, schedule=ac.Schedule(block_m=4, block_n=4))
    attn.hops_mode = mode
    q = torch.randn(1, 2, 7, 3, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, 7, 3, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 1, 7, 3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: attn(q=t[0], k=t[1], v=t[2]), (q, k, v, slopes, table))


def test_diffusion_materialize_without_grad_matches():
    """Inference (no autograd) takes the same score_mod path; float32 on CPU bypasses the C kernels
    for P only."""
    mod, _ = mods("relative_bias")
    attn = ac.compile(DIFFUSIONS["causal_window"], backend="torch", score_mod=mod)
    q, k, v = qkv()
    with torch.no_grad():
        out = attn(q, k, v)
        ref = attn.reference(q, k, v)
    torch.testing.assert_close(out.double(), ref, rtol=3e-5, atol=3e-5)


def test_diffusion_sinks_raise():
    with pytest.raises(UnsupportedError, match="row-stochastic"):
        ac.compile(DIFFUSIONS["causal_window"], backend="torch", sinks=torch.zeros(H))


# ---------------------------------------------------------------------------------------------
# Combiner: direct token-to-token scores modified at real positions, summary scores as they are
# ---------------------------------------------------------------------------------------------

COMBINERS = {
    "fixed": ac.combiner_fixed(5),
    "fixed_causal": ac.combiner_fixed(4, causal=True, pool="mean"),
    "logsparse": ac.combiner_logsparse(),
    "axial_causal": ac.combiner_axial(6, causal=True),  # token order differs from positions
    "mixture": ac.combiner_mixture(ac.combiner_axial(5), ac.combiner_axial(5, variant="horizontal")),
}


@pytest.mark.parametrize("pname", list(COMBINERS))
@pytest.mark.parametrize("name", MODS)
def test_combiner_score_mod_matches_reference(name, pname):
    mod, tensors = mods(name)
    block = [8, 16][(MODS.index(name) + len(pname)) % 2]
    attn = ac.compile(COMBINERS[pname], backend="torch", score_mod=mod,
                      schedule=ac.Schedule(block_m=block, block_n=block))
    q, k, v = qkv(seed=MODS.index(name) + 10)
    compare(attn(q, k, v), attn.reference(q, k, v), [q, k, v, *tensors])


def test_combiner_score_mod_leaves_summary_scores_alone():
    """A score_mod that is -inf on every direct score leaves only the summaries: the output equals the
    reference with the direct set emptied, and differs from the plain module's."""
    p = COMBINERS["fixed"]
    q, k, v = qkv(mag=1.0)
    kill = ac.compile(p, backend="torch", score_mod=lambda s, b, h, qi, ki: s - float("inf"))
    out = kill(q, k, v)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), kill.reference(q, k, v), rtol=3e-5, atol=3e-5)
    assert (out - ac.compile(p, backend="torch")(q, k, v)).abs().max() > 1e-2


def test_combiner_large_logits_without_softcap():
    mod, tensors = mods("relative_bias")
    attn = ac.compile(COMBINERS["axial_causal"], backend="torch", score_mod=mod)
    q, k, v = qkv(L=41, mag=30.0, seed=4)
    compare(attn(q, k, v), attn.reference(q, k, v), [q, k, v, *tensors], atol=1e-4, grad_tol=1e-3)


@pytest.mark.parametrize("pname", ["fixed_causal", "axial_causal"])
def test_combiner_sinks_and_lse(pname):
    """Sinks join every factorization's joint softmax denominator: out, lse and the sinks' gradient."""
    sinks = torch.nn.Parameter(torch.tensor([0.0, 50.0, -3.0, 200.0]))
    mod, tensors = mods("alibi")
    attn = ac.compile(COMBINERS[pname], backend="torch", score_mod=mod, sinks=sinks,
                      schedule=ac.Schedule(block_m=8, block_n=8))
    q, k, v = qkv(L=30, seed=2)
    out, lse = attn(q, k, v, return_lse=True)
    ref, ref_lse = ac.reference(attn.pattern, q, k, v, score_mod=mod, sinks=sinks, return_lse=True)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=3e-5, atol=3e-4)
    compare(out, ref, [q, k, v, sinks, *tensors])


@pytest.mark.parametrize("pname", ["fixed_causal", "axial_causal"])
def test_combiner_gradcheck_float64(pname):
    g = torch.Generator().manual_seed(8)
    slopes = torch.nn.Parameter(torch.rand(2, generator=g, dtype=torch.float64))
    table = torch.nn.Parameter(torch.randn(2, 8, generator=g, dtype=torch.float64))
    sinks = torch.nn.Parameter(torch.randn(2, generator=g, dtype=torch.float64))
    mod = ac.softcap(3.0) @ ac.alibi(slopes) @ ac.relative_bias(table, num_buckets=8, max_distance=6)
    p = ac.combiner_fixed(3, causal=True) if pname == "fixed_causal" else ac.combiner_axial(3, causal=True)
    attn = ac.compile(p, backend="torch", score_mod=mod, sinks=sinks, schedule=ac.Schedule(block_m=4, block_n=4))
    q = torch.randn(1, 2, 9, 3, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, 9, 3, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 1, 9, 3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: attn(q=t[0], k=t[1], v=t[2]), (q, k, v, slopes, table, sinks))


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------

def test_abc_raises_naming_the_memory_slots():
    for kw in ({"score_mod": ac.softcap(5.0)}, {"sinks": torch.zeros(H)}):
        with pytest.raises(UnsupportedError, match="memory slots.*hint: .*sliding_window"):
            ac.compile(ac.memory(4, ac.MLPControl()), backend="torch", **kw)
    with pytest.raises(UnsupportedError, match="memory slots"):  # a window memory is ABC too
        ac.compile(ac.memory(4, ac.WindowControl(), causal=True), backend="torch", score_mod=ac.softcap(5.0))


@pytest.mark.parametrize("p, family", [(DIFFUSIONS["causal_window"], "diffusion"),
                                       (COMBINERS["fixed"], "combiner")])
def test_triton_backend_raises_naming_family_and_score_mod(p, family):
    q, k, v = qkv(B=1, L=16)
    attn = ac.compile(p, backend="triton", score_mod=ac.softcap(7.0))
    with pytest.raises(UnsupportedError, match=rf"{family} patterns run a score_mod ac.softcap\(7.0\) on the torch"):
        attn(q, k, v)


@pytest.mark.parametrize("p", [ac.sliding_window(3) & ac.causal(), DIFFUSIONS["causal_window"],
                               COMBINERS["fixed"]], ids=["mask", "diffusion", "combiner"])
def test_wrong_shape_or_dtype_raises_as_for_masks(p):
    q, k, v = qkv(B=1, L=17)
    for bad, what in ((lambda s, b, h, qi, ki: s.sum(-1), "returned shape"),
                      (lambda s, b, h, qi, ki: s.double(), "returned dtype"),
                      (lambda s, b, h, qi, ki: 1.0, "returned float")):
        for grad in (False, True):
            with torch.set_grad_enabled(grad), pytest.raises(InputError, match=f"score_mod .* {what}"):
                ac.compile(p, backend="torch", score_mod=bad)(q, k, v)
