"""Distribution plans: shard needs equal the dense mask's, byte counts, CLI, speed at 1M tokens."""

from __future__ import annotations

import time

import pytest
import torch

import attncompiler as ac
from attncompiler.cli.main import main
from attncompiler.distributed import dense_plan, make_sharding, plan_attention
from attncompiler.distributed.pieces import coarsen, covers, length, merge, subtract
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
@pytest.mark.parametrize("dense_rows", [None, False])
def test_needs_and_key_ranges_match_dense_mask(pattern, L, P, block, sharding, dense_rows):
    plan = plan_attention(pattern, L, P, block=block, heads=2, sharding=sharding, dense_rows=dense_rows)
    m = _dense_mask(pattern, L)
    sh = plan.sharding
    for i in range(P):
        ring_rows = torch.ones(sh.local_len(i), dtype=torch.bool)  # local query rows served by the ring
        for g0, g1, l0 in plan.dense_rows[i]:
            ring_rows[l0:l0 + g1 - g0] = False
        for j in range(P):
            sub = m[sh.indices(i)][:, sh.indices(j)]  # [Li, Lj] in local orders
            assert plan.need[i, j] == bool(sub[ring_rows].any()), (i, j)
            assert plan.dense_need[i, j] >= bool(sub[~ring_rows].any()), (i, j)  # dense rows reach their keys
            pieces = plan.key_pieces[i][j]
            assert all(a < b < c for (_, a), (b, c) in zip(pieces, pieces[1:])) or len(pieces) < 2  # disjoint, sorted
            assert len(pieces) <= 8 and all(0 <= a < b <= sh.local_len(j) for a, b in pieces)
            covered = torch.zeros(sh.local_len(j), dtype=torch.bool)
            for a, b in pieces:
                covered[a:b] = True
            assert not (sub[ring_rows].any(0) & ~covered).any(), (i, j, pieces)  # every needed key row is carried
            if plan.need[i, j]:
                assert tuple(plan.key_range[i, j]) == (pieces[0][0], pieces[-1][1])
    if dense_rows is False or not any(_dense_mask(pattern, L).all(1)):  # no global query rows: none are dense
        assert not any(plan.dense_rows)


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
            assert covers(plan.hop_pieces[j][hits[0][0]][hits[0][1]], plan.key_pieces[i][j])
            lo, hi = plan.hop_range[j, hits[0][0], hits[0][1]]
            assert lo <= plan.key_range[i, j, 0] and plan.key_range[i, j, 1] <= hi
    for o in range(P):
        for d in (0, 1):
            for t in range(1, int(plan.hops[o, d]) + 1):  # a travelling buffer only shrinks, piece by piece
                assert covers(plan.hop_pieces[o][d][t - 1], plan.hop_pieces[o][d][t])
    dense_sent = [0] * P  # the dense-row exchange: queries out, partials back
    for o in range(P):
        n = sum(b - a for a, b, _ in plan.dense_rows[o])
        for j in range(P):
            if j != o and plan.dense_need[o, j]:
                dense_sent[o] += n * plan.q_row_bytes
                dense_sent[j] += n * plan.part_row_bytes
    for r in range(P):
        sent = sum(length(plan.send(r, s, d)[1]) * row
                   for s in range(1, plan.steps + 1) for d in (0, 1) if plan.send(r, s, d))
        assert sent + dense_sent[r] == plan.ranks[r].bytes_sent
    assert plan.total_bytes == sum(r.bytes_recv for r in plan.ranks) <= plan.dense_total_bytes
    assert plan.total_bytes_fwd_bwd - plan.total_bytes == sum(r.backward_bytes_recv for r in plan.ranks)
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


def test_global_tokens_travel_as_small_pieces_and_dense_query_rows():
    """Issue 9: global keys are a small piece of their shard, global queries go to the key owners."""
    pattern = ac.sliding_window(256) | ac.global_tokens([0, 1, 2, 3])
    for P in (2, 4):
        plan = plan_attention(pattern, 65536, P)
        assert plan.dense_total_bytes >= 50 * plan.total_bytes  # was 1.0x (P=2), 2.4x (P=4)
        assert 2 * plan.dense_total_bytes >= 50 * plan.total_bytes_fwd_bwd
        assert plan.dense_rows[0] == ((0, 64, 0),) and not any(plan.dense_rows[1:])  # the global query block
        assert plan.dense_need[0].all()
        assert plan.key_pieces[1][0] == ((0, 64), (65536 // P - 256, 65536 // P))  # global keys + window strip
    pieces_only = plan_attention(pattern, 65536, 4, dense_rows=False)
    assert not any(pieces_only.dense_rows) and pieces_only.total_bytes > plan.total_bytes
    for p in (ac.causal(), ac.sliding_window(256), ac.document([1000, 30000]).causal()):
        assert not any(plan_attention(p, 65536, 4).dense_rows)  # not worth it by the plan's count
    t0 = time.perf_counter()
    big = plan_attention(pattern, 1 << 20, 8)
    assert time.perf_counter() - t0 < 1.0
    assert big.dense_total_bytes >= 100 * big.total_bytes


def test_pieces_helpers():
    assert merge([(5, 7), (0, 2), (2, 3), (6, 9), (4, 4)]) == ((0, 3), (5, 9))
    assert coarsen(((0, 1), (3, 4), (10, 11), (12, 13)), 2) == ((0, 4), (10, 13))  # smallest gaps filled
    assert coarsen(((0, 1), (3, 4)), 2) == ((0, 1), (3, 4))
    assert subtract(((0, 10),), ((2, 3), (5, 12))) == ((0, 2), (3, 5))
    assert covers(((0, 4), (6, 9)), ((1, 3), (6, 9))) and not covers(((0, 4), (6, 9)), ((3, 7),))


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
    assert main(["plan", "bigbird", "-L", "4096", "-P", "2"]) == 0
    assert "128 dense query rows" in capsys.readouterr().out  # the 128 global tokens
    assert main(["plan", "bigbird", "-L", "4096", "-P", "2", "--dense-rows", "off"]) == 0
    assert "dense query rows" not in capsys.readouterr().out


@pytest.mark.parametrize("pattern", [ac.sliding_window(3) | ac.global_tokens([1]), ac.document([7, 9, 14]).causal(),
                                     ac.mask(lambda b, h, q, k: (q * 7 + k) % 5 != 0)], ids=repr)
def test_shifted_pattern_equals_offset_window_of_the_mask(pattern):
    from attncompiler.distributed.local import shifted_pattern

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
