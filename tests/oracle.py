"""One comparison against the float64 oracle, forward and backward, shared by the family tests."""

import torch


def assert_matches_oracle(out, ref, inputs, *, rtol=1e-5, atol=2e-5, grad_rtol=1e-4, grad_atol=1e-4):
    """``out`` equals ``ref`` and so do their gradients with respect to ``inputs`` (random upstream)."""
    torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=atol)
    g = torch.randn_like(ref)
    got = torch.autograd.grad(out, inputs, g.to(out.dtype))
    want = torch.autograd.grad(ref, inputs, g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b.double(), rtol=grad_rtol, atol=grad_atol)
