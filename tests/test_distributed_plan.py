"""Distribution plans: shard needs equal the dense mask's, byte counts, CLI, speed at 1M tokens."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

import attncompiler as ac
from attncompiler.cli import main
from attncompiler.distributed import dense_plan, plan_attention, shard_bounds
from attncompiler.errors import LayoutError, UnsupportedError

_PATTERNS = [ac.causal(), ac.sliding_window(3), ac.sliding_window(2) | ac.global_tokens([1]),
             ac.document([7, 9, 14]).causal(), ac.dilated_window(4, 2), ac.prefix_lm(5),
             ac.per_head([ac.causal(), ac.sliding_window(4)])]


@pytest.mark.parametrize("pattern", _PATTERNS, ids=repr)
@pytest.mark.parametrize("L,P,block", [(30, 4, None), (23, 2, None), (37, 3, 4)])
def test_needs_and_key_ranges_match_dense_mask(pattern, L, P, block):
    plan = plan_attention(pattern, L, P, block=block, heads=2)
    idx = torch.arange(L)
    m = torch.zeros(L, L, dtype=torch.bool)
    for h in range(2):
        m |= pattern.evaluate(0, h, idx[:, None], idx[None, :], L, L)  # [L, L]
    b = shard_bounds(L, P)
    for i in range(P):
        for j in range(P):
            sub = m[b[i]:b[i + 1], b[j]:b[j + 1]]
            assert plan.need[i, j] == bool(sub.any()), (i, j)
            if sub.any():
                cols = torch.nonzero(sub.any(0)).flatten() + b[j]
                lo, hi = plan.key_range[i, j]
                assert b[j] <= lo <= int(cols.min()) and int(cols.max()) < hi <= b[j + 1]


def test_byte_counts_are_consistent():
    plan = plan_attention(ac.sliding_window(5), 40, 4, heads=3, head_dim=16, elem_bytes=2)
    row = 3 * 2 * 16 * 2
    for r in plan.ranks:
        assert r.bytes_sent == sum(plan.pair_bytes[i, r.rank] for i in range(4) if i != r.rank)
        assert r.bytes_recv == sum(plan.pair_bytes[r.rank, j] for j in range(4) if j != r.rank)
        assert r.dense_bytes_sent == 10 * row * 3
    lo, hi = plan.key_range[..., 0], plan.key_range[..., 1]
    np.testing.assert_array_equal(plan.pair_bytes, (hi - lo) * row)
    assert plan.total_bytes == sum(r.bytes_recv for r in plan.ranks)
    d = dense_plan(plan)
    assert d.total_bytes == plan.dense_total_bytes == 4 * 3 * 10 * row


def test_sliding_window_target_and_million_token_plan_speed():
    plan = plan_attention(ac.sliding_window(256), 65536, 4)
    assert plan.dense_total_bytes >= 4 * plan.total_bytes
    assert plan.need.sum() == 4 + 2 * 3  # own shard and the two neighbours only
    t0 = time.perf_counter()
    big = plan_attention(ac.sliding_window(256), 1 << 20, 8)
    assert time.perf_counter() - t0 < 1.0
    assert big.dense_total_bytes >= 4 * big.total_bytes


def test_heads_mode_and_errors():
    plan = plan_attention(ac.causal(), 64, 2, "heads", heads=3, gather=True, head_dim=8)
    per_head = ac.causal().layout(64, 64, 32).num_blocks
    assert plan.ranks[0].blocks_computed + plan.ranks[1].blocks_computed == 3 * per_head
    assert plan.ranks[0].bytes_sent == 2 * 64 * 8 * 4  # padded 2-head chunk to one peer
    with pytest.raises(LayoutError, match="heads"):
        plan_attention(ac.causal(), 64, 4, "heads", heads=2)
    with pytest.raises(LayoutError, match="world_size"):
        plan_attention(ac.causal(), 3, 4)
    with pytest.raises(UnsupportedError, match="mode"):
        plan_attention(ac.causal(), 64, 2, "pipeline")


def test_cli_plan_prints_table(capsys):
    assert main(["plan", "sliding_window(window=256)", "--seq-len", "65536", "--world-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "128.00x fewer" in out and "[16384, 32768)" in out
    assert main(["plan", "causal", "-L", "1001", "-P", "4", "--json"]) == 0
    assert '"world_size": 4' in capsys.readouterr().out


@pytest.mark.parametrize("pattern", [ac.sliding_window(3) | ac.global_tokens([1]), ac.document([7, 9, 14]).causal(),
                                     ac.mask(lambda b, h, q, k: (q * 7 + k) % 5 != 0)], ids=repr)
def test_shifted_pattern_equals_offset_window_of_the_mask(pattern):
    from attncompiler.distributed.ring import shifted_pattern

    L, qa, ka = 30, 11, 4
    idx = torch.arange(L)
    full = pattern.evaluate(0, 0, idx[:, None], idx[None, :], L, L)  # [L, L]
    sub = shifted_pattern(pattern, qa, ka, L)
    i, j = torch.arange(12)[:, None], torch.arange(9)[None, :]
    torch.testing.assert_close(sub.evaluate(0, 0, i, j, 12, 9), full[qa:qa + 12, ka:ka + 9])


def test_merge_partials_equals_attention_over_the_union():
    from attncompiler.distributed import merge_partials

    q, k, v = (torch.randn(1, 2, 5, 4, dtype=torch.float64) for _ in range(3))  # [B, H, L, D]
    ref, ref_lse = ac.reference(ac.full(), q, k, v, return_lse=True)
    parts = [ac.reference(ac.full(), q, k[:, :, s], v[:, :, s], scale=0.5, return_lse=True)
             for s in (slice(0, 2), slice(2, 5))]
    out, lse = merge_partials([p[0] for p in parts], [p[1] for p in parts])
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(lse, ref_lse)
