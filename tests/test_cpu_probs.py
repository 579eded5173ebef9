"""Stored attention probabilities (cross-layer reuse) through the fused CPU kernel ``attn_probs``:
``attention_with_probs`` on float32 CPU tensors against the ATen path of the same plan (P in the
same tile layout) and against the float64 reference (out, P, gradients through a second use of
P), on windows, causal windows, global tokens, bigbird random blocks, GQA, odd lengths, ragged
blocks (in-place tiles when bn % 8 == 0, the scratch path otherwise), logits in the hundreds,
empty rows and empty query blocks; both kernel builds; NaN propagation; the wrapper's checks.
``apply_probs``' forward through ``attn_apply`` likewise (vs the ATen path and P @ v in float64)."""

import math

import pytest
import torch

import attncompiler as ac
from attncompiler import patterns as catalogue
from attncompiler.codegen.cpu import attention as cpu_attn
from attncompiler.codegen.cpu.tables import kernel_tables
from attncompiler.codegen.pytorch import fused_cpu
from attncompiler.codegen.pytorch.probs import (ProbsWorkspace, StoredProbs, _kernel_rows, apply_probs,
                                                attention_with_probs, probs_plan)
from attncompiler.program.schedule import Schedule
from cpu_builds import BUILDS, use_build

pytestmark = pytest.mark.skipif(not fused_cpu.enabled(), reason=f"CPU kernels unavailable: {cpu_attn.status()}")

_BIGBIRD = catalogue.bigbird(block=8, window_blocks=3, global_blocks=1, random_blocks=2, seed=3)
PATTERNS = {
    "window": ac.sliding_window(5),
    "causal_window": ac.sliding_window(9) & ac.causal(),
    "window_causal_global": ac.sliding_window(3) & ac.causal() | ac.global_tokens([0, 7]),
    "bigbird": _BIGBIRD,
    "strictly_causal_empty_row": ac.causal() & ~ac.sliding_window(0),
    "empty_query_blocks": ac.causal() & ~ac.sliding_window(12),
}
# (L, bm, bn, tile_elems): in-place tiles (bn % 8 == 0), ragged scratch tiles, several chunks
GEOMS = [(45, 8, 8, 256), (47, 6, 5, 512), (61, 16, 16, 2048)]


def _inputs(L, H, Hkv, D, mag, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, H, L, D, generator=g) * mag
    k = torch.randn(2, Hkv, L, D, generator=g) * mag
    v1, v2 = (torch.randn(2, Hkv, L, D, generator=g) for _ in range(2))
    return q, k, v1, v2


def _run(q, k, v1, v2, layout, sched, scale, grad=False):
    """``(out + 2 * apply_probs(P, v2), P dense, grads or None)`` of attention_with_probs."""
    ts = [t.clone().requires_grad_(grad) for t in (q, k, v1, v2)]
    out, probs = attention_with_probs(*ts[:3], layout, sched, scale)
    y = out + 2 * apply_probs(probs, ts[3])
    grads = torch.autograd.grad(y, ts, torch.ones_like(y) * torch.linspace(-1, 1, y.shape[2])[:, None]) \
        if grad else None
    return y.detach(), probs, grads


def _dense_probs(pattern, q, k, scale):
    L = q.shape[2]
    s = (q @ k.transpose(-1, -2)) * scale
    return torch.nan_to_num(torch.softmax(s.masked_fill(~pattern.to_dense(L), float("-inf")), dim=-1))


@pytest.mark.parametrize("geom", GEOMS, ids=lambda g: f"L{g[0]}_b{g[1]}x{g[2]}")
@pytest.mark.parametrize("heads, kv_heads", [(3, 3), (4, 2)])
@pytest.mark.parametrize("name", list(PATTERNS))
@pytest.mark.parametrize("mag", [1.0, 9.0], ids=["unit", "logits_hundreds"])
def test_kernel_probs_equal_aten_path_and_reference(name, heads, kv_heads, geom, mag):
    """out, P and the gradients through both uses of P: kernel vs the ATen path (same tiles) and
    vs the float64 reference."""
    pattern = PATTERNS[name]
    L, bm, bn, tile = geom
    D = 16
    sched = Schedule(block_m=bm, block_n=bn, tile_elems=tile)
    layout = pattern.layout(L, L, bm, bn, batch=2, heads=heads)
    assert kernel_tables(layout.groups[0]) is not None
    q, k, v1, v2 = _inputs(L, heads, kv_heads, D, mag, seed=list(PATTERNS).index(name) * 100 + L)
    scale = D ** -0.5
    if mag > 1:  # logits in the hundreds
        assert float((q[:, :1] @ k[:, :1].transpose(-1, -2)).abs().max()) * scale > 200
    y, probs, grads = _run(q, k, v1, v2, layout, sched, scale, grad=True)
    with fused_cpu.disabled():
        y_a, probs_a, grads_a = _run(q, k, v1, v2, layout, sched, scale, grad=True)
    tol = dict(rtol=1e-4, atol=1e-4) if mag == 1 else dict(rtol=2e-3, atol=2e-3)
    # the kernel wrote every stored entry in the ATen path's layout (padding and ragged rows 0 there)
    assert probs.p.shape == probs_a.p.shape and bool(torch.isfinite(probs.p).all())
    torch.testing.assert_close(probs.to_dense(), probs_a.to_dense(), **tol)
    torch.testing.assert_close(y, y_a, **tol)
    G = heads // kv_heads
    qd, kd, v1d, v2d = (t.double().requires_grad_() for t in (q, k, v1, v2))
    kr, v1r, v2r = (t.repeat_interleave(G, 1) for t in (kd, v1d, v2d))
    want = ac.reference(pattern, qd, kr, v1r, scale=scale) + 2 * ac.reference(pattern, qd, kr, v2r, scale=scale)
    torch.testing.assert_close(y.double(), want.detach(), **tol)
    torch.testing.assert_close(probs.to_dense().double(), _dense_probs(pattern, qd, kr, scale).detach(), **tol)
    g_want = torch.autograd.grad(want, [qd, kd, v1d, v2d], torch.ones_like(want) * torch.linspace(-1, 1, L)[:, None]
                                 .double())
    gtol = dict(rtol=1e-3, atol=1e-3) if mag == 1 else dict(rtol=2e-2, atol=2e-2 * mag)
    for a, b, w in zip(grads, grads_a, g_want):
        torch.testing.assert_close(a, b, **gtol)
        torch.testing.assert_close(a.double(), w, **gtol)


def test_empty_rows_and_query_blocks_are_zero():
    """A row that sees no key, and whole query blocks with none, give out 0 and P 0."""
    L, D = 29, 8
    pattern = PATTERNS["empty_query_blocks"]  # query rows 0..12 see no key
    layout = pattern.layout(L, L, 8, 8, batch=2, heads=2)
    q, k, v, _ = _inputs(L, 2, 2, D, 1.0, seed=5)
    out, probs = attention_with_probs(q, k, v, layout, Schedule(block_m=8, block_n=8, tile_elems=128), 0.3)
    assert bool((out[:, :, :13] == 0).all()) and bool((out[:, :, 13:].abs().sum(-1) > 0).all())
    dense = probs.to_dense()
    assert bool((dense[:, :, :13] == 0).all())
    torch.testing.assert_close(dense[:, :, 13:].sum(-1), torch.ones(2, 2, L - 13))


@pytest.mark.parametrize("build", BUILDS)
def test_both_kernel_builds(build, monkeypatch):
    """The avx2 and the generic build of attn_probs give the ATen path's out and P (ragged
    scratch tiles and in-place tiles, GQA)."""
    use_build(monkeypatch, build)
    assert cpu_attn.variant() == build and cpu_attn.available()
    for L, bm, bn in ((47, 6, 5), (50, 8, 16)):
        pattern = PATTERNS["window_causal_global"]
        layout = pattern.layout(L, L, bm, bn, batch=2, heads=4)
        sched = Schedule(block_m=bm, block_n=bn, tile_elems=512)
        q, k, v, _ = _inputs(L, 4, 2, 16, 3.0, seed=L)
        out, probs = attention_with_probs(q, k, v, layout, sched, 0.25)
        with fused_cpu.disabled():
            out_a, probs_a = attention_with_probs(q, k, v, layout, sched, 0.25)
        torch.testing.assert_close(out, out_a, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(probs.to_dense(), probs_a.to_dense(), rtol=1e-4, atol=1e-4)


def test_nan_in_one_query_row_reaches_its_outputs_only():
    """A NaN in one query row makes that row's P and out NaN (never a plausible number); every
    other row equals the run without the NaN."""
    L, D = 45, 16
    pattern = PATTERNS["window_causal_global"]
    layout = pattern.layout(L, L, 8, 8, batch=2, heads=4)
    sched = Schedule(block_m=8, block_n=8, tile_elems=256)
    q, k, v, _ = _inputs(L, 4, 2, D, 1.0, seed=11)
    out0, probs0 = attention_with_probs(q, k, v, layout, sched, 0.25)
    q[1, 2, 20, 3] = math.nan
    out, probs = attention_with_probs(q, k, v, layout, sched, 0.25)
    assert bool(out[1, 2, 20].isnan().all())
    dense, dense0 = probs.to_dense(), probs0.to_dense()
    row = dense[1, 2, 20]
    assert bool(row[pattern.to_dense(L)[20]].isnan().all())
    keep = torch.ones_like(out, dtype=torch.bool)
    keep[1, 2, 20] = False
    assert bool(torch.isfinite(out[keep]).all())
    torch.testing.assert_close(out[keep], out0[keep], rtol=0, atol=0)
    keep_p = torch.ones_like(dense, dtype=torch.bool)
    keep_p[1, 2, 20] = False
    torch.testing.assert_close(dense[keep_p], dense0[keep_p], rtol=0, atol=0)


def test_workspace_storage_is_fully_overwritten():
    """Every stored entry is written by the kernel: a recycled buffer full of NaN leaves none."""
    L = 47
    pattern = PATTERNS["bigbird"]
    layout = pattern.layout(L, L, 6, 5, batch=2, heads=2)
    sched = Schedule(block_m=6, block_n=5, tile_elems=256)
    q, k, v, _ = _inputs(L, 2, 2, 8, 1.0, seed=2)
    ws = ProbsWorkspace()
    out0, probs0 = attention_with_probs(q, k, v, layout, sched, 0.3)
    probs0.p.fill_(math.nan)
    ws.release(probs0)
    out, probs = attention_with_probs(q, k, v, layout, sched, 0.3, workspace=ws)
    assert probs.p.data_ptr() == probs0.p.data_ptr() and bool(torch.isfinite(probs.p).all())
    torch.testing.assert_close(out, out0, rtol=0, atol=0)


def test_wrapper_checks_rows_and_storage():
    """probs_forward names bad rows, storage and head groupings instead of reading out of bounds."""
    L = 40
    layout = PATTERNS["window"].layout(L, L, 8, 8, batch=1, heads=2)
    blocks = layout.groups[0]
    tables = kernel_tables(blocks)
    plan = probs_plan(blocks, Schedule(block_m=8, block_n=8, tile_elems=256), 1)
    rows = _kernel_rows(plan, tables)
    q, k, v, _ = _inputs(L, 2, 2, 8, 1.0, seed=1)
    q, k, v = q[:1], k[:1], v[:1]
    out, p = cpu_attn.probs_forward(q, k, v, tables, rows, 0.3, threads=2)
    torch.testing.assert_close(StoredProbs(p, plan, 2).to_dense(), _dense_probs(PATTERNS["window"], q, k, 0.3))
    bad = cpu_attn.ProbsRows(rows.qb, rows.width, rows.offset + 1, rows.start, rows.cols, rows.kind, rows.size, 1)
    with pytest.raises(ac.InputError, match="storage"):
        cpu_attn.probs_forward(q, k, v, tables, bad, 0.3)
    kinds = rows.kind.clone()
    kinds[0] = int(tables.masks.shape[0])
    bad = cpu_attn.ProbsRows(rows.qb, rows.width, rows.offset, rows.start, rows.cols, kinds, rows.size, 1)
    with pytest.raises(ac.InputError, match="kind"):
        cpu_attn.probs_forward(q, k, v, tables, bad, 0.3)
    with pytest.raises(ac.InputError, match="group"):
        cpu_attn.probs_forward(q, k[:, :1], v[:, :1], tables, rows, 0.3)
    with pytest.raises(ac.InputError, match="elements"):
        cpu_attn.probs_forward(q, k, v, tables, rows, 0.3, p=torch.empty(rows.size))


# apply_probs' forward through the fused kernel ``attn_apply`` (the backward stays ATen)

def _spy_apply(monkeypatch) -> list:
    """Count the calls of the kernel wrapper, so a test fails if the kernel path is not taken."""
    calls, real = [], cpu_attn.apply_forward

    def spy(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(cpu_attn, "apply_forward", spy)
    return calls


@pytest.mark.parametrize("geom", GEOMS, ids=lambda g: f"L{g[0]}_b{g[1]}x{g[2]}")
@pytest.mark.parametrize("heads, kv_heads", [(3, 3), (4, 2)])
@pytest.mark.parametrize("name", ["window", "window_causal_global", "bigbird", "empty_query_blocks"])
def test_apply_kernel_equals_aten_path_and_float64(name, heads, kv_heads, geom, monkeypatch):
    """apply_probs on float32 CPU (kernel) against the ATen path on the same stored P and against
    P @ v in float64 from the stored P; odd value width (padded to 8 in the wrapper), ragged
    blocks, GQA, logits in the hundreds; gradients in q, k, v and v2 equal the ATen path's."""
    pattern = PATTERNS[name]
    L, bm, bn, tile = geom
    sched = Schedule(block_m=bm, block_n=bn, tile_elems=tile)
    layout = pattern.layout(L, L, bm, bn, batch=2, heads=heads)
    q, k, v, _ = _inputs(L, heads, kv_heads, 16, 9.0, seed=L + heads)
    v2 = torch.randn(2, kv_heads, L, 13, generator=torch.Generator().manual_seed(L)) * 50
    calls = _spy_apply(monkeypatch)
    ts = [t.clone().requires_grad_() for t in (q, k, v, v2)]
    _, probs = attention_with_probs(*ts[:3], layout, sched, 0.25)
    y = apply_probs(probs, ts[3])
    assert calls, "apply_probs did not run the kernel"
    w = torch.linspace(-1, 1, L)[:, None].expand(L, 13)
    grads = torch.autograd.grad(y, ts, w.expand_as(y))
    with fused_cpu.disabled():
        y_a = apply_probs(probs, v2)
        ts_a = [t.clone().requires_grad_() for t in (q, k, v, v2)]
        _, probs_a = attention_with_probs(*ts_a[:3], layout, sched, 0.25)
        grads_a = torch.autograd.grad(apply_probs(probs_a, ts_a[3]), ts_a, w.expand_as(y))
    assert len(calls) == 1
    torch.testing.assert_close(y.detach(), y_a.detach(), rtol=1e-5, atol=1e-4)
    want = probs.to_dense().detach().double() @ v2.double().repeat_interleave(heads // kv_heads, 1)
    torch.testing.assert_close(y.detach().double(), want, rtol=1e-5, atol=1e-4)
    for a, b in zip(grads, grads_a):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3 * float(b.abs().max()))


def test_apply_kernel_on_selected_heads_and_wrapper_checks():
    """Selected heads (a non-contiguous view of P) give the ATen path's result; the wrapper
    names a P that does not match the rows' storage."""
    L = 47
    layout = PATTERNS["bigbird"].layout(L, L, 6, 5, batch=2, heads=3)
    sched = Schedule(block_m=6, block_n=5, tile_elems=256)
    q, k, v, v2 = _inputs(L, 3, 3, 8, 1.0, seed=4)
    _, probs = attention_with_probs(q, k, v, layout, sched, 0.3)
    sub = probs.select_heads([1, 2])
    assert not sub.p.is_contiguous()
    y = apply_probs(sub, v2[:, 1:])
    with fused_cpu.disabled():
        y_a = apply_probs(sub, v2[:, 1:])
    torch.testing.assert_close(y, y_a, rtol=1e-5, atol=1e-5)
    tables = kernel_tables(layout.groups[0])
    rows = _kernel_rows(probs.plan, tables)
    with pytest.raises(ac.InputError, match="storage size"):
        cpu_attn.apply_forward(probs.p[..., 1:], v2, tables, rows, L)
    with pytest.raises(ac.InputError, match="Lq=40"):
        cpu_attn.apply_forward(probs.p, v2, tables, rows, 46 - 6)


@pytest.mark.parametrize("build", BUILDS)
def test_apply_both_kernel_builds(build, monkeypatch):
    """The avx2 and the generic build of attn_apply give P @ v in float64 (ragged blocks, GQA)."""
    use_build(monkeypatch, build)
    assert cpu_attn.variant() == build and cpu_attn.available()
    calls = _spy_apply(monkeypatch)
    L = 47
    layout = PATTERNS["window_causal_global"].layout(L, L, 6, 5, batch=2, heads=4)
    q, k, v, v2 = _inputs(L, 4, 2, 16, 3.0, seed=8)
    _, probs = attention_with_probs(q, k, v, layout, Schedule(block_m=6, block_n=5, tile_elems=512), 0.25)
    y = apply_probs(probs, v2)
    assert calls
    want = probs.to_dense().double() @ v2.double().repeat_interleave(2, 1)
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)


def test_apply_nan_in_v_or_p_reaches_the_affected_outputs():
    """A NaN in one row of v makes NaN exactly the outputs whose P row weighs that key (GQA: every
    query head of its group); a NaN in one stored P entry makes its output row NaN; the rest equal
    the run without NaN."""
    L = 45
    pattern = PATTERNS["window_causal_global"]
    layout = pattern.layout(L, L, 8, 8, batch=2, heads=4)
    q, k, v, v2 = _inputs(L, 4, 2, 16, 1.0, seed=12)
    _, probs = attention_with_probs(q, k, v, layout, Schedule(block_m=8, block_n=8, tile_elems=256), 0.25)
    y0 = apply_probs(probs, v2)
    v2[1, 0, 44, 3] = math.nan  # the last key, in the ragged last block
    y = apply_probs(probs, v2)
    sees = probs.to_dense()[1, :2, :, 44] > 0  # query heads 0 and 1 read kv head 0
    hit = torch.zeros_like(y, dtype=torch.bool)
    hit[1, :2, :, 3] = sees
    assert bool(sees.any()) and bool(y[hit].isnan().all())
    # a masked entry (P = 0) of a listed block also gives 0 * NaN = NaN, as in the ATen bmm; query
    # blocks that list no key block 5 (keys 40..44) never read the NaN
    dense = pattern.to_dense(L)
    lists = torch.tensor([bool(dense[r // 8 * 8:r // 8 * 8 + 8, 40:].any()) for r in range(L)])
    may = torch.zeros_like(y, dtype=torch.bool)
    may[1, :2, :, 3] = lists
    assert bool((~lists).any()) and bool(torch.isfinite(y[~may]).all())
    torch.testing.assert_close(y[~may], y0[~may], rtol=0, atol=0)
    p = probs.p.clone()
    stored = probs.to_dense()
    p.view(-1)[(p.view(-1) > 0).nonzero()[7]] = math.nan
    y_p = apply_probs(StoredProbs(p, probs.plan, probs.heads), v2.nan_to_num())
    bad = StoredProbs(p, probs.plan, probs.heads).to_dense().isnan()
    assert int(bad.sum()) == 1 and bool(stored[bad] > 0)
    row = bad.any(-1)  # [B, H, Lq]: the one query row whose P holds the NaN
    assert bool(y_p[row].isnan().all()) and bool(torch.isfinite(y_p[~row]).all())
