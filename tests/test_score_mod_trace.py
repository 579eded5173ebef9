"""Tracing score_mods into the float IR: the traced expression computes what the function does,
its symbolic derivative is autograd's, captured tensors become runtime slots, and what cannot be
represented stays opaque (never a wrong expression)."""

import math

import pytest
import torch

import attncompiler as ac
from attncompiler.errors import PatternError
from attncompiler.ir.fexpr import FLoad
from attncompiler.ir.score_trace import trace_score_mod

H, B, L = 4, 2, 11
SLOPES = ac.alibi_slopes(H)
TABLE = torch.randn(H, 16)
BIAS = torch.randn(B, H, L, L)
TEMP = torch.tensor(0.3)


def user_where(s, b, h, q, k):
    return torch.where(q >= k, torch.sigmoid(s * TEMP) * 5.0, torch.maximum(s, torch.tensor(-3.0)) - (q - k).float())


def user_misc(s, b, h, q, k):
    d = (k - q).abs().float()
    return torch.exp(-torch.log1p(d) / 4.0) * s / 2.0 + torch.clamp(s, min=-10.0, max=10.0) + torch.sqrt(d + 1.0)


def user_composed(s, b, h, q, k):  # a plain function calling the built-ins
    return ac.softcap(25.0)(ac.alibi(SLOPES)(s, b, h, q, k), b, h, q, k) + BIAS[b, h, q, k]


TRACEABLE = {
    "softcap": ac.softcap(20.0),
    "alibi": ac.alibi(SLOPES),
    "relative_bias": ac.relative_bias(TABLE, num_buckets=16, max_distance=12, bidirectional=False),
    "bias": ac.bias(BIAS),
    "composed": ac.softcap(30.0) @ ac.alibi(SLOPES) @ ac.bias(BIAS[0]),
    "user_where": user_where,
    "user_misc": user_misc,
    "user_composed": user_composed,
}


def indices():
    return (torch.arange(B).view(B, 1, 1, 1), torch.arange(H).view(1, H, 1, 1), torch.arange(L).view(1, 1, L, 1),
            torch.arange(L).view(1, 1, 1, L))


@pytest.mark.parametrize("name", list(TRACEABLE))
def test_trace_evaluates_and_differentiates_as_the_function(name):
    fn = TRACEABLE[name]
    t = trace_score_mod(fn)
    assert t.expr is not None, t.failure
    assert t.expr.uses_score()
    for n in t.expr.walk():
        if isinstance(n, FLoad):
            assert t.tensors[n.slot].shape == n.shape  # slots hold the captured tensors, not copies
    g = torch.Generator().manual_seed(1)
    s = (torch.randn(B, H, L, L, generator=g, dtype=torch.float64) * 300)  # large-magnitude logits
    idx = indices()
    # the IR computes in the score's dtype; a function's `.float()` intermediates are float32
    torch.testing.assert_close(t.evaluate(s, *idx), fn(s, *idx), rtol=1e-6, atol=1e-5)
    s32 = s.float()
    torch.testing.assert_close(t.evaluate(s32, *idx), fn(s32, *idx), rtol=1e-6, atol=1e-5)
    ss = s.clone().requires_grad_()
    (want,) = torch.autograd.grad(fn(ss, *idx).sum(), ss)
    env = dict(zip(("b", "h", "q_idx", "kv_idx"), idx))
    got = t.expr.derivative().evaluate(s, env, t.tensors).expand(s.shape)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)


def test_captured_tensors_are_read_at_run_time():
    slopes = SLOPES.clone()
    t = trace_score_mod(ac.alibi(slopes))
    assert t.tensors[0] is slopes
    s = torch.zeros(1, H, L, L)
    before = t.evaluate(s, *indices())
    slopes.mul_(2.0)  # a learned parameter after an optimizer step
    torch.testing.assert_close(t.evaluate(s, *indices()), 2 * before)


@pytest.mark.parametrize("fn, why", [
    (lambda s, b, h, q, k: torch.sort(s, -1)[0], "sort"),
    (lambda s, b, h, q, k: s if q > k else -s, "control flow"),
    (lambda s, b, h, q, k: s * math.exp(q), "TraceError"),
    (lambda s, b, h, q, k: s + s.to(torch.int64), "conversion"),
])
def test_untraceable_stays_opaque_with_a_reason(fn, why):
    t = trace_score_mod(fn)
    assert t.expr is None and why in t.failure


def test_boolean_result_is_a_pattern_error():
    with pytest.raises(PatternError, match="boolean"):
        trace_score_mod(lambda s, b, h, q, k: s > 0)


def test_mask_tracing_is_unchanged_by_float_support():
    assert not ac.mask(lambda b, h, q, k: q.float() >= k).traced  # floats still stop a mask_mod's tracer
    assert ac.mask(lambda b, h, q, k: q >= k).traced
