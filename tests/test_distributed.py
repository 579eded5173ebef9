"""Distributed attention: multi-process (spawned, gloo) checks against the float64 reference."""

from __future__ import annotations

import datetime
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import attncompiler as ac
from attncompiler.distributed import dense_plan, head_parallel_attention, plan_attention, ring_attention
from attncompiler.distributed.comm import CommunicationError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank: int, world: int, port: int, timeout_s: float = 20.0) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))


def _inputs(L: int, H: int = 2, D: int = 8):
    g = torch.Generator().manual_seed(1234)
    q, k, v, do = (torch.randn(1, H, L, D, generator=g, dtype=torch.float64) for _ in range(4))  # [B, H, L, D]
    return q, k, v, do


def _check_ring(pattern, L: int, rank: int, world: int, sharding: str = "contiguous", dense_ring: bool = False,
                overlap: bool = True, group=None, dense_rows: bool | None = None) -> None:
    q, k, v, do = _inputs(L)
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ref, ref_lse = ac.reference(pattern, *ref_in, return_lse=True)
    (ref * do).sum().backward()
    plan = plan_attention(pattern, L, world, batch=1, heads=2, head_dim=8, elem_bytes=8, sharding=sharding,
                          dense_rows=dense_rows)
    if dense_rows is not None:  # the case exercises (or avoids) the dense-row exchange
        assert any(plan.dense_rows) == dense_rows, plan.dense_rows
    sh = plan.sharding
    ql, kl, vl = (sh.shard(t, rank).clone().requires_grad_() for t in (q, k, v))
    stats: dict = {}
    out, lse = ring_attention(pattern, ql, kl, vl, seq_len=L, stats=stats, plan=plan, dense_ring=dense_ring,
                              overlap=overlap, group=group)
    (out * sh.shard(do, rank)).sum().backward()
    torch.testing.assert_close(out, sh.shard(ref, rank).detach(), atol=1e-9, rtol=1e-7)
    torch.testing.assert_close(lse, sh.shard(ref_lse, rank).detach(), atol=1e-9, rtol=1e-7)
    for got, want in zip((ql, kl, vl), ref_in):
        torch.testing.assert_close(got.grad, sh.shard(want.grad, rank), atol=1e-9, rtol=1e-7)
    plan = dense_plan(plan) if dense_ring else plan
    # the plan's byte counts are the bytes actually handed to torch.distributed, both directions
    assert stats.get("forward_bytes_sent", 0) == plan.ranks[rank].bytes_sent, (stats, plan.ranks[rank])
    assert stats.get("backward_bytes_sent", 0) == plan.ranks[rank].backward_bytes_sent, (stats, plan.ranks[rank])
    # and what every rank sent is what the others received (sum over ranks, both passes)
    mine = plan.ranks[rank]
    sent = torch.tensor([stats.get("forward_bytes_sent", 0), mine.bytes_recv, stats.get("backward_bytes_sent", 0),
                         mine.backward_bytes_recv], dtype=torch.float64)
    dist.all_reduce(sent, group=group)
    assert sent[0] == sent[1] and sent[2] == sent[3], sent


def _check_heads(pattern, L: int, H: int, rank: int, world: int, gather: bool, group=None) -> None:
    q, k, v, do = _inputs(L, H=H)
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = ac.reference(pattern, *ref_in)
    (ref * do).sum().backward()
    mine = [t.clone().requires_grad_() for t in (q, k, v)]
    out, (h0, h1) = head_parallel_attention(pattern, *mine, gather=gather, group=group)
    if gather:
        torch.testing.assert_close(out, ref.detach(), atol=1e-9, rtol=1e-7)
        (out * do).sum().backward()
    else:
        torch.testing.assert_close(out, ref[:, h0:h1].detach(), atol=1e-9, rtol=1e-7)
        (out * do[:, h0:h1]).sum().backward()
    for got, want in zip(mine, ref_in):
        torch.testing.assert_close(got.grad[:, h0:h1], want.grad[:, h0:h1], atol=1e-9, rtol=1e-7)
        assert float(got.grad[:, :h0].abs().sum() + got.grad[:, h1:].abs().sum()) == 0.0


_PATTERNS = {
    "causal": lambda: ac.causal(),
    "window": lambda: ac.sliding_window(3),
    "global_window": lambda: ac.sliding_window(2) | ac.global_tokens([1]),
    # global tokens at the start and inside a shard, per head: dense query rows on several ranks
    "global_query": lambda: ac.per_head([ac.sliding_window(1) | ac.global_tokens([0, 13]), ac.sliding_window(3)]),
    "document_causal": lambda: ac.document([7, 9, 14]).causal(),
    "per_head": lambda: ac.per_head([ac.causal(), ac.sliding_window(4)]),
}


# (pattern, sharding): every sharding on a causal pattern, the others where they matter
_RING_CASES = [("causal", "contiguous"), ("causal", "zigzag"), ("causal", "striped"), ("window", "contiguous"),
               ("global_window", "zigzag"), ("document_causal", "auto"), ("per_head", "striped"),
               ("window", "auto")]
# (pattern, sharding, dense_rows): global query rows by the dense-row exchange or by the ring (pieces only)
_DENSE_CASES = [("global_query", "contiguous", True), ("global_query", "striped", True),
                ("global_window", "contiguous", False)]


def _stall_check(rank: int, path: str) -> None:
    """Global rank 2 never joins the exchange (a hung or dead peer) and outlives rank 0's 2 s timeout."""
    group = dist.new_group([0, 2], timeout=datetime.timedelta(seconds=2.0))
    if rank == 2:
        time.sleep(4.0)
    if rank != 0:
        return
    q, k, v, _ = _inputs(20)
    t0 = time.perf_counter()
    try:
        ring_attention(ac.full(), q[:, :, :10], k[:, :, :10], v[:, :, :10], seq_len=20, group=group)
    except CommunicationError as e:
        with open(path, "w") as f:
            f.write(f"{time.perf_counter() - t0:.1f}\n{e}")


def _cases(rank: int, world: int, L: int, group) -> None:
    for name, sharding in _RING_CASES:
        _check_ring(_PATTERNS[name](), L, rank, world, sharding=sharding, group=group)
    for name, sharding, dense in _DENSE_CASES:
        _check_ring(_PATTERNS[name](), L, rank, world, sharding=sharding, dense_rows=dense, group=group)
    _check_ring(ac.sliding_window(3), L, rank, world, dense_ring=True, group=group)  # the measured baseline
    _check_ring(_PATTERNS["global_window"](), L, rank, world, dense_ring=True, group=group)
    _check_ring(ac.causal(), L, rank, world, sharding="zigzag", overlap=False, group=group)
    _check_heads(ac.causal(), L, 5, rank, world, gather=False, group=group)   # 5 heads: uneven split
    _check_heads(ac.per_head([ac.causal(), ac.sliding_window(4)]), L, 4, rank, world, gather=True, group=group)


def _worker(rank: int, world: int, port: int, path: str) -> None:
    # one spawn of 4 processes (a spawn costs seconds of imports per process): world size 4 on the
    # world group, world size 2 on the subgroup of global ranks {1, 3} (P2P ops map group ranks to
    # global ones), then the stall check on {0, 2}
    _init(rank, world, port)
    try:
        _cases(rank, world, 30, None)
        pair = dist.new_group([1, 3])
        if rank in (1, 3):
            _cases(dist.get_rank(pair), 2, 23, pair)
        _stall_check(rank, path)
    finally:
        dist.destroy_process_group()


def test_ring_and_heads_match_reference_on_2_and_4_ranks_and_stall_gives_clear_error(tmp_path):
    path = tmp_path / "err.txt"
    mp.spawn(_worker, args=(4, _free_port(), str(path)), nprocs=4, join=True)
    seconds, msg = path.read_text().split("\n", 1)  # a stalled peer: a clear error after the timeout, no hang
    assert float(seconds) < 20
    assert "rank 0" in msg and "ranks [2]" in msg and "timeout" in msg, msg


def test_structural_family_rejected():
    from attncompiler.errors import UnsupportedError
    from attncompiler.distributed import require_mask_family

    class Fake:
        family = "combiner"

    with pytest.raises(UnsupportedError, match="combiner"):
        require_mask_family(Fake())
    with pytest.raises(UnsupportedError, match="combiner"):
        plan_attention(ac.combiner_fixed(4), 64, 2)
