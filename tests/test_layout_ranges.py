"""Layouts as ranges of full blocks plus partial lists: equal to dense evaluation, transposed
views from ranges, no quadratic path at a million tokens, backends on long full runs."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attncompiler as ac
from attncompiler.layout.block_layout import Blocks2D, build_layout
from attncompiler.layout.block_sets import EMPTY, FULL, PARTIAL

from attncompiler.patterns import bigbird

from oracle import dense_block_kinds
from strategies import lengths, pattern_trees


def _grid_from_ranges(grp: Blocks2D) -> np.ndarray:
    """``[nqb, nkb]`` kinds read from the range and partial lists only (not the explicit views)."""
    g = grp.geom
    out = np.zeros((g.nqb, g.nkb), dtype=np.uint8)
    for r in range(g.nqb):
        for i in range(grp.range_ptr[r], grp.range_ptr[r + 1]):
            assert (out[r, grp.range_start[i]:grp.range_end[i]] == EMPTY).all()
            out[r, grp.range_start[i]:grp.range_end[i]] = FULL
        part = grp.part_cols[grp.part_ptr[r]:grp.part_ptr[r + 1]]
        assert (np.diff(part) > 0).all() and (out[r, part] == EMPTY).all()
        out[r, part] = PARTIAL
    return out


def _check_structure(grp: Blocks2D) -> None:
    """Ranges are non-empty, sorted and maximal (no two touch); views agree with the grid."""
    g = grp.geom
    assert (grp.range_start < grp.range_end).all()
    for r in range(g.nqb):
        s, e = grp.range_start[grp.range_ptr[r]:grp.range_ptr[r + 1]], grp.range_end[grp.range_ptr[r]:grp.range_ptr[r + 1]]
        assert (s[1:] > e[:-1]).all(), "adjacent full ranges must be merged"
    grid = _grid_from_ranges(grp)
    assert grp.num_full == int((grid == FULL).sum()) and grp.num_blocks == int((grid != EMPTY).sum())
    col_ptr, row_start, row_end = grp.csc_ranges
    tgrid = np.zeros((g.nkb, g.nqb), dtype=np.uint8)
    for c in range(g.nkb):
        for i in range(col_ptr[c], col_ptr[c + 1]):
            assert row_start[i] < row_end[i]
            tgrid[c, row_start[i]:row_end[i]] = FULL
        if col_ptr[c + 1] - col_ptr[c] > 1:  # transposed ranges are maximal too
            assert (row_start[col_ptr[c] + 1:col_ptr[c + 1]] > row_end[col_ptr[c]:col_ptr[c + 1] - 1]).all()
    pptr, prows = grp.csc_partial
    for c in range(g.nkb):
        tgrid[c, prows[pptr[c]:pptr[c + 1]]] = PARTIAL
    np.testing.assert_array_equal(tgrid.T, grid)
    kinds = np.zeros_like(grid)
    kinds[grp.rows, grp.cols] = np.where(grp.full, FULL, PARTIAL)  # explicit (derived) views
    np.testing.assert_array_equal(kinds, grid)


@st.composite
def _tree_cases(draw):
    q_len, kv_len = draw(lengths(97)), draw(lengths(97))
    pattern = draw(pattern_trees(min(q_len, kv_len), max_leaves=4, batch_head=False))
    bm, bn = draw(st.sampled_from([1, 3, 4, 8, 16])), draw(st.sampled_from([1, 4, 5, 8, 32]))
    return pattern, q_len, kv_len, bm, bn


@given(_tree_cases())
@settings(max_examples=80, deadline=None)
def test_ranges_and_partial_lists_equal_dense_evaluation(case):
    pattern, q_len, kv_len, bm, bn = case
    try:
        layout = build_layout(pattern, q_len, kv_len, bm, bn, heads=2)
    except ac.PatternError:
        return  # a parameter invalid at these lengths (e.g. a global index past the end)
    for (b, h), gid in np.ndenumerate(layout.group_index):
        grp = layout.groups[gid]
        want = dense_block_kinds(pattern, q_len, kv_len, bm, bn, b, h)
        np.testing.assert_array_equal(_grid_from_ranges(grp), want, err_msg=f"{pattern!r} {bm}x{bn}")
        _check_structure(grp)
        dense = pattern.to_dense(q_len, kv_len, b=b, h=h)
        assert grp.allowed_pairs() == int(dense.sum())


INTERVAL_CASES = [
    ac.sliding_window(13) & ~ac.block_local(20),
    ~ac.causal() & ac.sliding_window(9),
    ac.sliding_window(7).causal(),
    ac.prefix_lm(37),
    ~ac.prefix_lm(21) | ac.global_tokens([3, 40]),
    ac.document([30, 1, 45, 60]).causal(),
    ~ac.document([17, 40]) & ~ac.causal(),
    ac.block_local(24).causal() & ~ac.sliding_window(3),
    ac.block_window(1, 8) & ~ac.block_local(16),
    ac.strided(8), ac.strided(16) & ac.causal(), ~ac.strided(12),
    ac.full() & ~ac.full(),
]


@pytest.mark.parametrize("pattern", INTERVAL_CASES, ids=repr)
@pytest.mark.parametrize("q_len, kv_len, bm, bn", [(131, 131, 8, 8), (100, 77, 4, 12), (64, 150, 16, 4), (45, 45, 1, 1)])
def test_interval_set_algebra_equals_dense_evaluation(pattern, q_len, kv_len, bm, bn):
    layout = build_layout(pattern, q_len, kv_len, bm, bn)
    (grp,) = layout.groups
    np.testing.assert_array_equal(_grid_from_ranges(grp), dense_block_kinds(pattern, q_len, kv_len, bm, bn))
    _check_structure(grp)
    assert layout.density() == pytest.approx(pattern.to_dense(q_len, kv_len).double().mean().item(), abs=0)


def test_causal_is_one_range_and_one_diagonal_block_per_row():
    grp = ac.causal().layout(1 << 20, 1 << 20, 64, 64).groups[0]
    n = (1 << 20) // 64
    assert len(grp.range_start) == n - 1 and len(grp.part_cols) == n  # row 0 has no full block
    np.testing.assert_array_equal(grp.part_cols, np.arange(n))
    col_ptr, row_start, row_end = grp.csc_ranges
    assert len(row_start) == n - 1 and (row_start == np.arange(1, n)).all() and (row_end == n).all()
    assert grp.num_blocks == n * (n + 1) // 2
    assert ac.causal().layout(1 << 20, 1 << 20, 64, 64).density() == pytest.approx(0.5, abs=1e-6)


_CAPPED = textwrap.dedent("""
    import resource, sys
    import attncompiler as ac
    def vm_bytes():
        for line in open('/proc/self/status'):
            if line.startswith('VmSize:'):
                return int(line.split()[1]) * 1024
    cap = vm_bytes() + int(sys.argv[1]) * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    lay = ac.sliding_window(256).causal().layout(2**20, 2**20, 64, 64)
    assert lay.num_blocks > 0
    grp = lay.groups[0]
    print(lay.num_blocks, grp.num_full, grp.allowed_pairs())
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_causal_window_at_a_million_tokens_fits_a_memory_cap():
    """The old path listed every block of the causal operand (10 GB at this size); the interval
    path needs a few MiB. 768 MiB of address space above the interpreter's is generous."""
    env = dict(os.environ, MALLOC_ARENA_MAX="2", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               OPENBLAS_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", _CAPPED, "768"], capture_output=True, text=True, env=env,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    blocks, full, pairs = map(int, res.stdout.split())
    n = (1 << 20) // 64
    # row r: key blocks r-3..r-1 full (q_hi - k_lo <= 255), r and r-4 partial, clipped at column 0
    assert full == 3 * n - 6 and blocks == full + 2 * n - 4
    L = 1 << 20
    assert pairs == sum(min(i, 256) + 1 for i in range(L))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("pattern", [ac.causal(), ac.prefix_lm(70), ac.document([50, 90, 60]).causal(),
                                     ac.sliding_window(40) & ~ac.block_local(64)], ids=repr)
def test_backends_match_reference_on_long_full_runs(backend, pattern):
    if backend == "triton":
        pytest.importorskip("triton")
    torch.manual_seed(0)
    L, D = 200, 16
    q, k, v = (torch.randn(1, 2, L, D, dtype=torch.float32, requires_grad=True) for _ in range(3))
    sched = ac.Schedule(block_m=16, block_n=32) if backend == "triton" else ac.Schedule(block_m=16, block_n=8)
    out = ac.compile(pattern, backend=backend, schedule=sched)(q, k, v)
    ref = ac.reference(pattern, q, k, v)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-5)
    grad = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
    rq, rk, rv = torch.autograd.grad(ref, (q, k, v), grad.double())
    for a, b in ((dq, rq), (dk, rk), (dv, rv)):
        torch.testing.assert_close(a.double(), b.double(), atol=1e-4, rtol=1e-4)


def _no_expanded_views(monkeypatch) -> None:
    """Make the explicit per-block views of every layout raise: the torch path reads ranges."""
    def forbidden(self):
        raise AssertionError("the expanded per-block view of a layout was used")
    for name in ("_explicit", "row_ptr", "csc"):
        monkeypatch.setattr(Blocks2D, name, property(forbidden))


@pytest.mark.parametrize("pattern", [ac.causal(), ac.prefix_lm(70), ac.document([50, 90, 61]).causal(),
                                     ac.sliding_window(40) & ~ac.block_local(64),
                                     (ac.sliding_window(30) | ac.global_tokens([0, 1, 2])).causal(),
                                     bigbird(block=16, window_blocks=3, global_blocks=1, random_blocks=2, seed=1)],
                         ids=repr)
def test_torch_plan_from_ranges_matches_reference_gqa_odd_lengths(monkeypatch, pattern):
    """Long full runs, odd lengths, block_m != block_n, GQA (4 query heads on 2 key heads) and
    several steps per row, forward and backward, without ever expanding the layout."""
    _no_expanded_views(monkeypatch)
    torch.manual_seed(1)
    Lq = Lk = 211
    q = torch.randn(2, 4, Lq, 8, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 2, Lk, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    sched = ac.Schedule(block_m=16, block_n=8, key_blocks_per_step=5, tile_elems=4096)
    out = ac.compile(pattern, backend="torch", schedule=sched)(q, k, v)
    ref = ac.reference(pattern, q, k, v)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-9)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-8)


_CAPPED_FORWARD = textwrap.dedent("""
    import resource, sys
    import torch
    import attncompiler as ac
    torch.set_num_threads(1)
    L = int(sys.argv[2])
    m = ac.compile(ac.sliding_window(256).causal(), backend="torch")
    q, k, v = (torch.randn(1, 1, L, 64) for _ in range(3))
    m(q[:, :, :256], k[:, :, :256], v[:, :, :256])  # warm up lazy imports before capping
    def vm_bytes():
        for line in open('/proc/self/status'):
            if line.startswith('VmSize:'):
                return int(line.split()[1]) * 1024
    cap = vm_bytes() + int(sys.argv[1]) * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    with torch.no_grad():
        out = m(q, k, v)
    # a causal window is shift-invariant away from the start: the tail equals a short reference
    tail = ac.reference(ac.sliding_window(256).causal(), q[:, :, -1024:], k[:, :, -1024:], v[:, :, -1024:])
    err = float((out[:, :, -512:].double() - tail[:, :, -512:]).abs().max())
    print(bool(torch.isfinite(out).all()), err < 1e-4)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_compiled_causal_window_forward_fits_a_memory_cap():
    """The compiled torch forward of a causal window at 2**19 tokens within 1 GiB of address
    space above the warmed-up interpreter (inputs and output take 256 MiB of it). Before layouts
    kept ranges, building the causal operand alone needed about 2.5 GB at this length."""
    env = dict(os.environ, MALLOC_ARENA_MAX="2", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               OPENBLAS_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", _CAPPED_FORWARD, "1024", str(1 << 19)], capture_output=True,
                         text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == ["True", "True"]


def _rows_of(num: torch.Tensor, idx: torch.Tensor) -> list[list[int]]:
    return [sorted(idx[i, :n].tolist()) for i, n in enumerate(num.tolist())]


@pytest.mark.parametrize("pattern", [ac.causal(), ac.prefix_lm(70) & ~ac.block_local(48),
                                     ac.document([50, 90, 61]).causal(),
                                     ac.per_head([ac.sliding_window(40).causal(), ac.causal() | ac.global_tokens([0])])],
                         ids=repr)
@pytest.mark.parametrize("transposed", [False, True])
def test_bcsr_and_range_bcsr_from_ranges_equal_the_block_grid(monkeypatch, pattern, transposed):
    """Padded index lists and per-row full ranges agree with the dense block grid, built without
    the expanded views (odd lengths, block_m != block_n)."""
    lay = build_layout(pattern, 203, 197, 16, 8, heads=2)
    kinds = lay.block_kinds()  # reads the explicit views: computed before they are forbidden
    _no_expanded_views(monkeypatch)
    t, rt = lay.bcsr(transposed=transposed), lay.bcsr_ranges(transposed=transposed)
    n = "q" if transposed else "kv"
    for (bi, hi), _ in np.ndenumerate(lay.group_index):
        grid = kinds[bi, hi].T if transposed else kinds[bi, hi]
        want_p = [list(np.flatnonzero(row == PARTIAL)) for row in grid]
        want_f = [list(np.flatnonzero(row == FULL)) for row in grid]
        assert _rows_of(t[f"{n}_num_blocks"][bi, hi], t[f"{n}_indices"][bi, hi]) == want_p
        assert _rows_of(t[f"full_{n}_num_blocks"][bi, hi], t[f"full_{n}_indices"][bi, hi]) == want_f
        assert _rows_of(rt[f"{n}_num_blocks"][bi, hi], rt[f"{n}_indices"][bi, hi]) == want_p
        num, rng = rt[f"full_{n}_num_ranges"][bi, hi], rt[f"full_{n}_ranges"][bi, hi]
        got_f = [[c for s, e in rng[i, :k].tolist() for c in range(s, e)] for i, k in enumerate(num.tolist())]
        assert got_f == want_f
    if not transposed:
        assert rt[f"full_{n}_ranges"].shape[-2] <= 2  # a few ranges per row, never a run's length


@pytest.mark.parametrize("pattern", [ac.causal(), ac.prefix_lm(70) & ~ac.block_local(48),
                                     (ac.sliding_window(30) | ac.global_tokens([0, 1, 2])).causal()], ids=repr)
@pytest.mark.parametrize("width", [7, 13, 64])
def test_picture_cells_from_ranges_merge_the_block_grid(monkeypatch, pattern, width):
    """A cell is full when all its blocks are full, empty when none is present (from ranges)."""
    from attncompiler.layout.picture import cell_grid

    lay = build_layout(pattern, 203, 197, 8, 4)
    kinds = lay.block_kinds()[0, 0]
    _no_expanded_views(monkeypatch)
    grid = cell_grid(lay, width=width)
    fm, fn = grid.cell_m // 8, grid.cell_n // 4
    for i in range(grid.kinds.shape[0]):
        for j in range(grid.kinds.shape[1]):
            cell = kinds[i * fm:(i + 1) * fm, j * fn:(j + 1) * fn]
            want = EMPTY if (cell == EMPTY).all() else FULL if (cell == FULL).all() else PARTIAL
            assert grid.kinds[i, j] == want, (i, j)


def _triton_case(pattern, B, H, Hkv, Lq, Lk, sched) -> None:
    """Compiled triton forward + dq/dk/dv against the float64 reference."""
    torch.manual_seed(2)
    q = torch.randn(B, H, Lq, 16, requires_grad=True)
    k, v = (torch.randn(B, Hkv, Lk, 16, requires_grad=True) for _ in range(2))
    out = ac.compile(pattern, backend="triton", schedule=sched)(q, k, v)
    ref = ac.reference(pattern, q, k, v)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-5)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad.double())
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b.double(), atol=1e-4, rtol=1e-4)


_TRITON_RANGE_CASES = [
    # pattern, B, H, Hkv, Lq, Lk, block_m, block_n
    (ac.causal(), 1, 2, 1, 131, 131, 16, 32),  # one range per row, GQA, ragged last blocks
    (ac.prefix_lm(5), 1, 1, 1, 77, 77, 32, 16),
    (ac.document([30, 41, 26]).causal(), 2, 2, 2, 97, 97, 16, 16),
    (ac.sliding_window(20) & ~ac.block_local(32), 1, 1, 1, 90, 90, 16, 16),  # two ranges in some rows
    (bigbird(block=16, window_blocks=3, global_blocks=1, random_blocks=2, seed=1), 1, 2, 2, 96, 96, 16, 16),
    (ac.per_head([ac.sliding_window(20).causal(), ac.causal() | ac.global_tokens([0])]), 1, 2, 1, 70, 70, 16, 16),
    (ac.mask(lambda b, h, q, k: (q >= k) & ((q - k) % 3 != 1)), 1, 1, 1, 50, 50, 16, 16),  # opaque: byte masks
    (ac.prefix_lm(10), 1, 1, 1, 40, 70, 16, 16),  # cross lengths
]


@pytest.mark.parametrize("case", _TRITON_RANGE_CASES, ids=lambda c: repr(c[0])[:40])
def test_triton_kernels_from_ranges_match_reference(monkeypatch, case):
    """The Triton kernels (interpreter) walk full ranges and partial lists: forward, dq, dk/dv
    match the reference with every expanded per-block view of the layout forbidden, and the
    range tables stay a few ranges wide however long the runs are."""
    pytest.importorskip("triton")
    from attncompiler.codegen.triton.kernels import layout_tensors

    pattern, B, H, Hkv, Lq, Lk, bm, bn = case
    _no_expanded_views(monkeypatch)
    _triton_case(pattern, B, H, Hkv, Lq, Lk, ac.Schedule(block_m=bm, block_n=bn))
    lay = build_layout(pattern, Lq, Lk, bm, bn, batch=B, heads=H)
    t = layout_tensors(lay, torch.device("cpu"))
    most = max(max(1, int(np.diff(grp.range_ptr).max())) for grp in lay.groups)
    assert t.widths(t.fwd)[1] == most  # padded to the most ranges of a row, not to a run's length


def test_triton_causal_range_tables_do_not_grow_with_length(monkeypatch):
    """A causal layout's kernel tables: one range per row and one diagonal block, at any length."""
    pytest.importorskip("triton")
    from attncompiler.codegen.triton.kernels import layout_tensors

    _no_expanded_views(monkeypatch)
    lay = build_layout(ac.causal(), 1 << 16, 1 << 16, 64, 64)
    t = layout_tensors(lay, torch.device("cpu"))
    num, idx, nr, rng, _ = t.fwd
    assert idx.shape[-1] == 1 and rng.shape[-2] == 1 and int(nr[0, 0, 0]) == 0
    assert rng[0, 0, 5].tolist() == [[0, 5]] and idx[0, 0, 5].tolist() == [5]
    qnum, qidx, qnr, qrng, _ = t.bwd
    assert qidx.shape[-1] == 1 and qrng.shape[-2] == 1 and qrng[0, 0, 5].tolist() == [[6, 1024]]


@pytest.mark.parametrize("backend,mode", [("torch", "materialize"), ("triton", "materialize"), ("triton", "recompute")])
def test_diffusion_from_ranges_matches_reference(monkeypatch, backend, mode):
    """Diffusion's stored-P plans (torch and triton) and the recompute schedule read the layout's
    ranges and partial lists only (window + random + global base graph, GQA, ragged last block)."""
    if backend == "triton":
        pytest.importorskip("triton")
    from attncompiler.families.diffusion.pattern import diffuse

    _no_expanded_views(monkeypatch)
    p = diffuse(ac.sliding_window(5) | ac.global_tokens([0, 7]) | ac.random_blocks(1, block=16, seed=2), hops=2,
                alpha=0.2)
    torch.manual_seed(3)
    dt = torch.float64 if backend == "torch" else torch.float32
    q = torch.randn(1, 2, 53, 16, dtype=dt, requires_grad=True)
    k, v = (torch.randn(1, 1, 53, 16, dtype=dt, requires_grad=True) for _ in range(2))
    attn = ac.compile(p, backend=backend, schedule=ac.Schedule(block_m=16, block_n=16))
    attn.hops_mode = mode
    out = attn(q, k, v)
    ref = ac.reference(p, q, k, v)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad.double())
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b.double(), atol=1e-4, rtol=1e-4)
