"""The fused CPU kernels as the torch backend runs them (codegen/pytorch/fused_cpu.py): every call
below is checked to take the fused path, then compared with the float64 reference (forward and
backward, logits in the hundreds, odd lengths, random schedules, GQA, positions, per-head
layouts), with the plan path it replaces, and across thread counts; the kernel tables are
checked against dense evaluation."""

import pytest
import torch
from hypothesis import given, strategies as st

import attncompiler as ac
from attncompiler.codegen.cpu import attention as kernels
from attncompiler.codegen.cpu.tables import kernel_tables
from attncompiler.codegen.pytorch import fused_cpu
from attncompiler.patterns import bigbird
from attncompiler.program.positions import group_layout
from strategies import opaque_head_band

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"C kernels not built: {kernels.status()}")

H, HKV, D = 4, 2, 16


def qkv(B=2, Lq=75, Lk=75, mag=6.0, seed=0, dtype=torch.float32, Dv=D):
    """Random q, k, v (requires_grad) whose logits reach hundreds."""
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, H, Lq, D, generator=g) * mag).to(dtype).requires_grad_()
    k = (torch.randn(B, HKV, Lk, D, generator=g) * mag).to(dtype).requires_grad_()
    v = torch.randn(B, HKV, Lk, Dv, generator=g).to(dtype).requires_grad_()
    return q, k, v


def schedule(seed):
    g = torch.Generator().manual_seed(seed)
    bm, bn = (int(x) for x in torch.tensor([8, 16, 32, 13])[torch.randint(0, 4, (2,), generator=g)])
    return ac.Schedule(block_m=bm, block_n=bn)


def grads_close(out, ref, inputs, tol=2e-4):
    up = torch.randn(ref.shape, dtype=ref.dtype, generator=torch.Generator().manual_seed(7))
    got = torch.autograd.grad(out, inputs, up.to(out.dtype), retain_graph=True)
    want = torch.autograd.grad(ref, inputs, up)
    for i, (a, b) in enumerate(zip(got, want)):
        err = (a.double() - b).abs().max() / b.abs().max().clamp_min(1e-6)
        assert err < tol, f"input {i}: relative gradient error {float(err):.3g}"


PATTERNS = {
    "sliding_window": ac.sliding_window(9),
    "causal_window": ac.sliding_window(20).causal(),
    "causal": ac.causal(),
    "bigbird": bigbird(block=8, window_blocks=3, global_blocks=1, random_blocks=2, seed=1),
    "dilated": ac.dilated_window(12, 3),
    "strided_causal": ac.strided(7) & ac.causal(),
    "opaque": ac.mask(lambda b, h, q, k: ((q * 7 + k * 3) % 5).ne(0)),  # Tensor.ne: not traced
    "per_head": ac.mask(lambda b, h, q, k: (q - k).abs() <= 4 + 3 * h),
    "per_head_opaque": ac.mask(opaque_head_band, per_head=True),
    "empty_rows": ac.sliding_window(3) & ac.mask(lambda b, h, q, k: q >= 10),
}


@pytest.mark.parametrize("name", list(PATTERNS))
def test_matches_reference_forward_backward(name):
    p = PATTERNS[name]
    j = list(PATTERNS).index(name)
    q, k, v = qkv(seed=j, Lq=75, Lk=75 if name != "sliding_window" else 83)
    s = schedule(j)
    assert fused_cpu.applies(group_layout(p, q.shape[2], k.shape[2], s.block_m, s.block_n, batch=2, heads=H), q, k, v)
    m = ac.compile(p, backend="torch", schedule=s)
    out, lse = m(q, k, v, return_lse=True)
    ref, ref_lse = ac.reference(p, q, k, v, return_lse=True)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=2e-4)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=5e-5)
    grads_close(out, ref, [q, k, v])


def test_same_as_plan_path_and_across_threads(monkeypatch):
    p = ac.sliding_window(17) | ac.global_tokens([0, 40])
    q, k, v = qkv(B=1, Lq=130, Lk=130, seed=3, Dv=32)
    m = ac.compile(p, backend="torch", schedule=ac.Schedule(block_m=16, block_n=32))
    threads = torch.get_num_threads()
    results = []
    for n in (1, 2):
        torch.set_num_threads(n)
        try:
            out = m(q, k, v)
            results.append((out, *torch.autograd.grad(out, [q, k, v], torch.ones_like(out))))
        finally:
            torch.set_num_threads(threads)
    for i, (a, b) in enumerate(zip(*results)):  # work items are computed the same way whichever thread takes them
        if i == 1:  # dq is summed over per-thread buffers: its rounding depends on which thread took which item
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * float(b.abs().max()))
        else:
            assert torch.equal(a, b)
    monkeypatch.setattr(fused_cpu, "applies", lambda *a: False)
    out = m(q, k, v)
    plan = (out, *torch.autograd.grad(out, [q, k, v], torch.ones_like(out)))
    for a, b in zip(results[0], plan):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mod_name", ["softcap", "alibi", "softcap_alibi", "alibi_softcap", "sinks"])
def test_score_mods_in_kernel(mod_name):
    slopes = ac.alibi_slopes(H)
    mods = {"softcap": ac.softcap(20.0), "alibi": ac.alibi(slopes),
            "softcap_alibi": ac.softcap(25.0) @ ac.alibi(slopes), "alibi_softcap": ac.alibi(slopes) @ ac.softcap(25.0),
            "sinks": None}
    mod = mods[mod_name]
    sinks = torch.tensor([0.5, -1.0, 2.0, 30.0], requires_grad=True) if mod_name == "sinks" else None
    p = ac.sliding_window(11).causal()
    q, k, v = qkv(B=2, Lq=41, Lk=58, seed=11)
    assert fused_cpu.kernel_mods(mod) is not None
    m = ac.compile(p, backend="torch", score_mod=mod, sinks=sinks, schedule=ac.Schedule(block_m=8, block_n=16))
    for kw in ({}, {"q_offset": 17}):
        out = m(q, k, v, **kw)
        ref = ac.reference(p, q, k, v, score_mod=mod, sinks=sinks, **kw)
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=5e-5)
        grads_close(out, ref, [q, k, v] + ([sinks] if sinks is not None else []))


def test_learnable_alibi_keeps_the_torch_path_and_its_gradient():
    slopes = ac.alibi_slopes(H).requires_grad_()
    assert fused_cpu.kernel_mods(ac.alibi(slopes)) is None
    p = ac.sliding_window(6)
    q, k, v = qkv(B=1, Lq=33, Lk=33, seed=5)
    m = ac.compile(p, backend="torch", score_mod=ac.alibi(slopes))
    out = m(q, k, v)
    grads_close(out, ac.reference(p, q, k, v, score_mod=ac.alibi(slopes)), [q, k, v, slopes])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_types_run_fused_in_float32(dtype):
    p = ac.sliding_window(8)
    q, k, v = qkv(B=1, Lq=50, Lk=50, mag=2.0, seed=9, dtype=dtype)
    out = ac.compile(p, backend="torch")(q, k, v)
    assert out.dtype == dtype
    ref = ac.reference(p, q, k, v)
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2)
    grads_close(out, ref, [q, k, v], tol=3e-2)


def test_nan_in_one_query_row_stays_in_that_row():
    p = ac.sliding_window(4)
    q, k, v = (t.detach() for t in qkv(B=1, Lq=40, Lk=40, seed=2))
    q = q.clone()
    q[0, 1, 17] = float("nan")
    out = ac.compile(p, backend="torch")(q, k, v)
    assert out[0, 1, 17].isnan().all()
    rest = torch.ones_like(out, dtype=torch.bool)
    rest[0, 1, 17] = False
    assert out[rest].isfinite().all()


def test_positions_runtime_documents_and_bottom_right():
    p = ac.sliding_window(6).causal()
    q, k, v = qkv(B=1, Lq=23, Lk=61, seed=4)
    m = ac.compile(p, backend="torch", schedule=ac.Schedule(block_m=8, block_n=8))
    out = m(q, k, v, align="bottom_right")
    ref = ac.reference(p, q, k, v, align="bottom_right")
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=5e-5)
    grads_close(out, ref, [q, k, v])
    q2, k2, v2 = qkv(B=1, Lq=61, Lk=61, seed=6)
    cu = torch.tensor([0, 20, 21, 61])
    pd = ac.document() & ac.causal()
    out = ac.compile(pd, backend="torch", schedule=ac.Schedule(block_m=16, block_n=8))(q2, k2, v2, cu_seqlens=cu)
    ref = ac.reference(pd, q2, k2, v2, cu_seqlens=cu)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=5e-5)
    grads_close(out, ref, [q2, k2, v2])


def test_tables_hold_few_masks_for_shift_invariant_patterns():
    lay = ac.sliding_window(256).layout(8192, 8192, 64, 64)
    t = kernel_tables(lay.groups[0])
    assert t.masks.shape[0] <= 4  # two diagonal offsets (+ ragged variants), not one per row
    causal = ac.causal().layout(1 << 20, 1 << 20, 64, 64)
    tc = kernel_tables(causal.groups[0])
    assert tc.masks.shape[0] == 1 and len(tc.range_start) == (1 << 20) // 64 - 1


def dense_from_tables(t, Lq, Lk):
    out = torch.zeros(t.nqb * t.bm, t.nkb * t.bn, dtype=torch.bool)
    for r in range(t.nqb):
        rs = slice(r * t.bm, (r + 1) * t.bm)
        for i in range(int(t.range_ptr[r]), int(t.range_ptr[r + 1])):
            out[rs, int(t.range_start[i]) * t.bn:int(t.range_end[i]) * t.bn] = True
        for i in range(int(t.part_ptr[r]), int(t.part_ptr[r + 1])):
            c = int(t.part_cols[i])
            out[rs, c * t.bn:(c + 1) * t.bn] = t.masks[int(t.part_mask[i])].bool()
    col = torch.zeros_like(out)
    for c in range(t.nkb):
        cs = slice(c * t.bn, (c + 1) * t.bn)
        for i in range(int(t.col_range_ptr[c]), int(t.col_range_ptr[c + 1])):
            col[int(t.row_start[i]) * t.bm:int(t.row_end[i]) * t.bm, cs] = True
        for i in range(int(t.col_part_ptr[c]), int(t.col_part_ptr[c + 1])):
            r = int(t.col_part_rows[i])
            col[r * t.bm:(r + 1) * t.bm, cs] = t.masks[int(t.col_part_mask[i])].bool()
    return out[:Lq, :Lk], col[:Lq, :Lk]


@given(w=st.integers(0, 40), stride=st.integers(1, 9), Lq=st.integers(1, 90), Lk=st.integers(1, 90),
       bm=st.sampled_from([4, 8, 16, 5]), bn=st.sampled_from([4, 8, 16, 7]), kind=st.integers(0, 3))
def test_tables_equal_dense_evaluation(w, stride, Lq, Lk, bm, bn, kind):
    p = [ac.sliding_window(w), ac.sliding_window(w).causal(), ac.strided(stride) & ac.causal(),
         ac.sliding_window(w) | ac.global_tokens([0, Lk // 2])][kind]
    lay = p.layout(Lq, Lk, bm, bn)
    rows, cols = dense_from_tables(kernel_tables(lay.groups[0]), Lq, Lk)
    want = p.to_dense(Lq, Lk)
    assert torch.equal(rows, want) and torch.equal(cols, want)


def test_backward_scores_round_like_the_forward(monkeypatch):
    """The backward recomputes P = exp(S - lse) from the forward's lse: its S must round exactly as
    the forward's did, or P stops summing to 1 and dv/dk pick up the scores' rounding (logits in
    the hundreds made dv 4-8x less accurate than the plan path before this was so)."""
    p = ac.sliding_window(40).causal()
    errs = {}
    for path in ("kernel", "plan"):
        if path == "plan":
            monkeypatch.setattr(fused_cpu, "applies", lambda *a: False)
        worst = [0.0, 0.0, 0.0]
        for seed in range(3):
            g = torch.Generator().manual_seed(seed)
            q = (torch.randn(1, 2, 64, 8, generator=g) * 40).requires_grad_()
            k, v = (torch.randn(1, 2, 64, 8, generator=g).requires_grad_() for _ in range(2))
            out = ac.compile(p, backend="torch", schedule=ac.Schedule(block_m=16, block_n=16))(q, k, v)
            up = torch.randn(out.shape, generator=g)
            got = torch.autograd.grad(out, (q, k, v), up)
            ref = ac.reference(p, q, k, v)
            want = torch.autograd.grad(ref, (q, k, v), up.double())
            worst = [max(w, float((a.double() - b).abs().max())) for w, a, b in zip(worst, got, want)]
        errs[path] = worst
    for i, name in enumerate("qkv"):
        assert errs["kernel"][i] <= 1.5 * errs["plan"][i] + 1e-7, (name, errs)


@pytest.mark.parametrize("pattern", [ac.causal(), ac.full()])
def test_full_and_causal_run_on_the_kernels(pattern, monkeypatch):
    """Where the kernels are built they take full and causal attention from SDPA's kernel (they
    measured faster); a decode-shaped call keeps SDPA; results match the float64 reference."""
    from attncompiler.codegen.pytorch import dense as torch_dense

    q, k, v = qkv(B=2, Lq=77, Lk=91, seed=13)
    assert not torch_dense.fused_applies(True, q, k, v) and not torch_dense.fused_applies(False, q, k, v)
    assert torch_dense.fused_applies(True, q[:, :, :1], k, v)
    with fused_cpu.disabled():
        assert torch_dense.fused_applies(True, q, k, v)
    calls = []
    real = fused_cpu.forward
    monkeypatch.setattr(fused_cpu, "forward", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    out = ac.compile(pattern, backend="torch")(q, k, v)
    assert calls, "the kernels did not run"
    ref = ac.reference(pattern, q, k, v)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=5e-5)
    grads_close(out, ref, [q, k, v])


@pytest.mark.parametrize("pattern", [ac.causal(), ac.full()])
def test_long_dense_rows_take_tall_query_blocks(pattern, monkeypatch):
    """Past LONG_ROW_KV_BYTES of keys and values per head the dense stage hands the kernels
    256-row query blocks (they stream each key/value block once for more queries); the results
    still match the float64 reference, forward and backward, at odd lengths and Lq != Lk."""
    from attncompiler.codegen.pytorch import dense as torch_dense

    s = ac.Schedule(block_m=64, block_n=64)
    q, k, v = qkv(B=1, Lq=601, Lk=617, seed=21)
    assert torch_dense.kernel_block_m(s, q, k, v) == 64  # 617 keys: far below the threshold
    monkeypatch.setattr(torch_dense, "LONG_ROW_KV_BYTES", 617 * 2 * D * 4 - 1)
    assert torch_dense.kernel_block_m(s, q, k, v) == 256
    assert torch_dense.kernel_block_m(s, q[:, :, :300], k, v) == 64  # fewer than two tall blocks
    with fused_cpu.disabled():
        assert torch_dense.kernel_block_m(s, q, k, v) == 64
    assert torch_dense.kernel_block_m(s, q.double(), k.double(), v.double()) == 64  # the ATen path keeps its blocks
    seen = []
    real = fused_cpu.forward
    monkeypatch.setattr(fused_cpu, "forward",
                        lambda q_, k_, v_, layout, *a, **kw: seen.append(layout.groups[0].geom.block_m)
                        or real(q_, k_, v_, layout, *a, **kw))
    out = ac.compile(pattern, backend="torch", schedule=s)(q, k, v)
    assert seen == [256]
    ref = ac.reference(pattern, q, k, v)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=5e-5)
    grads_close(out, ref, [q, k, v])
