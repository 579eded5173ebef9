"""Diffusion on the triton backend (interpreter on CPU): the recompute schedule's hops are the
generated BlockSparseAttention kernels joined by Axpby; compared with the float64 reference."""

from __future__ import annotations

import pytest
import torch

import attncompiler as ac
from attncompiler.diffusion import diffuse
from oracle import assert_matches_oracle


def test_triton_recompute_schedule_matches_reference_forward_backward():
    p = diffuse(ac.sliding_window(3) | ac.global_tokens([0]), hops=2, kernel="heat", t=1.2)
    q = torch.randn(1, 2, 40, 16, requires_grad=True)
    k, v = (torch.randn(1, 1, 40, 16, requires_grad=True) for _ in range(2))  # GQA: 2 query heads per kv head
    attn = ac.compile(p, backend="triton", schedule=ac.Schedule(block_m=16, block_n=16))
    out = attn(q, k, v)
    assert [type(s).__name__ for s in attn.program.stages][:3] == ["ExpandHeads", "BlockSparseAttention", "Axpby"]
    ref = ac.reference(p, q, k, v)
    assert_matches_oracle(out, ref, (q, k, v), atol=1e-5, grad_atol=1e-5)


def test_triton_materialized_schedule_is_reported_unsupported():
    p = diffuse(ac.sliding_window(3), hops=1)
    attn = ac.compile(p, backend="triton", schedule=ac.Schedule(block_m=16, block_n=16))
    attn.hops_mode = "materialize"
    with pytest.raises(ac.UnsupportedError, match="SparseProbs"):
        attn(*(torch.randn(1, 1, 16, 16) for _ in range(3)))
