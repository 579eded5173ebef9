"""Stored attention probabilities (cross-layer reuse) through the fused CPU kernel ``attn_probs``:
``attention_with_probs`` on float32 CPU tensors against the ATen path of the same plan (P in the
same tile layout) and against the float64 reference (out, P, gradients through a second use of
P), on windows, causal windows, global tokens, bigbird random blocks, GQA, odd lengths, ragged
blocks (in-place tiles when bn % 8 == 0, the scratch path otherwise), logits in the hundreds,
empty rows and empty query blocks; both kernel builds; NaN propagation; the wrapper's checks."""

import math

import pytest
import torch

import attncompiler as ac
from attncompiler import patterns as catalogue
from attncompiler.codegen.cpu import attention as cpu_attn, build as cpu_build
from attncompiler.codegen.cpu.tables import kernel_tables
from attncompiler.codegen.pytorch import fused_cpu
from attncompiler.codegen.pytorch.probs import (ProbsWorkspace, StoredProbs, _kernel_rows, apply_probs,
                                                attention_with_probs, probs_plan)
from attncompiler.program.schedule import Schedule

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


@pytest.mark.parametrize("build", ["avx2", "generic"])
def test_both_kernel_builds(build, monkeypatch):
    """The avx2 and the generic build of attn_probs give the ATen path's out and P (ragged
    scratch tiles and in-place tiles, GQA)."""
    monkeypatch.setenv("ATTNC_CPU_KERNELS", "generic" if build == "generic" else "1")
    if cpu_build.default_variant() != build:
        pytest.skip(f"no {build} build on this CPU")
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
