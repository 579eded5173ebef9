"""ABC memory on the Triton backend (interpreter on CPU; tiny sizes): forward, lse and backward
against the float64 reference, causal (Triton kernel) and bidirectional (torch ops)."""

from __future__ import annotations

import pytest
import torch

import attncompiler as ac
from attncompiler import memory_slots as M
from attncompiler.schedule import Schedule

triton = pytest.importorskip("triton")
from attncompiler.codegen import triton_memory  # noqa: E402,F401  (registers the Triton memory stages)


@pytest.mark.parametrize("control,causal", [(M.MLPControl(), True), (M.ClusterControl(), True),
                                            (M.LinformerControl(max_len=32), False)])
def test_triton_memory_matches_reference(control, causal):
    attn = ac.compile(M.memory(5, control, causal=causal), backend="triton", schedule=Schedule(block_m=16, block_n=16))
    q = torch.randn(1, 2, 21, 8, requires_grad=True)  # 21 tokens: two chunks, the last ragged; GQA 2:1
    k = torch.randn(1, 1, 21, 8, requires_grad=True)
    v = torch.randn(1, 1, 21, 16, requires_grad=True)
    attn.materialize(8)
    if isinstance(control, M.ClusterControl):
        attn.control_param.data.copy_(k[0, 0, 3:8].detach())
    out, lse = attn(q, k, v, return_lse=True)
    ref, ref_lse = attn.reference(q, k, v, return_lse=True)
    torch.testing.assert_close(out.double(), ref, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=2e-5, atol=2e-5)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g.float()), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-4)
