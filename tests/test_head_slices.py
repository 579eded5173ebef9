"""Running a diffusion program slice by slice of heads (the CPU cache schedule) is exact."""

from __future__ import annotations

import pytest
import torch

import attncompiler as ac
from attncompiler.program import head_slices
from attncompiler.families.diffusion.pattern import diffuse
from attncompiler.program.head_slices import choose_head_block, group_compatible, run_by_head_slices
from attncompiler.patterns.diffuser import diffuser
from oracle import assert_matches_oracle


def test_group_compatible_never_straddles_a_gqa_group():
    assert group_compatible(5, heads=8, kv_heads=2) == 4  # whole groups of 4
    assert group_compatible(3, heads=8, kv_heads=2) == 2  # a divisor of the group
    assert group_compatible(1, heads=8, kv_heads=2) == 1
    assert group_compatible(99, heads=8, kv_heads=8) == 8
    assert group_compatible(0, heads=6, kv_heads=1) == 1


def test_choose_head_block_fits_the_budget():
    assert choose_head_block(100, batch=2, heads=4, kv_heads=4, budget=800) == 8  # all fit: no slicing
    assert choose_head_block(100, batch=2, heads=4, kv_heads=4, budget=399) == 3
    assert choose_head_block(100, batch=1, heads=8, kv_heads=2, budget=500) == 4
    assert choose_head_block(10**9, batch=1, heads=8, kv_heads=2, budget=500) == 1


def test_run_by_head_slices_sees_matching_key_value_heads():
    B, H, Hkv, L = 2, 6, 3, 5
    q = torch.arange(B * H, dtype=torch.float32).view(B, H, 1, 1).expand(B, H, L, 1)
    k = torch.arange(B * Hkv, dtype=torch.float32).view(B, Hkv, 1, 1).expand(B, Hkv, L, 1)
    seen = []

    def run(qq, kk, vv):
        seen.append((qq.shape[1], kk.shape[1]))
        g = qq.shape[1] // kk.shape[1]
        return qq * 100 + kk.repeat_interleave(g, dim=1)  # which kv head each q head met

    out = run_by_head_slices(run, q, k, k, head_block=1)
    want = q * 100 + k.repeat_interleave(H // Hkv, dim=1)
    assert torch.equal(out, want)
    assert seen == [(1, 1)] * (B * H)
    seen.clear()
    assert torch.equal(run_by_head_slices(run, q, k, k, head_block=5), want)  # rounded to 4: two groups
    assert seen == [(4, 2), (2, 1)] * B


@pytest.mark.parametrize("block", [1, 2, "auto"])
def test_sliced_diffusion_matches_reference_forward_backward(block, monkeypatch):
    monkeypatch.setattr(head_slices, "SLICE_BYTES", 1)  # "auto": one head per slice
    pattern = diffuse(ac.sliding_window(3) | ac.global_tokens([0]) | ac.random_blocks(1, block=8, seed=2), hops=3)
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(2, 4, 40, 8, generator=gen, requires_grad=True)
    k, v = (torch.randn(2, 2, 40, 8, generator=gen, requires_grad=True) for _ in range(2))
    attn = ac.compile(pattern, backend="torch", schedule=ac.Schedule(block_m=8, block_n=8))
    attn.head_block = block
    out = attn(q, k, v)
    assert_matches_oracle(out, ac.reference(pattern, q, k, v), (q, k, v), atol=1e-5, grad_atol=1e-5)


def test_auto_slices_one_head_at_a_time_when_heads_outgrow_the_cache():
    attn = ac.compile(diffuser(), backend="torch", schedule=ac.Schedule(block_m=32, block_n=32))
    q = torch.zeros(1, 2, 4096, 64)
    from attncompiler.runtime.diffusion import choose_diffusion_head_block

    program = attn.program_for("torch", 4096, 64)
    assert choose_diffusion_head_block(attn.pattern, program, "torch", q, q, q) == 1  # ~6 MiB a head
    small = torch.zeros(1, 2, 512, 64)
    assert choose_diffusion_head_block(attn.pattern, program, "torch", small, small, small) == 2


def test_bad_head_block_raises():
    attn = ac.compile(diffuse(ac.sliding_window(2), hops=1), backend="torch")
    attn.head_block = 0
    q = torch.randn(1, 1, 8, 4)
    with pytest.raises(ac.InputError, match="head_block"):
        attn(q, q, q)
