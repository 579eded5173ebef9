"""The fused block-sparse CPU kernels (codegen/cpu/cpu_attention.c) against a float64 dense
reference: forward (out, lse) and backward (dq, dk, dv), score mods, ragged blocks, GQA, threads
and NaN propagation. The block tables are built here from a dense mask, independently of the
layout code. Every test runs on both builds of the kernels: AVX2 (where the CPU has it) and the
generic one (vector extensions, the build of aarch64 and of x86 CPUs without AVX2)."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from attncompiler.codegen.cpu import attention as cpu_attn, build as cpu_build
from attncompiler.errors import InputError
from cpu_builds import BUILDS, use_build

pytestmark = pytest.mark.skipif(not cpu_attn.available(),
                                reason=f"CPU attention kernels unavailable: {cpu_attn.status()}")


@pytest.fixture(scope="module", autouse=True, params=BUILDS)
def variant(request):
    """The kernel build every test of this module runs on (ATTNC_CPU_KERNELS selects it)."""
    with pytest.MonkeyPatch.context() as mp:
        use_build(mp, request.param)
        lib = cpu_attn._library()
        assert lib is not None and lib is cpu_build.load("cpu_attention", request.param)
        assert cpu_attn.variant() == request.param and cpu_attn.status() == f"loaded ({request.param})"
        yield request.param


def tables_from_dense(mask: torch.Tensor, bm: int, bn: int, seed: int = 0) -> cpu_attn.KernelTables:
    """Classify the blocks of a dense [Lq, Lk] mask as full, partial (own mask id) or empty; the
    order of a row's ranges and partial blocks is shuffled (the kernels must not depend on it)."""
    Lq, Lk = mask.shape
    nqb, nkb = -(-Lq // bm), -(-Lk // bn)
    pad = torch.zeros(nqb * bm, nkb * bn, dtype=torch.bool)
    inb = torch.zeros_like(pad)
    pad[:Lq, :Lk], inb[:Lq, :Lk] = mask, True
    blocks = pad.view(nqb, bm, nkb, bn).permute(0, 2, 1, 3)
    inbb = inb.view(nqb, bm, nkb, bn).permute(0, 2, 1, 3)
    full = (blocks == inbb).all(-1).all(-1) & blocks.any(-1).any(-1)
    part = blocks.any(-1).any(-1) & ~full
    g = torch.Generator().manual_seed(seed)
    masks, mask_id = [], {}
    for r, c in part.nonzero().tolist():
        mask_id[r, c] = len(masks)
        masks.append(blocks[r, c].to(torch.uint8))

    def side(n, m, full_of, part_of, by_col):
        ptr, s, e, pptr, pcols, pmask = [0], [], [], [0], [], []
        for a in range(n):
            cols = [b for b in range(m) if full_of(a, b)]
            runs = []
            for b in cols:
                if runs and runs[-1][1] == b:
                    runs[-1][1] = b + 1
                else:
                    runs.append([b, b + 1])
            for i in torch.randperm(len(runs), generator=g).tolist():
                s.append(runs[i][0]), e.append(runs[i][1])
            ptr.append(len(s))
            parts = [b for b in range(m) if part_of(a, b)]
            for i in torch.randperm(len(parts), generator=g).tolist():
                pcols.append(parts[i])
                pmask.append(mask_id[(parts[i], a) if by_col else (a, parts[i])])
            pptr.append(len(pcols))
        t = lambda x, dt=torch.int64: torch.tensor(x, dtype=dt)  # noqa: E731
        return t(ptr), t(s), t(e), t(pptr), t(pcols), t(pmask, torch.int32)

    rows = side(nqb, nkb, lambda r, c: bool(full[r, c]), lambda r, c: bool(part[r, c]), False)
    cols = side(nkb, nqb, lambda c, r: bool(full[r, c]), lambda c, r: bool(part[r, c]), True)
    m = torch.stack(masks) if masks else torch.zeros(1, bm, bn, dtype=torch.uint8)
    return cpu_attn.KernelTables(bm, bn, nqb, nkb, *rows, *cols, m)


def reference(q, k, v, mask, scale, mods=cpu_attn.ScoreMods()):
    """float64 dense attention with the mods: (out, lse); empty rows give 0 and -inf."""
    q, k, v = q.double(), k.double(), v.double()
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    s = torch.einsum("bhqd,bhkd->bhqk", q, k) * scale
    Lq, Lk = s.shape[-2:]
    rel = (torch.arange(Lk)[None, :] - (mods.q_pos0 + torch.arange(Lq))[:, None]).double()
    for name, p in mods.ops:
        if name == "softcap":
            s = p * torch.tanh(s / p)
        else:
            s = s + mods.slopes.double()[None, :, None, None] * rel
    s = torch.where(mask, s, -math.inf)
    any_key = mask.any(-1)
    m = torch.where(any_key, s.amax(-1), 0.0).detach()
    e = torch.exp(s - m[..., None])
    z = e.sum(-1)
    out = (e / torch.where(z > 0, z, 1.0)[..., None]) @ v
    return out, torch.where(any_key, m + torch.log(torch.where(z > 0, z, 1.0)), -math.inf)


def make_mask(kind, Lq, Lk, g):
    i, j = torch.arange(Lq)[:, None], torch.arange(Lk)[None, :]
    if kind == "window":
        return (i - j).abs() <= 9
    if kind == "causal":
        return j <= i + (Lk - Lq)
    if kind == "full":  # every block full: the forward takes its row maxima from the product's tiles
        return torch.ones(Lq, Lk, dtype=torch.bool)
    m = torch.rand(Lq, Lk, generator=g) < 0.3
    m[::5] = False  # empty rows
    m[:, 3:4] = False  # and an empty column
    return m


def close(got, want, rtol=1e-4):
    """Equal to rtol relative to the largest magnitude of want (float32 kernels, float64 oracle)."""
    want = want.to(got.dtype) if not want.dtype.is_floating_point else want
    torch.testing.assert_close(got.double(), want.double(), rtol=rtol,
                               atol=rtol * max(1.0, float(want.abs().max()) if want.numel() else 0.0))


def run_case(B, H, Hkv, Lq, Lk, D, Dv, bm, bn, kind, logit, ops=(), seed=0, threads=1, rtol=1e-4):
    g = torch.Generator().manual_seed(seed)
    scale = 2.0 ** -round(math.log2(math.sqrt(D)))
    if logit <= 10:
        q, k = torch.randn(B, H, Lq, D, generator=g), torch.randn(B, Hkv, Lk, D, generator=g)
    else:  # integers and a power-of-two scale: exact float32 scores of magnitude ~logit, so the
        # comparison measures the kernels, not the conditioning of float32 scores near 1e3
        r = max(1, round(math.sqrt(3 * logit / (scale * math.sqrt(D)))))
        q = torch.randint(-r, r + 1, (B, H, Lq, D), generator=g).float()
        k = torch.randint(-r, r + 1, (B, Hkv, Lk, D), generator=g).float()
    v = torch.randn(B, Hkv, Lk, Dv, generator=g)
    mask = make_mask(kind, Lq, Lk, g)
    mods = cpu_attn.ScoreMods(ops, torch.rand(H, generator=g) * 2 if any(o[0] == "alibi" for o in ops) else None,
                              q_pos0=Lk - Lq)
    tables = tables_from_dense(mask, bm, bn, seed)
    out, lse = cpu_attn.forward(q, k, v, tables, scale, mods, threads=threads)
    qd, kd, vd = (x.double().requires_grad_() for x in (q, k, v))
    ro, rl = reference(qd, kd, vd, mask, scale, mods)
    close(out, ro.detach(), rtol)
    empty = ~mask.any(-1)
    assert torch.equal(lse[..., empty], torch.full_like(lse[..., empty], -math.inf))
    close(lse[..., ~empty], rl.detach()[..., ~empty], rtol)
    dout = torch.randn(out.shape, generator=g)
    got = cpu_attn.backward(q, k, v, out, lse, dout, tables, scale, mods, threads=threads)
    want = torch.autograd.grad(ro, (qd, kd, vd), dout.double())
    for x, y in zip(got, want):
        assert x.shape == y.shape
        close(x, y, rtol * 10)  # gradients of sharp softmaxes amplify the scores' float32 rounding
    return out, lse, got


CASES = [  # B, H, Hkv, Lq, Lk, D, Dv, bm, bn, mask, logit scale, ops
    (1, 2, 2, 64, 64, 16, 16, 16, 16, "random", 1.0, ()),
    (2, 4, 2, 37, 129, 64, 32, 16, 32, "random", 100.0, ()),
    (1, 2, 1, 129, 37, 80, 80, 32, 16, "causal", 300.0, ()),
    (1, 2, 2, 130, 130, 64, 48, 64, 64, "window", 1000.0, ()),
    (1, 2, 2, 77, 77, 20, 12, 13, 11, "window", 10.0, ()),
    (2, 4, 2, 61, 90, 32, 40, 16, 16, "random", 200.0, (("softcap", 20.0),)),
    (1, 4, 1, 70, 70, 16, 16, 16, 8, "causal", 100.0, (("alibi", 0.0),)),
    (1, 2, 2, 50, 66, 24, 16, 8, 16, "window", 100.0, (("softcap", 30.0), ("alibi", 0.0))),
    (1, 2, 2, 50, 66, 24, 16, 16, 8, "random", 100.0, (("alibi", 0.0), ("softcap", 30.0))),
    (1, 1, 1, 300, 520, 16, 8, 128, 256, "random", 100.0, ()),
    (1, 1, 1, 600, 600, 64, 64, 256, 200, "window", 100.0, (("softcap", 50.0),)),
    (2, 2, 2, 70, 61, 16, 16, 8, 16, "full", 1000.0, ()),
    (1, 2, 1, 83, 97, 32, 32, 16, 24, "full", 300.0, (("softcap", 20.0),)),
    (1, 2, 2, 131, 131, 16, 16, 24, 16, "causal", 300.0, (("softcap", 10.0),)),
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[9]}-{c[3]}x{c[4]}-D{c[5]}-{len(c[11])}ops" for c in CASES])
def test_matches_float64_reference(case):
    run_case(*case)


def dq_close(got, want):
    """dq summed from per-thread buffers: only the order of float32 additions differs."""
    close(got, want.double(), 1e-6)


def test_threads_agree():
    # out, lse, dk, dv are bit-identical for any thread count (every item writes its own rows in
    # a fixed order); dq is summed over per-thread buffers, so which thread took which key block
    # changes its rounding: it is compared at 1e-6 of its magnitude instead
    args = (2, 4, 2, 300, 350, 32, 32, 16, 32, "random", 100.0, (("softcap", 25.0),))
    one = run_case(*args, threads=1)
    for _ in range(3):
        two = run_case(*args, threads=2)
        for a, b in zip([*one[:2], *one[2][1:]], [*two[:2], *two[2][1:]]):
            assert torch.equal(a, b)
        dq_close(two[2][0], one[2][0])


@pytest.mark.parametrize("budget_heads, want_threads, want_chunks", [(0.99, 1, 1), (1, 2, 4), (2.5, 2, 2)])
def test_dq_buffer_budget(monkeypatch, budget_heads, want_threads, want_chunks):
    """Past DQ_BUFFER_BYTES the key/value heads run in chunks, and with one thread when even one
    head's dq rows (G * Lq * D floats) do not fit; results stay those of the reference."""
    B, H, Hkv, L, D = 2, 4, 2, 100, 32
    monkeypatch.setattr(cpu_attn, "DQ_BUFFER_BYTES", int(budget_heads * (H // Hkv) * L * D * 4))
    calls = []
    launch = cpu_attn._launch

    def spy(fn, a, n, extra=lambda i: ()):
        if fn is cpu_attn._library().attn_bwd:
            calls.append((n, *extra(0)[1:]))
        return launch(fn, a, n, extra)

    monkeypatch.setattr(cpu_attn, "_launch", spy)
    args = (B, H, Hkv, L, 150, D, 32, 16, 32, "random", 100.0, (("alibi", 0.0),))
    got = run_case(*args, threads=2)[2]
    assert {c[0] for c in calls} == {want_threads} and len(calls) == want_chunks
    assert calls[0][1] == 0 and calls[-1][2] == B * Hkv and all(x[2] == y[1] for x, y in zip(calls, calls[1:]))
    monkeypatch.setattr(cpu_attn, "DQ_BUFFER_BYTES", 1 << 30)
    one = run_case(*args, threads=1)[2]
    assert torch.equal(got[1], one[1]) and torch.equal(got[2], one[2])
    if want_threads == 1:
        assert torch.equal(got[0], one[0])
    dq_close(got[0], one[0])


@pytest.mark.parametrize("threads", [1, 2])
def test_empty_lengths(threads):
    """No query rows: dk = dv = 0 (the backward still visits every key block); no keys: dq = 0."""
    g = torch.Generator().manual_seed(8)
    for Lq, Lk in ((0, 20), (20, 0)):
        t = tables_from_dense(torch.ones(Lq, Lk, dtype=torch.bool), 8, 8)
        q, k = torch.randn(1, 2, Lq, 16, generator=g), torch.randn(1, 1, Lk, 16, generator=g)
        v = torch.randn(1, 1, Lk, 8, generator=g)
        out, lse = cpu_attn.forward(q, k, v, t, 0.25, threads=threads)
        dq, dk, dv = cpu_attn.backward(q, k, v, out, lse, torch.randn(out.shape, generator=g), t, 0.25, threads=threads)
        assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
        assert not dq.any() and not dk.any() and not dv.any()


def test_gradient_into_lse():
    g = torch.Generator().manual_seed(7)
    q, k = (torch.randint(-6, 7, (1, 2, 53, 16), generator=g).float() for _ in range(2))
    v = torch.randn(1, 2, 53, 24, generator=g)
    mask = make_mask("random", 53, 53, g)
    t = tables_from_dense(mask, 16, 8)
    out, lse = cpu_attn.forward(q, k, v, t, 0.25)
    dout, dlse = torch.randn(out.shape, generator=g), torch.randn(lse.shape, generator=g)
    got = cpu_attn.backward(q, k, v, out, lse, dout, t, 0.25, dlse=dlse)
    qd, kd, vd = (x.double().requires_grad_() for x in (q, k, v))
    ro, rl = reference(qd, kd, vd, mask, 0.25)
    want = torch.autograd.grad((ro, rl), (qd, kd, vd), (dout.double(), dlse.double()))
    for x, y in zip(got, want):
        close(x, y, 1e-3)


def test_without_lse_the_output_is_the_same():
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(2, 2, 45, 24, generator=g) for _ in range(3))
    t = tables_from_dense(make_mask("random", 45, 45, g), 16, 8)
    out, lse = cpu_attn.forward(q, k, v, t, 0.2)
    out2, none = cpu_attn.forward(q, k, v, t, 0.2, need_lse=False, threads=2)
    assert none is None and torch.equal(out, out2)


def test_nan_in_one_query_row_stays_in_that_row():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 48, 16, generator=g) for _ in range(3))
    mask = make_mask("window", 48, 48, g)
    tables = tables_from_dense(mask, 16, 16)
    q[0, 1, 20, 5] = math.nan
    out, lse = cpu_attn.forward(q, k, v, tables, 0.25)
    assert out[0, 1, 20].isnan().all() and lse[0, 1, 20].isnan()
    rest = torch.ones(48, dtype=torch.bool)
    rest[20] = False
    assert out[0, 0].isfinite().all() and out[0, 1, rest].isfinite().all() and lse[0, 1, rest].isfinite().all()
    dq, dk, dv = cpu_attn.backward(q, k, v, out, lse, torch.randn(out.shape, generator=g), tables, 0.25)
    seen = mask[20]  # keys visible to the NaN row (query head 1 reads key/value head 1)
    assert dq[0, 1, 20].isnan().all() and dv[0, 1, seen].isnan().all() and dk[0, 1, seen].isnan().all()
    # masked entries of P and dS are exactly 0 (dk of an unseen key may still be 0 * NaN, as in a
    # dense product)
    assert dv[0, 1, ~seen].isfinite().all()
    assert dq[0, 1, rest].isfinite().all() and dq[0, 0].isfinite().all() and dk[0, 0].isfinite().all()


def test_nan_key_or_value_reaches_the_rows_that_see_it():
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 1, 40, 16, generator=g) for _ in range(3))
    mask = make_mask("window", 40, 40, g)
    t = tables_from_dense(mask, 8, 8)
    sees = mask[:, 30]
    k2 = k.clone()
    k2[0, 0, 30, 0] = math.nan
    out, lse = cpu_attn.forward(q, k2, v, t, 0.25)
    assert out[0, 0, sees].isnan().all() and lse[0, 0, sees].isnan().all()
    assert out[0, 0, ~sees].isfinite().all() and lse[0, 0, ~sees].isfinite().all()
    dq, dk, dv = cpu_attn.backward(q, k2, v, out, lse, torch.randn(out.shape, generator=g), t, 0.25)
    # rows in blocks that never meet key block 3 stay finite (in a shared block, 0 * NaN makes
    # NaN, as in a dense product)
    assert dq[0, 0, sees].isnan().all() and dq[0, 0, :8].isfinite().all()
    v2 = v.clone()
    v2[0, 0, 30, 3] = math.nan
    out, lse = cpu_attn.forward(q, k, v2, t, 0.25)
    assert out[0, 0, sees, 3].isnan().all() and lse.isfinite().all() and out[0, 0, :8].isfinite().all()


@pytest.mark.parametrize("ops", [(), (("softcap", 20.0),)])
def test_nan_score_in_a_full_block_turns_its_rows_nan(ops):
    """Full blocks take their row maxima from the product's tiles, where max skips NaN: the NaN
    still reaches out, lse and the gradients of exactly the rows that see it (its exponential is
    NaN), with and without softcap; every other row matches the float64 reference."""
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 1, 48, 16, generator=g) * 3 for _ in range(3))
    mask = make_mask("full", 48, 48, g)
    mask[:16, 40:] = False  # query block 0 never meets the key with the NaN; the other blocks stay full
    t = tables_from_dense(mask, 16, 8)
    mods = cpu_attn.ScoreMods(ops)
    k[0, 0, 44, 2] = math.nan
    sees = mask[:, 44]
    out, lse = cpu_attn.forward(q, k, v, t, 0.25, mods)
    assert out[0, 0, sees].isnan().all() and lse[0, 0, sees].isnan().all()
    ro, rl = reference(q.double(), k.double(), v.double(), mask, 0.25, mods)
    close(out[0, 0, ~sees], ro[0, 0, ~sees])
    close(lse[0, 0, ~sees], rl[0, 0, ~sees])
    dq, _, _ = cpu_attn.backward(q, k, v, out, lse, torch.randn(out.shape, generator=g), t, 0.25, mods)
    assert dq[0, 0, sees].isnan().all() and dq[0, 0, ~sees].isfinite().all()


def test_block_order_does_not_matter():
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 1, 96, 16, generator=g) * 10 for _ in range(3))
    mask = make_mask("random", 96, 96, g)
    a = cpu_attn.forward(q, k, v, tables_from_dense(mask, 16, 16, seed=1), 0.25)[0]
    b = cpu_attn.forward(q, k, v, tables_from_dense(mask, 16, 16, seed=2), 0.25)[0]
    close(a, b.double(), 1e-5)


def test_bad_tables_and_inputs_raise():
    mask = make_mask("window", 32, 32, torch.Generator().manual_seed(0))
    t = tables_from_dense(mask, 16, 16)
    q = torch.randn(1, 1, 32, 16)
    with pytest.raises(InputError, match="Lq=33"):
        cpu_attn.forward(torch.randn(1, 1, 33, 16), q, q, t, 1.0)
    for field in ("part_cols", "col_part_rows"):
        bad = cpu_attn.KernelTables(**{**t.__dict__, field: getattr(t, field) + 5})
        with pytest.raises(InputError, match="outside"):
            cpu_attn.forward(q, q, q, bad, 1.0)
    causal = tables_from_dense(make_mask("causal", 32, 32, None), 8, 8)
    assert causal.range_end.numel() > 0
    for change in ({"range_end": causal.range_end + 1}, {"part_mask": causal.part_mask + 100},
                   {"range_ptr": causal.range_ptr.flip(0)}):
        with pytest.raises(InputError):
            cpu_attn.forward(q, q, q, cpu_attn.KernelTables(**{**causal.__dict__, **change}), 1.0)
    with pytest.raises(InputError, match="float32"):
        cpu_attn.forward(q.double(), q, q, t, 1.0)
    with pytest.raises(InputError, match="slopes"):
        cpu_attn.forward(q, q, q, t, 1.0, cpu_attn.ScoreMods((("alibi", 0.0),)))
    with pytest.raises(TypeError):
        cpu_attn.forward(q, q, q, t, 1.0, bogus=1)


@given(B=st.integers(1, 2), Hkv=st.integers(1, 2), G=st.integers(1, 2), Lq=st.integers(1, 70),
       Lk=st.integers(1, 70), D=st.sampled_from([8, 16, 24, 36]), Dv=st.sampled_from([8, 16, 20]),
       bm=st.integers(1, 40), bn=st.integers(1, 40), kind=st.sampled_from(["random", "window", "causal"]),
       logit=st.sampled_from([1.0, 100.0, 1000.0]), ops=st.sampled_from([(), (("softcap", 15.0),),
                                                                         (("alibi", 0.0), ("softcap", 40.0))]),
       seed=st.integers(0, 1000))
def test_property_random_shapes(B, Hkv, G, Lq, Lk, D, Dv, bm, bn, kind, logit, ops, seed):
    run_case(B, G * Hkv, Hkv, Lq, Lk, D, Dv, bm, bn, kind, logit, ops, seed=seed, threads=1 + seed % 2)
