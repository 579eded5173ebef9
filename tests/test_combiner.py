"""Combiner: reference vs an independent loop over queries, torch backend vs reference (forward
and backward), causal leak checks, the joint mask's predicate vs its span table, and errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import attncompiler as ac
from attncompiler.families import combiner as C
from attncompiler.families.combiner.joint import slot_plan
from attncompiler.program.stages import BlockSparseAttention
from oracle import assert_matches_oracle

SCHED = ac.Schedule(block_m=16, block_n=16)

VARIANTS = [
    C.combiner_fixed(4), C.combiner_fixed(4, causal=True), C.combiner_fixed(5, pool="mean"),
    C.combiner_logsparse(), C.combiner_logsparse(causal=True), C.combiner_logsparse(pool="mean"),
    C.combiner_axial(5), C.combiner_axial(5, causal=True),
    C.combiner_axial(4, variant="horizontal"), C.combiner_axial(4, variant="horizontal", causal=True),
    C.combiner_axial(5, variant="rowmajor"), C.combiner_axial(5, variant="rowmajor", causal=True),
    C.combiner_axial(4, causal=True, pool="mean"),
    C.combiner_mixture(C.combiner_axial(5), C.combiner_axial(5, variant="horizontal")),
    C.combiner_mixture(C.combiner_fixed(4, causal=True), C.combiner_logsparse(causal=True)),
]


# ---------------------------------------------------------------------------------------------
# An independent implementation, written from the equations (one query at a time)
# ---------------------------------------------------------------------------------------------

def _sets(f, i: int, L: int) -> tuple[list[int], list[list[int]]]:
    """``(D_i, R_i)`` straight from the definitions; spans as lists of positions."""
    causal = f.autoregressive
    if isinstance(f, C.CombinerFixed) or (isinstance(f, C.CombinerAxial) and f.variant == "horizontal"):
        w = f.span if isinstance(f, C.CombinerFixed) else f.cols
        own = i // w
        direct = [j for j in range(L) if j // w == own and (not causal or j <= i)]
        spans = [[j for j in range(L) if j // w == m] for m in range(math.ceil(L / w))
                 if (m < own if causal else m != own)]
        return direct, spans
    if isinstance(f, C.CombinerLogsparse):
        spans = []
        t = 0
        while (1 << t) < L:  # siblings of i's ancestors in the dyadic tree
            anc, w = i >> t, 1 << t
            if anc % 2 == 1:
                spans.append(list(range((anc - 1) * w, anc * w)))
            elif not causal:
                spans.append([j for j in range((anc + 1) * w, (anc + 2) * w) if j < L])
            t += 1
        return [i], [s for s in spans if s]
    Cc = f.cols
    c = i % Cc
    if f.variant == "vertical":
        direct = [j for j in range(L) if j % Cc == c and (not causal or j <= i)]
        spans = [[j for j in range(L) if j % Cc == c2 and (not causal or j < i)] for c2 in range(Cc) if c2 != c]
        return direct, [s for s in spans if s]
    direct = [j for j in range(L) if abs(i - j) <= Cc - 1 and (not causal or j <= i)]
    spans = [[j for j in range(L) if j % Cc == c2 and j <= i - Cc] for c2 in range(Cc)]
    if not causal:
        spans += [[j for j in range(L) if j % Cc == c2 and j >= i + Cc] for c2 in range(Cc)]
    return direct, [s for s in spans if s]


def loop_combiner(f, q, k, v, scale):
    """Float64 Combiner attention, one query at a time (q, k, v ``[L, D]``)."""
    L = q.shape[0]
    out = torch.zeros(L, v.shape[1], dtype=torch.float64)
    for i in range(L):
        direct, spans = _sets(f, i, L)
        keys, vals = [k[j] for j in direct], [v[j] for j in direct]
        for S in spans:
            pool = (lambda x: x[S].amax(0)) if f.pool == "max" else (lambda x: x[S].mean(0))
            qS, kS = pool(q), pool(k)
            w = torch.softmax(scale * (k[S] @ qS), dim=0)
            keys.append(kS)
            vals.append(w @ v[S])
        p = torch.softmax(scale * (torch.stack(keys) @ q[i]), dim=0)
        out[i] = p @ torch.stack(vals)
    return out


def loop_reference(pattern, q, k, v, scale):
    B, H = q.shape[:2]
    out = torch.zeros(*q.shape[:3], v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            parts = [loop_combiner(f, q[b, h].double(), k[b, h].double(), v[b, h].double(), scale)
                     for f in pattern.factorizations()]
            out[b, h] = sum(parts) / len(parts)
    return out


def _qkv(L, B=1, H=2, D=8, dtype=torch.float64, grad=False):
    return tuple(torch.randn(B, H, L, D, dtype=dtype, requires_grad=grad) for _ in range(3))


@pytest.mark.parametrize("pattern", VARIANTS, ids=repr)
@pytest.mark.parametrize("L", [19])
def test_reference_matches_loop(pattern, L):
    q, k, v = _qkv(L)
    ref = ac.reference(pattern, q, k, v)
    torch.testing.assert_close(ref, loop_reference(pattern, q, k, v, 8 ** -0.5), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("pattern", VARIANTS, ids=repr)
@pytest.mark.parametrize("L", [23])
def test_torch_matches_reference_fwd_bwd(pattern, L):
    q, k, v = _qkv(L, B=2, dtype=torch.float32, grad=True)
    out = ac.compile(pattern, backend="torch", schedule=SCHED)(q, k, v)
    ref = ac.reference(pattern, q, k, v)
    assert out.dtype == torch.float32
    assert_matches_oracle(out, ref, (q, k, v))


@settings(max_examples=20)
@given(L=st.integers(1, 40), span=st.integers(1, 9), kind=st.sampled_from(["fixed", "log", "vert", "hor", "row"]),
       causal=st.booleans(), block=st.sampled_from([8, 16]))
def test_torch_matches_reference_property(L, span, kind, causal, block):
    make = {"fixed": lambda: C.combiner_fixed(span, causal=causal),
            "log": lambda: C.combiner_logsparse(causal=causal),
            "vert": lambda: C.combiner_axial(span, causal=causal),
            "hor": lambda: C.combiner_axial(span, variant="horizontal", causal=causal),
            "row": lambda: C.combiner_axial(span + 1, variant="rowmajor", causal=causal)}
    p = make[kind]()
    q, k, v = _qkv(L, H=1, D=4)
    out = ac.compile(p, backend="torch", schedule=ac.Schedule(block_m=block, block_n=block))(q, k, v)
    torch.testing.assert_close(out, loop_reference(p, q, k, v, 0.5), rtol=1e-9, atol=1e-9)


def test_gqa_and_scale():
    p = C.combiner_fixed(4, causal=True)
    q = torch.randn(1, 4, 18, 8, dtype=torch.float64)
    k, v = torch.randn(1, 2, 18, 8, dtype=torch.float64), torch.randn(1, 2, 18, 8, dtype=torch.float64)
    out = ac.compile(p, backend="torch", schedule=SCHED)(q, k, v, scale=0.3)
    ke, ve = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    torch.testing.assert_close(out, loop_reference(p, q, ke, ve, 0.3))


@pytest.mark.parametrize("pattern", [p for p in VARIANTS if all(f.autoregressive for f in p.factorizations())], ids=repr)
def test_causal_variants_leak_nothing(pattern):
    L = 37
    q, k, v = _qkv(L, dtype=torch.float32)
    attn = ac.compile(pattern, backend="torch", schedule=SCHED)
    base = attn(q, k, v)
    for pos in (5, 20, 36):
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        for t in (q2, k2, v2):
            t[:, :, pos] += 3.0
        out = attn(q2, k2, v2)
        assert torch.equal(out[:, :, :pos], base[:, :, :pos]), f"position {pos} leaked into earlier outputs"
        assert not torch.equal(out[:, :, pos], base[:, :, pos])


@pytest.mark.parametrize("pack", [None, (8, 8)], ids=["shared", "pack8"])
@pytest.mark.parametrize("pattern", [f for p in VARIANTS for f in p.factorizations()], ids=repr)
def test_joint_predicate_matches_span_table(pattern, pack):
    L = 29
    joint = C.JointMask(pattern, 32, pack)
    table = C.span_table(pattern, L)
    plan = slot_plan(joint, L)
    dense = joint.to_dense(L, joint.kv_len(L))
    off = joint.offset(L)
    order = pattern.token_order(L)
    order = torch.arange(L) if order is None else torch.from_numpy(order)  # rows/columns in token order
    assert torch.equal(dense[:, :L], pattern.direct().to_dense(L)[order][:, order])
    assert not dense[:, L:off].any()
    # Each summary a query reads is visible through exactly one slot (a second copy would count
    # twice in the softmax); padding slots are never visible.
    S = table.num_summaries
    held = torch.zeros(plan.num_slots, S + 1, dtype=torch.float64)
    held[torch.arange(plan.num_slots), torch.from_numpy(np.where(plan.summary >= 0, plan.summary, S))] = 1
    reads = dense[:, off:].double() @ held  # [L, S + 1]: how many visible slots hold each summary
    assert not reads[:, S].any()
    assert torch.equal(reads[:, :S], C.summary_readers(table)[order].double())
    # The analytic layout equals the layout of the dense mask.
    lay = joint.layout(L, joint.kv_len(L), 8, 8)
    blocks = lay.groups[0]
    for r in range(lay.num_q_blocks):
        for c in range(lay.num_kv_blocks):
            tile = dense[r * 8:(r + 1) * 8, c * 8:(c + 1) * 8]
            sel = (blocks.rows == r) & (blocks.cols == c)
            assert bool(sel.any()) == bool(tile.any())
            if sel.any():
                assert bool(blocks.full[sel][0]) == bool(tile.all() and tile.numel() == 64)


@pytest.mark.parametrize("pattern, packed", [
    (C.combiner_logsparse(causal=True), True),  # one summary per dyadic level: far apart in id order
    (C.combiner_logsparse(), True),
    (C.combiner_fixed(32, causal=True), False),  # the earlier spans are already contiguous
    (C.combiner_axial(32), False),
], ids=repr)
def test_slot_arrangement_needs_fewer_blocks(pattern, packed):
    L, block = 1024, (64, 64)
    shared, chosen = C.JointMask(pattern, 128), C.JointMask(pattern, 128, block)
    plan = slot_plan(chosen, L)
    assert plan.packed == packed
    n_shared = shared.layout(L, None, *block).num_blocks
    n_chosen = chosen.layout(L, None, *block).num_blocks
    assert n_chosen < n_shared if packed else n_chosen <= n_shared
    assert plan.num_slots % block[1] == 0  # whole key blocks: the attention never pads k/v
    if packed:  # at most a few key blocks of summaries per block of 64 queries
        assert n_chosen <= 5 * (L // 64)
    prog = ac.lower(pattern, ac.Schedule(block_m=64, block_n=64))
    assert [s.pattern.pack for s in prog.stages if isinstance(s, BlockSparseAttention)] == [block]


def test_lse_and_no_lse_for_mixture():
    q, k, v = _qkv(20)
    p = C.combiner_fixed(4)
    out, lse = ac.compile(p, backend="torch", schedule=SCHED)(q, k, v, return_lse=True)
    _, ref_lse = ac.reference(p, q, k, v, return_lse=True)
    torch.testing.assert_close(lse.double(), ref_lse)
    m = C.combiner_mixture(C.combiner_fixed(4), C.combiner_logsparse())
    assert ac.compile(m, backend="torch", schedule=SCHED)(q, k, v, return_lse=True)[1] is None


def test_program_structure_and_repr():
    p = C.combiner_axial(8, variant="rowmajor", causal=True, pool="mean")
    assert repr(p) == "ac.combiner_axial(8, variant='rowmajor', causal=True, pool='mean')"
    assert eval(repr(p), {"ac": C}) == p
    assert C.combiner_fixed(4).causal() == C.combiner_fixed(4, causal=True)
    prog = ac.lower(p, SCHED)
    kinds = [type(s).__name__ for s in prog.stages]
    assert kinds == ["SpanPool", "SpanAttention", "ConcatSummaries", "BlockSparseAttention"]
    vertical = [type(s).__name__ for s in ac.lower(C.combiner_axial(8), SCHED).stages]
    assert vertical[3:] == ["ReorderTokens", "BlockSparseAttention", "ReorderTokens"]
    assert hash(p) == hash(C.combiner_axial(8, variant="rowmajor", causal=True, pool="mean"))


def test_errors():
    with pytest.raises(ac.PatternError, match="span"):
        C.combiner_fixed(0)
    with pytest.raises(ac.PatternError, match="pool"):
        C.combiner_fixed(4, pool="min")
    with pytest.raises(ac.PatternError, match="variant"):
        C.combiner_axial(4, variant="diagonal")
    with pytest.raises(ac.PatternError, match="at least 2"):
        C.combiner_mixture(C.combiner_fixed(4))
    with pytest.raises(ac.PatternError, match="combiner"):
        C.combiner_fixed(4) | ac.causal()
    q, k, v = _qkv(12)
    with pytest.raises(ac.InputError, match="rows=3"):
        ac.compile(C.combiner_axial(5, rows=3), backend="torch")(q, k, v)
    with pytest.raises(ac.InputError, match="self-attention"):
        ac.compile(C.combiner_fixed(4), backend="torch")(q, k[:, :, :10], v[:, :, :10])


def test_catalogue_entries():
    from attncompiler.patterns import combiner as cat

    q, k, v = _qkv(24)
    for make in (cat.combiner_fixed, cat.combiner_logsparse, cat.combiner_axial, cat.combiner_mixture):
        p = make()
        assert "Ren et al. 2021" in make.__doc__
        small = {"combiner_fixed": lambda: make(span=5), "combiner_axial": lambda: make(cols=5),
                 "combiner_mixture": lambda: make(cols=5)}.get(make.__name__, make)()
        assert p.family == "combiner"
        out = ac.compile(small, backend="torch", schedule=SCHED)(q, k, v)
        torch.testing.assert_close(out, loop_reference(small, q, k, v, 8 ** -0.5))


def test_mixture_per_part_methods_name_the_parts():
    m = C.combiner_mixture(C.combiner_fixed(4), C.combiner_logsparse())
    for call in (m.direct, lambda: m.build_table(64), lambda: m.summary_relation(None, None, None)):
        with pytest.raises(ac.PatternError, match="factorizations"):
            call()
