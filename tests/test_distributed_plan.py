"""Distribution plans: shard needs equal the dense mask's, byte counts, CLI, speed at 1M tokens."""

from __future__ import annotations

import time

import pytest
import torch

import attncompiler as ac
from attncompiler.cli import main
from attncompiler.distributed import dense_plan, make_sharding, plan_attention
from attncompiler.errors import LayoutError, UnsupportedError

_PATTERNS = [ac.causal(), ac.sliding_window(3), ac.sliding_window(2) | ac.global_tokens([1]),
             ac.document([7, 9, 14]).causal(), ac.dilated_window(4, 2), ac.prefix_lm(5),
             ac.per_head([ac.causal(), ac.sliding_window(4)])]


def _dense_mask(pattern, L: int, heads: int = 2) -> torch.Tensor:
    idx = torch.arange(L)
    m = torch.zeros(L, L, dtype=torch.bool)
    for h in range(heads):
        m |= pattern.evaluate(0, h, idx[:, None], idx[None, :], L, L)  # [L, L]
    return m


@pytest.mark.parametrize("pattern", _PATTERNS, ids=repr)
@pytest.mark.parametrize("L,P,block,sharding", [(30, 4, None, "contiguous"), (23, 2, None, "zigzag"),
                                                 (37, 3, 4, "contiguous"), (37, 3, None, "striped"),
                                                 (45, 4, 2, "zigzag")])
def test_needs_and_key_ranges_match_dense_mask(pattern, L, P, block, sharding):
    plan = plan_attention(pattern, L, P, block=block, heads=2, sharding=sharding)
    m = _dense_mask(pattern, L)
    sh = plan.sharding
    for i in range(P):
        for j in range(P):
            sub = m[sh.indices(i)][:, sh.indices(j)]  # [Li, Lj] in local orders
            assert plan.need[i, j] == bool(sub.any()), (i, j)
            if sub.any():
                cols = torch.nonzero(sub.any(0)).flatten()  # local key rows of rank j
                lo, hi = plan.key_range[i, j]
                assert 0 <= lo <= int(cols.min()) and int(cols.max()) < hi <= sh.local_len(j)


@pytest.mark.parametrize("pattern", _PATTERNS[:4], ids=repr)
@pytest.mark.parametrize("sharding", ["contiguous", "zigzag", "striped"])
def test_ring_routes_deliver_every_needed_row_and_bytes_add_up(pattern, sharding):
    P, row = 5, 2 * 2 * 16 * 2
    plan = plan_attention(pattern, 61, P, heads=2, head_dim=16, elem_bytes=2, sharding=sharding)
    for i in range(P):
        for j in range(P):
            if i == j or not plan.need[i, j]:
                continue
            hits = [(d, t) for d in (0, 1) for t in range(1, int(plan.hops[j, d]) + 1)
                    if (j + (1 - 2 * d) * t) % P == i]
            assert len(hits) == 1, (i, j, hits)  # reached exactly once, by one direction
            lo, hi = plan.hop_range[j, hits[0][0], hits[0][1]]
            assert lo <= plan.key_range[i, j, 0] and plan.key_range[i, j, 1] <= hi
    for o in range(P):
        for d in (0, 1):
            for t in range(1, int(plan.hops[o, d]) + 1):  # a travelling buffer only shrinks
                (a, b), (c, e) = plan.hop_range[o, d, t - 1], plan.hop_range[o, d, t]
                assert a <= c < e <= b
    for r in range(P):
        sent = sum((plan.send(r, s, d)[2] - plan.send(r, s, d)[1]) * row
                   for s in range(1, plan.steps + 1) for d in (0, 1) if plan.send(r, s, d))
        assert sent == plan.ranks[r].bytes_sent
    assert plan.total_bytes == sum(r.bytes_recv for r in plan.ranks) <= plan.dense_total_bytes
    d = dense_plan(plan)
    assert d.total_bytes == plan.dense_total_bytes == (P - 1) * 61 * row


def test_zigzag_balances_causal_and_auto_chooses():
    causal = {k: plan_attention(ac.causal(), 4096, 4, sharding=k) for k in ("contiguous", "zigzag", "striped")}
    assert causal["contiguous"].imbalance > 1.6  # the last rank computes 7/4 of the mean
    assert causal["zigzag"].imbalance < 1.02  # 4 stripes per rank: better than contiguous, worse than zigzag
    assert 1.02 < causal["striped"].imbalance < 1.25
    blocks = [r.blocks_computed for r in causal["zigzag"].ranks]
    assert sum(blocks) == sum(r.blocks_computed for r in causal["contiguous"].ranks)
    auto = plan_attention(ac.causal(), 4096, 4, sharding="auto")
    assert auto.sharding.kind == "zigzag" and {s.kind for s in auto.alternatives} == {"contiguous", "zigzag", "striped"}
    window = plan_attention(ac.sliding_window(64), 4096, 4, sharding="auto")
    assert window.sharding.kind == "contiguous"  # already balanced: keep the fewest bytes
    assert window.total_bytes < min(s.total_bytes for s in window.alternatives if s.kind != "contiguous")


@pytest.mark.parametrize("kind", ["contiguous", "zigzag", "striped"])
def test_sharding_shard_unshard_round_trip(kind):
    sh = make_sharding(kind, 29, 3)
    x = torch.randn(2, 3, 29, 4)  # [B, H, L, D]
    parts = [sh.shard(x, r) for r in range(3)]
    assert [p.shape[2] for p in parts] == [sh.local_len(r) for r in range(3)]
    torch.testing.assert_close(sh.unshard(parts), x)
    torch.testing.assert_close(torch.cat([sh.indices(r) for r in range(3)]).sort().values, torch.arange(29))
    for r in range(3):
        torch.testing.assert_close(parts[r], x[:, :, sh.indices(r)])
    if kind == "zigzag":
        assert [(a, b) for a, b, _ in sh.segments(0)] == [(0, 4), (24, 29)]
    with pytest.raises(LayoutError, match="zigzag"):
        make_sharding("zigzag", 5, 3)
    with pytest.raises(LayoutError, match="sharding"):
        plan_attention(ac.causal(), 64, 2, sharding="diagonal")


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
    assert main(["plan", "causal", "-L", "4096", "-P", "4", "--sharding", "auto"]) == 0
    out = capsys.readouterr().out
    assert "sharding=zigzag" in out and "<- chosen" in out and "imbalance" in out
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
