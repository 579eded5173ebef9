"""Distributed attention: multi-process (spawned, gloo) checks against the float64 reference."""

from __future__ import annotations

import datetime
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import attncompiler as ac
from attncompiler.distributed import (dense_plan, head_parallel_attention, plan_attention, ring_attention,
                                     shard_bounds)
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


def _check_ring(pattern, L: int, rank: int, world: int, dense_ring: bool = False) -> None:
    q, k, v, do = _inputs(L)
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ref, ref_lse = ac.reference(pattern, *ref_in, return_lse=True)
    (ref * do).sum().backward()
    a, b = shard_bounds(L, world)[rank:rank + 2]
    ql, kl, vl = (t[:, :, a:b].clone().requires_grad_() for t in (q, k, v))
    stats: dict = {}
    out, lse = ring_attention(pattern, ql, kl, vl, seq_len=L, stats=stats, dense_ring=dense_ring)
    (out * do[:, :, a:b]).sum().backward()
    torch.testing.assert_close(out, ref[:, :, a:b].detach(), atol=1e-9, rtol=1e-7)
    torch.testing.assert_close(lse, ref_lse[:, :, a:b].detach(), atol=1e-9, rtol=1e-7)
    for got, want in zip((ql, kl, vl), ref_in):
        torch.testing.assert_close(got.grad, want.grad[:, :, a:b], atol=1e-9, rtol=1e-7)
    plan = plan_attention(pattern, L, world, batch=1, heads=2, head_dim=8, elem_bytes=8)
    plan = dense_plan(plan) if dense_ring else plan
    # the plan's byte counts are the bytes actually handed to torch.distributed, both directions
    assert stats.get("forward_bytes_sent", 0) == plan.ranks[rank].bytes_sent, (stats, plan.ranks[rank])
    assert stats.get("backward_bytes_sent", 0) == plan.ranks[rank].bytes_recv, (stats, plan.ranks[rank])


def _check_heads(pattern, L: int, H: int, rank: int, world: int, gather: bool) -> None:
    q, k, v, do = _inputs(L, H=H)
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = ac.reference(pattern, *ref_in)
    (ref * do).sum().backward()
    mine = [t.clone().requires_grad_() for t in (q, k, v)]
    out, (h0, h1) = head_parallel_attention(pattern, *mine, gather=gather)
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
    "document_causal": lambda: ac.document([7, 9, 14]).causal(),
    "per_head": lambda: ac.per_head([ac.causal(), ac.sliding_window(4)]),
}


def _worker(rank: int, world: int, port: int, L: int) -> None:
    _init(rank, world, port)
    try:
        for name, make in _PATTERNS.items():
            _check_ring(make(), L, rank, world)
        _check_ring(ac.sliding_window(3), L, rank, world, dense_ring=True)  # the measured baseline
        _check_heads(ac.causal(), L, 5, rank, world, gather=False)   # 5 heads: uneven split
        _check_heads(ac.per_head([ac.causal(), ac.sliding_window(4)]), L, 4, rank, world, gather=True)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world,L", [(2, 23), (4, 30)])
def test_ring_and_heads_match_reference(world, L):
    mp.spawn(_worker, args=(world, _free_port(), L), nprocs=world, join=True)


def _stalling_worker(rank: int, world: int, port: int, path: str) -> None:
    _init(rank, world, port, timeout_s=2.0)
    if rank == 1:  # never joins the exchange (a hung or dead peer), outlives rank 0's timeout
        time.sleep(4.0)
        return
    q, k, v, _ = _inputs(20)
    try:
        ring_attention(ac.full(), q[:, :, :10], k[:, :, :10], v[:, :, :10], seq_len=20)
    except CommunicationError as e:
        with open(path, "w") as f:
            f.write(str(e))


def test_stalled_rank_gives_clear_error_not_hang(tmp_path):
    path = tmp_path / "err.txt"
    t0 = time.perf_counter()
    mp.spawn(_stalling_worker, args=(2, _free_port(), str(path)), nprocs=2, join=True)
    assert time.perf_counter() - t0 < 30
    msg = path.read_text()
    assert "rank 0" in msg and "ranks [1]" in msg and "timeout" in msg, msg


def test_structural_family_rejected():
    from attncompiler.errors import UnsupportedError
    from attncompiler.distributed import require_mask_family

    class Fake:
        family = "combiner"

    with pytest.raises(UnsupportedError, match="combiner"):
        require_mask_family(Fake())
    with pytest.raises(UnsupportedError, match="combiner"):
        plan_attention(ac.combiner_fixed(4), 64, 2)
