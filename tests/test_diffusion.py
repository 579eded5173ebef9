"""Diffusion attention: reference vs independent implementations, backends vs reference."""

from __future__ import annotations

import math

import pytest
import torch

import attncompiler as ac
from attncompiler.families.diffusion.pattern import Diffusion, diffuse
from attncompiler.families.diffusion.program import choose_block, recompute_hops
from attncompiler.patterns.diffuser import diffuser, diffuser_graph
from attncompiler.program.stages import check_program
from oracle import assert_matches_oracle


def _loop_probs(allowed, q, k, scale):
    """P from the definition, one row at a time with math.exp (no torch softmax)."""
    L = len(allowed)
    P = [[0.0] * L for _ in range(L)]
    for i in range(L):
        keys = [j for j in range(L) if allowed[i][j]]
        if not keys:
            continue
        s = {j: scale * sum(q[i][d] * k[j][d] for d in range(len(q[i]))) for j in keys}
        m = max(s.values())
        den = sum(math.exp(x - m) for x in s.values())
        for j in keys:
            P[i][j] = math.exp(s[j] - m) / den
    return P


def _matvec(P, Z):
    return [[sum(P[i][j] * Z[j][d] for j in range(len(Z))) for d in range(len(Z[0]))] for i in range(len(P))]


def _independent(pattern: Diffusion, q, k, v, scale):
    """Loops written from the issue's equations: PPR recursion; heat kernel as a power series."""
    L = q.shape[0]
    allowed = pattern.base.to_dense(L).tolist()
    qd, kd, vd = q.tolist(), k.tolist(), v.tolist()
    P = _loop_probs(allowed, qd, kd, scale)
    if pattern.kernel.value == "ppr":
        a, z = pattern.alpha, vd
        for _ in range(pattern.hops):
            pz = _matvec(P, z)
            z = [[(1 - a) * pz[i][d] + a * vd[i][d] for d in range(len(vd[0]))] for i in range(L)]
        return torch.tensor(z, dtype=torch.float64)
    t, K = pattern.t, pattern.hops
    w = [math.exp(-t) * t ** n / math.factorial(n) for n in range(K + 1)]
    w = [x / sum(w) for x in w]
    out = [[w[0] * vd[i][d] for d in range(len(vd[0]))] for i in range(L)]
    pk = vd
    for n in range(1, K + 1):
        pk = _matvec(P, pk)
        out = [[out[i][d] + w[n] * pk[i][d] for d in range(len(vd[0]))] for i in range(L)]
    return torch.tensor(out, dtype=torch.float64)


BASES = [
    ac.sliding_window(2),
    ac.sliding_window(1) | ac.global_tokens([0]),
    ac.causal(),
    ac.block_local(4) & ac.mask(lambda b, h, q_idx, kv_idx: q_idx != 3),  # row 3 has no key
]


@pytest.mark.parametrize("base", BASES, ids=repr)
@pytest.mark.parametrize("kernel", ["ppr", "heat"])
def test_reference_matches_independent_loops(base, kernel):
    p = diffuse(base, hops=3, alpha=0.3, kernel=kernel, t=0.7)
    L, D = 11, 3
    q, k, v = (torch.randn(1, 1, L, D, dtype=torch.float64) for _ in range(3))
    ref = ac.reference(p, q, k, v)
    ind = _independent(p, q[0, 0], k[0, 0], v[0, 0], D ** -0.5)
    torch.testing.assert_close(ref[0, 0], ind, rtol=1e-12, atol=1e-12)


def _rand(B, H, Hkv, L, D, dtype=torch.float32):
    return (torch.randn(B, H, L, D, dtype=dtype, requires_grad=True),
            torch.randn(B, Hkv, L, D, dtype=dtype, requires_grad=True),
            torch.randn(B, Hkv, L, D + 1, dtype=dtype, requires_grad=True))


CASES = [
    (diffuse(ac.sliding_window(5), hops=3, alpha=0.2), 50, 16),
    (diffuse(ac.sliding_window(3) | ac.global_tokens([0, 9]), hops=4, kernel="heat", t=2.0), 45, 16),
    (diffuse(ac.causal(), hops=2, alpha=0.5), 40, 16),
    (diffuser(window=8, random_blocks=1, num_global=2, hops=5), 70, 8),
    (diffuser(window=8, random_blocks=1, num_global=1, hops=3, causal=True), 61, 16),
    (diffuse(ac.per_head([ac.sliding_window(2), ac.causal()]), hops=2, alpha=0.1), 33, 16),
    (diffuse(ac.block_local(8) & ac.mask(lambda b, h, q_idx, kv_idx: q_idx != 3), hops=2), 24, 8),
]


# The recompute schedule reuses the (separately tested) BlockSparseAttention stage: fewer cases.
RUNS = [(c, "materialize") for c in CASES] + [(CASES[i], "recompute") for i in (1, 2, 5)]


@pytest.mark.parametrize("case,mode", RUNS, ids=[f"{repr(c[0])[:60]}-{m}" for c, m in RUNS])
def test_torch_backend_matches_reference_forward_backward(case, mode):
    pattern, L, block = case
    q, k, v = _rand(2 if "per_head" in repr(pattern) else 1, 4, 2, L, 8)
    attn = ac.compile(pattern, backend="torch", schedule=ac.Schedule(block_m=block, block_n=block))
    attn.hops_mode = mode
    out = attn(q, k, v)
    ref = ac.reference(pattern, q, k, v)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert_matches_oracle(out, ref, (q, k, v), atol=1e-5, grad_atol=1e-5)


def test_default_schedule_chooses_block_and_matches_reference():
    p = diffuser(window=8, random_blocks=1, num_global=2, hops=3)
    assert choose_block(p, 300) in (32, 64, 128)
    q, k, v = _rand(1, 2, 2, 300, 8)
    attn = ac.compile(p, backend="torch")
    out = attn(q, k, v)
    stages = attn.program.stages
    assert stages[0].schedule.block_m == choose_block(p, 300)
    torch.testing.assert_close(out.double(), ac.reference(p, q, k, v), rtol=1e-5, atol=1e-5)


def test_float64_gradcheck_materialized():
    p = diffuse(ac.sliding_window(2) | ac.global_tokens([0]), hops=2, alpha=0.3)
    attn = ac.compile(p, backend="torch", schedule=ac.Schedule(block_m=4, block_n=4))
    q, k, v = (torch.randn(1, 2, 10, 3, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(lambda a, b, c: attn(a, b, c), (q, k, v))


def test_zero_hops_return_v_unchanged():
    for kernel in ("ppr", "heat"):
        p = diffuse(ac.sliding_window(3), hops=0, kernel=kernel)
        q, k, v = (torch.randn(2, 3, 20, 4) for _ in range(3))
        assert torch.equal(ac.compile(p, backend="torch")(q, k, v), v)
        assert torch.equal(ac.reference(p, q, k, v), v.double())


def test_one_hop_without_teleport_is_sparse_attention():
    base = ac.sliding_window(4) | ac.global_tokens([3])
    p = diffuse(base, hops=1, alpha=0.0)
    q, k, v = (torch.randn(1, 2, 37, 8) for _ in range(3))
    out = ac.compile(p, backend="torch", schedule=ac.Schedule(block_m=16, block_n=16))(q, k, v)
    plain = ac.compile(base, backend="torch", schedule=ac.Schedule(block_m=16, block_n=16))(q, k, v)
    torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ac.reference(p, q, k, v), ac.reference(base, q, k, v), rtol=1e-12, atol=1e-12)


def test_float16_input_keeps_dtype():
    p = diffuse(ac.sliding_window(3), hops=2)
    q, k, v = (torch.randn(1, 1, 20, 8).half() for _ in range(3))
    out = ac.compile(p, backend="torch", schedule=ac.Schedule(block_m=8, block_n=8))(q, k, v)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.double(), ac.reference(p, q, k, v), rtol=1e-2, atol=1e-2)


def test_heat_weights_and_hop_coefficients():
    p = diffuse(ac.causal(), hops=4, kernel="heat", t=1.3)
    w = p.weights()
    raw = [math.exp(-1.3) * 1.3 ** n / math.factorial(n) for n in range(5)]
    assert w == pytest.approx([x / sum(raw) for x in raw])
    # Horner recurrence reproduces sum_k w_k x^k for a scalar "P" = x.
    x, z = 0.37, 1.0
    for beta, gamma in p.hop_coefficients():
        z = beta * x * z + gamma
    assert z == pytest.approx(sum(wk * x ** n for n, wk in enumerate(w)))
    ppr = diffuse(ac.causal(), hops=3, alpha=0.25)
    assert sum(ppr.weights()) == pytest.approx(1.0)


def test_repr_reads_as_code_and_patterns_compare():
    p = diffuse(ac.sliding_window(4), hops=3, alpha=0.2)
    assert repr(p) == "ac.diffuse(ac.sliding_window(4), hops=3, alpha=0.2)"
    assert eval(repr(p), {"ac": _AcWithDiffuse}) == p
    h = diffuse(ac.causal(), hops=2, kernel="heat", t=0.5)
    assert repr(h) == 'ac.diffuse(ac.causal(), hops=2, kernel="heat", t=0.5)'
    assert hash(p) == hash(diffuse(ac.sliding_window(4), hops=3, alpha=0.2))
    assert p.causal() == diffuse(ac.sliding_window(4) & ac.causal(), hops=3, alpha=0.2)


class _AcWithDiffuse:
    sliding_window = staticmethod(ac.sliding_window)
    diffuse = staticmethod(diffuse)


@pytest.mark.parametrize("kwargs,match", [
    (dict(hops=-1), "hops"), (dict(hops=1.5), "hops"), (dict(alpha=1.5), "alpha"),
    (dict(alpha=float("nan")), "alpha"), (dict(kernel="gauss"), "kernel"),
    (dict(kernel="heat", t=0.0), "t=0.0"),
])
def test_bad_parameters_raise_pattern_error(kwargs, match):
    with pytest.raises(ac.PatternError, match=match):
        diffuse(ac.sliding_window(2), **kwargs)


def test_misuse_raises_clear_errors():
    p = diffuse(ac.sliding_window(2), hops=2)
    with pytest.raises(ac.PatternError, match="mask pattern"):
        diffuse(p)
    with pytest.raises(ac.PatternError, match="diffusion"):
        p | ac.causal()
    with pytest.raises(ac.PatternError):
        p.to_dense(8)
    with pytest.raises(ac.InputError, match="q_len=8, kv_len=9"):
        ac.compile(p, backend="torch")(torch.randn(1, 1, 8, 4), torch.randn(1, 1, 9, 4), torch.randn(1, 1, 9, 4))
    with pytest.raises(ac.InputError, match="log-sum-exp"):
        ac.compile(p, backend="torch")(*(torch.randn(1, 1, 8, 4) for _ in range(3)), return_lse=True)


def test_programs_materialize_and_recompute():
    p = diffuse(ac.sliding_window(2), hops=3)
    prog = ac.lower(p)
    names = [type(s).__name__ for s in prog.stages]
    assert names == ["SparseProbs", "DiffusionHop", "DiffusionHop", "DiffusionHop"]
    rec = [type(s).__name__ for s in recompute_hops(prog).stages]
    assert rec == ["ExpandHeads"] + ["BlockSparseAttention", "Axpby"] * 3
    assert "DiffusionHop(beta=0.9, gamma=0.1)" in str(prog)
    for program in (prog, recompute_hops(prog), ac.lower(diffuse(ac.causal(), hops=0))):
        check_program(program)  # every stage reads only values produced earlier; "out" is produced


def test_catalogue_base_graph_is_the_papers_overlapping_windows():
    # adj[s:s+w, s:s+w] = 1 for s = 0, w/2, w, ... (graphtrainer.py) equals block_window(1, w/2).
    w, L = 8, 40
    adj = torch.zeros(L, L, dtype=torch.bool)
    for s in range(0, L - w // 2, w // 2):
        adj[s:s + w, s:s + w] = True
    assert torch.equal(diffuser_graph(window=w, random_blocks=0, num_global=0).to_dense(L), adj)
    g = diffuser_graph(window=w, random_blocks=1, num_global=2, seed=3).to_dense(L)
    assert g[:2].all() and g[:, :2].all() and (g | ~adj).all()
    assert torch.equal(g, diffuser_graph(window=w, random_blocks=1, num_global=2, seed=3).to_dense(L))
    with pytest.raises(ac.PatternError, match="window"):
        diffuser_graph(window=7)


SPLITS = [
    ac.sliding_window(3) | ac.global_tokens([0, 9]),
    (ac.block_window(1, block=4) | ac.random_blocks(1, block=4, seed=1) | ac.global_tokens([2, 3])) & ac.causal(),
    (ac.sliding_window(2) | ac.global_tokens([5])) & ac.mask(lambda b, h, q_idx, kv_idx: q_idx != 7),
]


@pytest.mark.parametrize("base", SPLITS, ids=repr)
def test_global_split_partitions_the_base_graph(base):
    """light pairs + global rows + global columns (restricted by ``within``) == the base graph."""
    from attncompiler.families.diffusion.program import split_global_tokens

    L = 23
    split = split_global_tokens(base)
    assert split is not None
    dense = base.to_dense(L)
    g = torch.zeros(L, dtype=torch.bool)
    g[list(split.tokens)] = True
    within = split.within.to_dense(L) if split.within is not None else torch.ones(L, L, dtype=torch.bool)
    light = split.light.to_dense(L)
    assert not (light & (g[:, None] | g[None, :])).any()  # no pair with a global end stays in the layout
    assert torch.equal(light | ((g[:, None] | g[None, :]) & within), dense)
    assert split_global_tokens(ac.sliding_window(3)) is None
    assert split_global_tokens(ac.per_head([ac.causal(), ac.sliding_window(1) | ac.global_tokens([0])])) is None


PLANNED = [
    # varied "other" blocks per row (strided keys), ragged length, a chunk of non-consecutive rows
    (diffuse(ac.sliding_window(4) | ac.strided(11) | ac.global_tokens([1]), hops=2, alpha=0.25), 53, 8, 500),
    # no band at all (non-square blocks), one row per chunk
    (diffuse(ac.random_blocks(2, block=8, seed=4) | ac.global_tokens([0, 30]), hops=2, kernel="heat"), 40, (8, 16), 64),
]


@pytest.mark.parametrize("case", PLANNED, ids=[repr(c[0])[:60] for c in PLANNED])
def test_torch_plan_with_small_tiles_matches_reference(case):
    pattern, L, block, tile_elems = case
    bm, bn = block if isinstance(block, tuple) else (block, block)
    q, k, v = _rand(1, 2, 1, L, 8)
    sched = ac.Schedule(block_m=bm, block_n=bn, tile_elems=tile_elems)  # several chunks per bucket
    attn = ac.compile(pattern, backend="torch", schedule=sched)
    out = attn(q, k, v)
    assert attn.program.stages[0].split_globals
    assert_matches_oracle(out, ac.reference(pattern, q, k, v), (q, k, v), atol=1e-5, grad_atol=1e-5)


def test_stored_p_is_close_to_the_true_pairs_on_the_diffuser_graph():
    """Global tokens split apart: P stores about the allowed pairs, not whole global blocks."""
    from attncompiler.codegen.pytorch.diffusion_plan import plan_for
    from attncompiler.families.diffusion.program import split_global_tokens

    p, L = diffuser(), 1024
    split = split_global_tokens(p.base)
    b = choose_block(p, L)
    plan = plan_for(split.light.layout(L, L, b, b).groups[0], ac.Schedule(block_m=b, block_n=b), split)
    stored = plan.size + len(split.tokens) * L
    true = int(p.base.to_dense(L).sum())
    assert true <= stored <= 1.06 * true
    assert p.base.layout(L, L, b, b).groups[0].num_blocks * b * b > 1.3 * true  # what the split saves


def test_hops_mode_choice_per_backend():
    from attncompiler.runtime.diffusion import choose_hops_mode

    p = diffuse(ac.sliding_window(3), hops=3)
    assert choose_hops_mode(p, "torch", 64) == "materialize"
    assert choose_hops_mode(p, "triton", 64) == "recompute"  # a score is cheaper to recompute than to read
    assert choose_hops_mode(p, "triton", 512) == "materialize"
    attn = ac.compile(p, backend="triton", schedule=ac.Schedule(block_m=16, block_n=16))
    names = [type(s).__name__ for s in attn.program_for("triton", 32, 512).stages]
    assert names == ["SparseProbs"] + ["DiffusionHop"] * 3
