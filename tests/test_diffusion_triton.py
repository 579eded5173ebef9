"""Diffusion on the triton backend (interpreter on CPU), compared with the float64 reference:
the recompute schedule (generated BlockSparseAttention kernels joined by Axpby) and the
stored-P schedule (generated SparseProbs / SpMM-hop kernels and their backward)."""

from __future__ import annotations

import pytest
import torch

import attncompiler as ac
from attncompiler.families.diffusion.pattern import diffuse
from oracle import assert_matches_oracle


def test_triton_recompute_schedule_matches_reference_forward_backward():
    p = diffuse(ac.sliding_window(3) | ac.global_tokens([0]), hops=2, kernel="heat", t=1.2)
    q = torch.randn(1, 2, 40, 16, requires_grad=True)
    k, v = (torch.randn(1, 1, 40, 16, requires_grad=True) for _ in range(2))  # GQA: 2 query heads per kv head
    attn = ac.compile(p, backend="triton", schedule=ac.Schedule(block_m=16, block_n=16))
    attn.hops_mode = "recompute"
    out = attn(q, k, v)
    assert [type(s).__name__ for s in attn.program.stages][:3] == ["ExpandHeads", "BlockSparseAttention", "Axpby"]
    ref = ac.reference(p, q, k, v)
    assert_matches_oracle(out, ref, (q, k, v), atol=1e-5, grad_atol=1e-5)


STORED = [
    # window + global + random blocks, GQA, a ragged last block (L = 35)
    (diffuse(ac.sliding_window(5) | ac.global_tokens([0, 7]) | ac.random_blocks(1, block=16, seed=2), hops=2,
             alpha=0.2), 1, 2, 1, 35),
    # causal heat kernel, two batch entries
    (diffuse(ac.causal(), hops=2, kernel="heat", t=0.8), 2, 1, 1, 32),
    # a traced mask_mod with a query row that sees no key
    (diffuse(ac.mask(lambda b, h, q_idx, kv_idx: ((q_idx - kv_idx) % 3 == 0) & (q_idx != 5)), hops=2), 1, 1, 1, 24),
    # per-head patterns: one layout group per head
    (diffuse(ac.per_head([ac.sliding_window(2), ac.causal()]), hops=2, alpha=0.3), 1, 2, 2, 20),
]


@pytest.mark.parametrize("pattern,B,H,Hkv,L", STORED, ids=[repr(c[0])[:50] for c in STORED])
def test_triton_stored_p_schedule_matches_reference_forward_backward(pattern, B, H, Hkv, L):
    q = torch.randn(B, H, L, 16, requires_grad=True)
    k = torch.randn(B, Hkv, L, 16, requires_grad=True)
    v = torch.randn(B, Hkv, L, 8, requires_grad=True)
    attn = ac.compile(pattern, backend="triton", schedule=ac.Schedule(block_m=16, block_n=16))
    attn.hops_mode = "materialize"
    out = attn(q, k, v)
    names = [type(s).__name__ for s in attn.program.stages]
    assert names == ["SparseProbs"] + ["DiffusionHop"] * pattern.hops
    from attncompiler.codegen.triton.diffusion import TritonProbs, diffusion_kernels

    mod, path = diffusion_kernels(pattern.base, L, 16, 16)
    assert path.exists() and "_diff_hop_dz" in path.read_text()  # a generated file, imported
    ref = ac.reference(pattern, q, k, v)
    assert_matches_oracle(out, ref, (q, k, v), atol=1e-5, grad_atol=1e-5)


def test_triton_stored_p_kernels_store_the_softmax_on_the_layout():
    """The stored tiles are exactly P on the layout's blocks (zeros off the pattern)."""
    from attncompiler.codegen.context import RunContext
    from attncompiler.codegen.triton.diffusion import run_sparse_probs
    from attncompiler.families.diffusion.program import SparseProbs
    from attncompiler.families.diffusion.reference import dense_probs

    base = ac.sliding_window(4) | ac.global_tokens([3])
    q, k = torch.randn(1, 1, 37, 16), torch.randn(1, 1, 37, 16)
    stage = SparseProbs(pattern=base, schedule=ac.Schedule(block_m=16, block_n=16))
    probs = run_sparse_probs(stage, {"q": q, "k": k}, RunContext(scale=0.25, batch=1, heads=1))["probs"]
    grp = probs.layout.groups[0]
    dense = torch.zeros(48, 48)
    for blk, (r, c) in enumerate(zip(grp.rows, grp.cols)):
        dense[r * 16:(r + 1) * 16, c * 16:(c + 1) * 16] = probs.tensors[0][0, blk]
    ref = dense_probs(base, q.double(), k.double(), 0.25)[0, 0]
    torch.testing.assert_close(dense[:37, :37].double(), ref, rtol=1e-6, atol=1e-6)


def test_triton_schedule_choice_and_bad_block():
    p = diffuse(ac.sliding_window(3), hops=2)
    attn = ac.compile(p, backend="triton", schedule=ac.Schedule(block_m=8, block_n=8))
    attn.hops_mode = "materialize"
    with pytest.raises(ac.ScheduleError, match="block_m=8"):
        attn(*(torch.randn(1, 1, 16, 16) for _ in range(3)))
