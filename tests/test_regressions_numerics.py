"""Regressions of issue 15 ("no silent wrong answers"), numerics part.

* Online softmax: a step in which a row sees no key must not replace the row's running max by
  0; real logits far below 0 then underflowed to 0 (zero rows, lse -inf, wrong gradients).
* Second-order gradients: every family either matches the float64 oracle's double backward or
  raises UnsupportedError naming double backward; it never returns constants as gradients.
* Large logits (magnitude 100-1000, odd length) on the Combiner, ABC and Diffuser torch paths.
"""

from __future__ import annotations

import pytest
import torch

import attncompiler as ac
from attncompiler.families import memory as M
from attncompiler.errors import UnsupportedError
from oracle import assert_matches_oracle

pytest.importorskip("triton")


def far_below_zero(L: int = 128, D: int = 16, dtype=torch.float32):
    """q, k whose every logit is about -120 (scale D**-0.5), random v; all require grad."""
    q = torch.full((1, 1, L, D), -5.0, dtype=dtype) + 0.01 * torch.randn(1, 1, L, D, dtype=dtype)
    k = torch.full((1, 1, L, D), 6.0, dtype=dtype) + 0.01 * torch.randn(1, 1, L, D, dtype=dtype)
    v = torch.randn(1, 1, L, D, dtype=dtype)
    return tuple(t.requires_grad_() for t in (q, k, v))


def check_out_lse_grads(attn, pattern, q, k, v) -> None:
    """Forward, lse and dq/dk/dv against the float64 oracle (relative to the gradients' size)."""
    out, lse = attn(q, k, v, return_lse=True)
    ref, ref_lse = ac.reference(pattern, q.double(), k.double(), v.double(), return_lse=True)
    assert bool(torch.isfinite(lse).all()), "every row sees a key: lse must be finite"
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-4)
    assert_matches_oracle(out, ref, (q, k, v), grad_rtol=1e-4, grad_atol=2e-4)


SCHEDULES = {
    "one_key_block_per_step": ac.Schedule(key_blocks_per_step=1),
    "small_blocks_one_per_step": ac.Schedule(block_m=16, block_n=16, key_blocks_per_step=1),
    "default": ac.Schedule(),
}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("schedule", list(SCHEDULES.values()), ids=list(SCHEDULES))
def test_window_far_below_zero_matches_oracle(backend, schedule):
    """The issue's repro: sliding_window(2), every logit -120, key blocks split over steps."""
    pattern = ac.sliding_window(2)
    q, k, v = far_below_zero()
    check_out_lse_grads(ac.compile(pattern, backend=backend, schedule=schedule), pattern, q, k, v)


def test_document_row_spanning_more_than_one_default_step():
    """Default ``key_blocks_per_step`` (64): a query block straddling two documents spans more
    than 64 key blocks, and its second document's rows see nothing in the first step."""
    pattern = ac.document([70, 58])
    schedule = ac.Schedule(block_m=16, block_n=1)  # 128 key blocks, default steps of 64
    assert schedule.key_blocks_per_step < 128
    q, k, v = far_below_zero()
    check_out_lse_grads(ac.compile(pattern, backend="torch", schedule=schedule), pattern, q, k, v)


def test_empty_rows_stay_zero_with_split_steps():
    """Rows with no visible key at all are still 0 with lse -inf when their steps are split."""
    pattern = ac.mask(lambda b, h, q, k: (q >= 32) & (k <= q))
    q, k, v = far_below_zero(L=64)
    out, lse = ac.compile(pattern, backend="torch", schedule=ac.Schedule(block_m=16, block_n=16,
                                                                         key_blocks_per_step=1))(q, k, v, return_lse=True)
    assert bool((out[:, :, :32] == 0).all()) and bool((lse[:, :, :32] == float("-inf")).all())
    ref, ref_lse = ac.reference(pattern, q.double(), k.double(), v.double(), return_lse=True)
    torch.testing.assert_close(lse[:, :, 32:].double(), ref_lse[:, :, 32:], rtol=1e-5, atol=1e-4)
    assert_matches_oracle(out, ref, (q, k, v))


# --- second-order gradients -------------------------------------------------------------------

SMALL = ac.Schedule(block_m=16, block_n=16)


def _abc(control):
    return M.memory(3, control, causal=True)


FAMILIES = [
    ("mask", lambda: ac.sliding_window(8).causal() | ac.global_tokens([0]), ("torch", "triton")),
    ("combiner", lambda: ac.combiner_fixed(4, causal=True), ("torch", "triton")),
    ("diffuser", lambda: ac.diffuse(ac.sliding_window(2), hops=2), ("torch", "triton")),
    ("abc_mlp", lambda: _abc(M.MLPControl()), ("torch", "triton")),
    ("abc_window", lambda: _abc(M.WindowControl()), ("torch", "triton")),
]
FAMILY_CASES = [pytest.param(make, backend, id=f"{name}-{backend}") for name, make, backends in FAMILIES
                for backend in backends]


def _double_backward(fn, inputs, w, u):
    """``d/d(inputs) sum_i <u_i, d<w, fn(inputs)>/d input_i>`` and the first-order gradients."""
    out = fn(*inputs)
    first = torch.autograd.grad((out * w).sum(), inputs, create_graph=True)
    second = torch.autograd.grad(sum((g * ui).sum() for g, ui in zip(first, u)), inputs, allow_unused=True)
    return first, second


@pytest.mark.parametrize("make,backend", FAMILY_CASES)
def test_double_backward_is_correct_or_refused(make, backend):
    pattern = make()
    dtype = torch.float64 if backend == "torch" else torch.float32
    attn = ac.compile(pattern, backend=backend, schedule=SMALL)
    if hasattr(attn, "materialize"):
        attn.materialize(8)
        attn.to(dtype)
    q, k, v = (torch.randn(1, 2, 21, 8, dtype=dtype, requires_grad=True) for _ in range(3))
    w = torch.randn(1, 2, 21, 8, dtype=dtype)
    u = [torch.randn_like(t) for t in (q, k, v)]
    try:
        first, second = _double_backward(attn, (q, k, v), w, u)
    except UnsupportedError as e:
        assert "double backward" in str(e) and "create_graph" in str(e)
        # first-order gradients taken with create_graph=True are still exact
        first = torch.autograd.grad((attn(q, k, v) * w).sum(), (q, k, v), create_graph=True)
        want = torch.autograd.grad((attn.reference(q, k, v).double() * w.double()).sum(), (q, k, v))
        for a, b in zip(first, want):
            torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-4)
        return
    ref_first, ref_second = _double_backward(lambda *t: attn.reference(*t).double(), (q, k, v), w.double(),
                                             [x.double() for x in u])
    for a, b in zip(first + second, ref_first + ref_second):
        a = torch.zeros_like(b) if a is None else a
        b = torch.zeros_like(a) if b is None else b
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-6)


def test_issue_pattern_refuses_gradgradcheck():
    """The issue's case: gradgradcheck used to report a wrong second derivative silently."""
    attn = ac.compile(ac.sliding_window(8).causal() | ac.global_tokens([0]), backend="torch")
    q, k, v = (torch.randn(1, 1, 24, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    with pytest.raises(UnsupportedError, match=r"double backward .* not supported by BlockSparseAttention"):
        torch.autograd.gradgradcheck(lambda *t: attn(*t), (q, k, v))


def test_gradient_penalty_refused_even_without_grad_outputs_requiring_grad():
    """``out.sum()`` backward with create_graph=True, then a penalty on dq: the upstream gradient
    does not require grad, yet dq depends on q, k, v; the second backward must raise, not
    silently see constants."""
    attn = ac.compile(ac.sliding_window(3), backend="torch", schedule=SMALL)
    q, k, v = (torch.randn(1, 1, 20, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    (dq,) = torch.autograd.grad(attn(q, k, v).sum(), q, create_graph=True)
    assert dq.requires_grad
    with pytest.raises(UnsupportedError, match="double backward"):
        torch.autograd.grad((dq ** 2).sum(), k)


def test_abc_torch_passes_gradgradcheck():
    """ABC's torch path is plain autograd apart from the chunk scan, whose backward is a linear
    reverse scan that autograd can differentiate again: double backward is supported."""
    attn = ac.compile(_abc(M.MLPControl()), backend="torch", schedule=ac.Schedule(block_m=4, block_n=4))
    attn.materialize(4)
    attn.double()
    q, k, v = (torch.randn(1, 1, 9, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradgradcheck(lambda *t: attn(*t), (q, k, v))


# --- large logits -----------------------------------------------------------------------------

LARGE = [
    pytest.param(lambda: ac.combiner_fixed(8, causal=True), id="combiner_fixed"),
    pytest.param(lambda: ac.combiner_logsparse(), id="combiner_logsparse"),
    pytest.param(lambda: _abc(M.MLPControl()), id="abc_mlp_causal"),
    pytest.param(lambda: M.memory(4, M.MLPControl()), id="abc_mlp"),
    pytest.param(lambda: ac.diffuse(ac.sliding_window(3) | ac.global_tokens([0]), hops=3), id="diffuser"),
]


@pytest.mark.parametrize("make", LARGE)
@pytest.mark.parametrize("block", [16, 32])
def test_large_logits_torch_paths_match_reference(make, block):
    """Logits of magnitude 100-1000 at an odd length (97), forward and gradients vs the oracle."""
    pattern = make()
    attn = ac.compile(pattern, backend="torch", schedule=ac.Schedule(block_m=block, block_n=block,
                                                                     key_blocks_per_step=1))
    if hasattr(attn, "materialize"):
        attn.materialize(16)
    L, D = 97, 16
    q = (12.0 * torch.randn(1, 2, L, D)).requires_grad_()
    k = (12.0 * torch.randn(1, 2, L, D)).requires_grad_()
    v = torch.randn(1, 2, L, D, requires_grad=True)
    with torch.no_grad():
        s = (q @ k.transpose(-1, -2)).abs() * D ** -0.5
    assert 100 < float(s.max()) < 1000 and float(s.median()) > 10
    out = attn(q, k, v)
    ref = attn.reference(q, k, v).double()
    assert_matches_oracle(out, ref, (q, k, v), rtol=1e-4, atol=1e-4, grad_rtol=1e-3, grad_atol=2e-3)


GUARD_EXEMPT = {
    # its backward is a linear reverse scan with constant decays, differentiable by autograd
    # itself (test_abc_torch_passes_gradgradcheck)
    "attncompiler.codegen.pytorch.memory._ScanFn",
    "attncompiler.program.autograd_guard._RefuseDoubleBackward",
}
GUARDED_MODULES = [
    "attncompiler.codegen.pytorch.attention", "attncompiler.codegen.pytorch.probs", "attncompiler.codegen.pytorch.memory",
    "attncompiler.codegen.pytorch.combiner", "attncompiler.codegen.pytorch.diffusion", "attncompiler.codegen.triton.kernels",
    "attncompiler.codegen.triton.memory", "attncompiler.codegen.triton.diffusion",
    "attncompiler.distributed.ring_fn", "attncompiler.distributed.heads", "attncompiler.program.autograd_guard",
]


def test_every_custom_function_backward_is_guarded():
    """Each custom autograd Function either goes through the shared guard or is exempt (tested)."""
    import importlib
    import inspect

    found = []
    for name in GUARDED_MODULES:
        mod = importlib.import_module(name)
        for cls_name, cls in vars(mod).items():
            if inspect.isclass(cls) and issubclass(cls, torch.autograd.Function) and cls.__module__ == name:
                qual = f"{name}.{cls_name}"
                found.append(qual)
                if qual not in GUARD_EXEMPT:
                    assert hasattr(cls.backward, "__wrapped__"), f"{qual}.backward lacks @single_backward"
    assert len(found) >= 14, found
