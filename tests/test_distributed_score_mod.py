"""score_mod and sinks on the sequence-parallel ring (2 spawned gloo ranks) against the single-process
compiled module and the float64 reference: outputs, lse, dq/dk/dv, captured tensors' and sinks' gradients."""

from __future__ import annotations

import datetime
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import attncompiler as ac
from attncompiler.distributed import plan_attention, ring_attention, shard_bounds
from attncompiler.errors import InputError

L, H, D, MAG = 37, 2, 8, 10.0  # odd length; q, k scaled by MAG: logits of a few hundred


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(1, H, L, D, generator=g, dtype=torch.float64) * MAG for _ in range(2))
    v, do = (torch.randn(1, H, L, D, generator=g, dtype=torch.float64) for _ in range(2))
    return q, k, v, do


def _case(name: str):
    """``(pattern, score_mod, params the score_mod or sinks hold, sinks)`` of one named case."""
    g = torch.Generator().manual_seed(len(name))
    if name == "softcap":
        sinks = torch.tensor([3.0, -2.0], dtype=torch.float64, requires_grad=True)
        return ac.causal(), ac.softcap(20.0), [sinks], sinks
    if name == "alibi":  # learnable slopes (the built-in's hand-written derivative)
        slopes = (ac.alibi_slopes(H, torch.float64) * 20).requires_grad_()
        sinks = torch.tensor([150.0, -40.0], dtype=torch.float64, requires_grad=True)
        return ac.causal(), ac.alibi(slopes), [slopes, sinks], sinks
    if name == "bias":  # a plain function capturing a learnable [H, L, L] bias (autograd's derivative)
        table = (torch.randn(H, L, L, generator=g, dtype=torch.float64) * 50).requires_grad_()

        def pair_bias(score, b, h, q_idx, kv_idx):
            return score + table[h, q_idx, kv_idx]

        return ac.causal(), pair_bias, [table], None
    if name == "dense_rows":  # global query rows: computed by the key owners (the dense-row exchange)
        table = (torch.randn(H, L, L, generator=g, dtype=torch.float64) * 50).requires_grad_()
        sinks = torch.tensor([100.0, 0.5], dtype=torch.float64, requires_grad=True)
        pat = ac.per_head([ac.sliding_window(1) | ac.global_tokens([0, 13]), ac.sliding_window(3)])
        return pat, ac.softcap(300.0) @ ac.bias(table), [table, sinks], sinks
    raise AssertionError(name)


_CASES = [("softcap", "contiguous"), ("softcap", "zigzag"), ("alibi", "contiguous"), ("alibi", "zigzag"),
          ("bias", "zigzag"), ("dense_rows", "contiguous")]


def _grads(loss, tensors):
    got = torch.autograd.grad(loss, tensors, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(got, tensors)]


def _check(name: str, sharding: str, rank: int, world: int) -> None:
    pattern, mod, params, sinks = _case(name)
    q, k, v, do = _inputs(seed=sum(map(ord, name + sharding)))
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    ref, ref_lse = ac.reference(pattern, *full, score_mod=mod, sinks=sinks, return_lse=True)
    ref_g = _grads((ref * do).sum(), full + params)
    attn = ac.compile(pattern, backend="torch", score_mod=mod, sinks=sinks, schedule=ac.Schedule(block_m=8, block_n=8))
    one, one_lse = attn(*full, return_lse=True)
    one_g = _grads((one * do).sum(), full + params)

    plan = plan_attention(pattern, L, world, batch=1, heads=H, head_dim=D, elem_bytes=8, sharding=sharding,
                          dense_rows=True if name == "dense_rows" else None)
    if name == "dense_rows":
        assert any(plan.dense_rows), plan.dense_rows
    sh = plan.sharding
    mine = [sh.shard(t, rank).clone().requires_grad_() for t in (q, k, v)]
    out, lse = ring_attention(pattern, *mine, seq_len=L, plan=plan, score_mod=mod, sinks=sinks,
                              schedule=ac.Schedule(block_m=8, block_n=8))
    got = _grads((out * sh.shard(do, rank)).sum(), mine + params)
    for g in got[3:]:  # captured tensors and sinks: this rank's share, summed over the ranks
        dist.all_reduce(g)
    tol = dict(atol=1e-8, rtol=1e-7)
    for want_out, want_lse, want_g in ((ref, ref_lse, ref_g), (one, one_lse, one_g)):
        torch.testing.assert_close(out, sh.shard(want_out, rank).detach(), **tol)
        torch.testing.assert_close(lse, sh.shard(want_lse, rank).detach(), **tol)
        for i, (a, b) in enumerate(zip(got, want_g)):
            b = sh.shard(b, rank) if i < 3 else b
            torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{name}/{sharding} grad {i}: {m}")


def _refusals(rank: int) -> None:
    q, k, v, _ = _inputs(0)
    a, b = shard_bounds(L, 2)[rank:rank + 2]
    local = [t[:, :, a:b] for t in (q, k, v)]
    with pytest.raises(InputError, match=r"sinks must be .*\[2\]"):
        ring_attention(ac.causal(), *local, seq_len=L, sinks=torch.zeros(3))
    with pytest.raises(InputError, match="alibi has 3 slopes"):
        ring_attention(ac.causal(), *local, seq_len=L, score_mod=ac.alibi(torch.ones(3)))
    with pytest.raises(InputError, match="bias of shape"):  # checked against the whole sequence
        ring_attention(ac.causal(), *local, seq_len=L, score_mod=ac.bias(torch.zeros(H, L - 1, L)))


def _worker(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=30))
    try:
        for name, sharding in _CASES:
            _check(name, sharding, rank, world)
        _refusals(rank)
    finally:
        dist.destroy_process_group()


def test_ring_score_mod_and_sinks_match_single_process_and_reference():
    mp.spawn(_worker, args=(2, _free_port()), nprocs=2, join=True)
