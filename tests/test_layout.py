"""Block layouts: analytic == dense, CSR/CSC/BCSR consistency, caching, FlexAttention export."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attncompiler as ac
from attncompiler.layout.block_sets import EMPTY, FULL, PARTIAL
from attncompiler.layout.block_layout import BlockLayout, build_layout

from strategies import block_sizes, cases


def dense_block_kinds(pattern, q_len, kv_len, bm, bn, b=0, h=0) -> np.ndarray:
    """``[nqb, nkb]`` kinds from evaluating every element: the definition the layout must meet."""
    d = pattern.to_dense(q_len, kv_len, b=b, h=h)
    nqb, nkb = -(-q_len // bm), -(-kv_len // bn)
    pad = torch.zeros(nqb * bm, nkb * bn, dtype=torch.int64)
    valid = torch.zeros_like(pad)
    pad[:q_len, :kv_len] = d.long()
    valid[:q_len, :kv_len] = 1
    hits = pad.view(nqb, bm, nkb, bn).sum((1, 3))
    size = valid.view(nqb, bm, nkb, bn).sum((1, 3))
    return np.where(hits == 0, EMPTY, np.where(hits == size, FULL, PARTIAL)).astype(np.uint8)


@given(cases(), block_sizes())
@settings(max_examples=60)
def test_analytic_layout_equals_dense_evaluation(case, blocks):
    bm, bn = blocks
    layout = build_layout(case.pattern, case.q_len, case.kv_len, bm, bn)
    expected = dense_block_kinds(case.pattern, case.q_len, case.kv_len, bm, bn)
    np.testing.assert_array_equal(layout.block_kinds()[0, 0], expected, err_msg=repr(case))


@pytest.mark.parametrize("bm, bn", [(8, 8), (16, 8), (8, 32), (24, 16), (6, 6)])
@pytest.mark.parametrize("q_len, kv_len", [(100, 100), (77, 130)])
def test_random_blocks_layout_at_multiples_of_the_pattern_block(bm, bn, q_len, kv_len):
    """Layout blocks that are whole multiples of the random cells are counted, not evaluated; a
    misaligned size (6) still goes through evaluation. Both must equal the dense definition."""
    for pattern in (ac.random_blocks(3, block=4, seed=1), ac.random_blocks(2, block=4) | ac.block_window(1, 4)):
        layout = build_layout(pattern, q_len, kv_len, bm, bn)
        expected = dense_block_kinds(pattern, q_len, kv_len, bm, bn)
        np.testing.assert_array_equal(layout.block_kinds()[0, 0], expected, err_msg=f"{pattern!r} {bm}x{bn}")


@given(cases(max_len=60, max_leaves=2), cases(max_len=60, max_leaves=2), block_sizes(), st.integers(1, 4))
@settings(max_examples=15)
def test_per_head_and_per_batch_layouts(c1, c2, blocks, heads):
    q_len = kv_len = min(c1.q_len, c1.kv_len, c2.q_len, c2.kv_len)
    p = ac.per_head([c1.pattern, c2.pattern]) | ac.mask(lambda b, h, q, k: (b == 1) & (q == k))
    try:
        p.validate(q_len, kv_len)
    except ac.PatternError:
        return  # a global index drawn for a longer length
    bm, bn = blocks
    layout = p.layout(q_len, kv_len, bm, bn, batch=2, heads=heads)
    kinds = layout.block_kinds()
    assert kinds.shape[:2] == (2, heads)
    for b in range(2):
        for h in range(heads):
            np.testing.assert_array_equal(kinds[b, h], dense_block_kinds(p, q_len, kv_len, bm, bn, b, h))
            grp = layout.group_for(b, h)
            assert grp is layout.groups[layout.group_index[b, h]]


@given(cases(max_len=90), block_sizes())
@settings(max_examples=25)
def test_csr_csc_and_counts_are_consistent(case, blocks):
    layout = build_layout(case.pattern, case.q_len, case.kv_len, *blocks)
    (grp,) = layout.groups
    g = layout.geom
    assert grp.row_ptr[0] == 0 and grp.row_ptr[-1] == len(grp.cols) and (np.diff(grp.row_ptr) >= 0).all()
    for r in range(g.nqb):  # columns sorted and unique within each row
        assert (np.diff(grp.cols[grp.row_ptr[r]:grp.row_ptr[r + 1]]) > 0).all()
    col_ptr, rows, full = grp.csc
    assert col_ptr[-1] == len(grp.cols)
    csr = {(int(r), int(c), bool(f)) for r, c, f in zip(grp.rows, grp.cols, grp.full)}
    csc_cols = np.repeat(np.arange(g.nkb), np.diff(col_ptr))
    csc = {(int(r), int(c), bool(f)) for r, c, f in zip(rows, csc_cols, full)}
    assert csr == csc and len(csc) == len(rows)
    for c in range(g.nkb):  # rows sorted within each column
        assert (np.diff(rows[col_ptr[c]:col_ptr[c + 1]]) > 0).all()
    assert layout.num_blocks == len(grp.cols) and layout.num_full == int(grp.full.sum())
    dense = case.pattern.to_dense(case.q_len, case.kv_len)
    assert grp.allowed_pairs() == int(dense.sum())
    assert layout.density() == pytest.approx(dense.float().mean().item())


@given(cases(max_len=60), block_sizes(), st.booleans())
@settings(max_examples=15)
def test_bcsr_tensors_reproduce_the_lists(case, blocks, transposed):
    layout = build_layout(case.pattern, case.q_len, case.kv_len, *blocks)
    (grp,) = layout.groups
    t = layout.bcsr(transposed=transposed)
    n = "q" if transposed else "kv"
    ptr, idx, full = grp.csc if transposed else (grp.row_ptr, grp.cols, grp.full)
    n_rows = layout.geom.nkb if transposed else layout.geom.nqb
    assert t[f"{n}_num_blocks"].shape == (1, 1, n_rows)
    assert t[f"{n}_indices"].dtype == torch.int32
    for r in range(n_rows):
        sl = slice(ptr[r], ptr[r + 1])
        part, fl = idx[sl][~full[sl]], idx[sl][full[sl]]
        cnt, fcnt = int(t[f"{n}_num_blocks"][0, 0, r]), int(t[f"full_{n}_num_blocks"][0, 0, r])
        assert (cnt, fcnt) == (len(part), len(fl))
        assert t[f"{n}_indices"][0, 0, r, :cnt].tolist() == part.tolist()
        assert t[f"full_{n}_indices"][0, 0, r, :fcnt].tolist() == fl.tolist()
        assert not t[f"{n}_indices"][0, 0, r, cnt:].any(), "padding is zero"
    width = max(layout.geom.nqb, layout.geom.nkb) + 3  # wider than any row
    wide = layout.bcsr(transposed=transposed, pad_to=width)
    assert wide[f"{n}_indices"].shape[-1] == width
    assert torch.equal(wide[f"{n}_indices"][..., :t[f"{n}_indices"].shape[-1]], t[f"{n}_indices"])


def test_layout_is_cached_per_arguments():
    p = ac.sliding_window(5) | ac.global_tokens([0])
    a = p.layout(100, 100, 16, 16)
    assert p.layout(100, 100, 16, 16) is a
    assert (ac.sliding_window(5) | ac.global_tokens([0])).layout(100, block_m=16) is a  # equal pattern
    assert p.layout(101, 100, 16, 16) is not a
    assert p.layout(100, 100, 16, 8) is not a


def test_block_kinds_of_simple_patterns():
    lay = ac.causal().layout(40, 40, 16, 16)
    # Row 0 diagonal partial; below-diagonal blocks full; the ragged last block (32..39) partial.
    assert lay.block_kinds()[0, 0].tolist() == [[1, 0, 0], [2, 1, 0], [2, 2, 1]]
    assert ac.full().layout(40, 40, 16, 16).block_kinds()[0, 0].tolist() == [[2, 2, 2]] * 3
    empty = (~ac.full()).layout(40, 40, 16, 16)
    assert empty.num_blocks == 0 and empty.density() == 0.0


def test_per_head_layout_shares_groups_by_period():
    p = ac.per_head([ac.causal(), ac.sliding_window(2)])
    lay = p.layout(32, 32, 8, 8, heads=6)
    assert len(lay.groups) == 2
    assert lay.group_index.shape == (1, 6)
    assert lay.group_index[0].tolist() == [0, 1, 0, 1, 0, 1]


# -- FlexAttention interoperability -----------------------------------------------------------

def _flex(q, k, v, block_mask):
    from torch.nn.attention.flex_attention import flex_attention

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "called without torch.compile": eager is what we test
        return flex_attention(q, k, v, block_mask=block_mask)


@pytest.mark.parametrize("pattern,q_len,kv_len,heads", [
    (ac.sliding_window(5) | ac.global_tokens([0, 1]), 40, 40, 1),
    (ac.document([10, 20]), 32, 40, 1),
    (ac.per_head([ac.causal(), ac.sliding_window(3)]), 32, 32, 2),
])
def test_block_mask_export_runs_in_flex_attention(pattern, q_len, kv_len, heads):
    B, D = 2, 16
    q = torch.randn(B, heads, q_len, D, dtype=torch.float64)
    k = torch.randn(B, heads, kv_len, D, dtype=torch.float64)
    v = torch.randn(B, heads, kv_len, D, dtype=torch.float64)
    layout = pattern.layout(q_len, kv_len, 8, 8, batch=B, heads=heads)
    out = _flex(q, k, v, layout.to_block_mask())
    torch.testing.assert_close(out, ac.reference(pattern, q, k, v), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("pattern", [ac.causal() & ac.sliding_window(9), ac.per_head([ac.causal(), ac.full()])])
def test_block_mask_import_round_trip(pattern):
    layout = pattern.layout(48, 40, 16, 8, heads=2)
    back = BlockLayout.from_block_mask(layout.to_block_mask())
    assert (back.q_len, back.kv_len, back.block_m, back.block_n) == (48, 40, 16, 8)
    kinds = np.broadcast_to(layout.block_kinds(), back.block_kinds().shape)
    np.testing.assert_array_equal(back.block_kinds(), kinds)
    for h in range(2):
        assert torch.equal(back.pattern.to_dense(48, 40, h=h), pattern.to_dense(48, 40, h=h))
    # The imported layout drives the torch backend: each head's partial blocks use its own mask.
    from attncompiler.codegen.pytorch.attention import block_sparse_attention

    q, k, v = torch.randn(1, 2, 48, 16, dtype=torch.float64), *torch.randn(2, 1, 2, 40, 16, dtype=torch.float64)
    out, _ = block_sparse_attention(q, k, v, back, ac.Schedule(block_m=16, block_n=8), 0.25)
    torch.testing.assert_close(out, ac.reference(pattern, q, k, v, scale=0.25), atol=1e-10, rtol=0)


def test_block_mask_import_from_create_block_mask():
    from torch.nn.attention.flex_attention import create_block_mask

    def sliding(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx).abs() <= 4

    bm = create_block_mask(sliding, None, None, 40, 40, device="cpu", BLOCK_SIZE=8)
    back = BlockLayout.from_block_mask(bm)
    np.testing.assert_array_equal(back.block_kinds()[0, 0], ac.sliding_window(4).layout(40, 40, 8, 8).block_kinds()[0, 0])
