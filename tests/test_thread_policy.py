"""The head-split thread policy (codegen/pytorch/threads.py): the same numbers as the plain
block-sparse call, with lse, GQA and batch > 1, in inference and on the training path (forward
with a gradient, backward); the plain call where the policy does not apply."""

import pytest
import torch

import attncompiler as ac
from attncompiler.codegen.pytorch.attention import block_sparse_attention
from attncompiler.codegen.pytorch.threads import parts_for, split_heads
from attncompiler.program.schedule import Schedule
from attncompiler.codegen.pytorch import fused_cpu


@pytest.fixture(autouse=True)
def _plan_path():
    """These tests are about the plan path (the fallback where the fused CPU kernels do not run)."""
    with fused_cpu.disabled():
        yield


@pytest.fixture
def two_threads():
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(n)


def test_parts():
    assert parts_for(1, 4, 1) == 1 and parts_for(1, 4, 2) == 2 and parts_for(1, 1, 8) == 1 and parts_for(3, 2, 4) == 4


@pytest.mark.parametrize("shape", [(1, 4, 4, 77), (3, 6, 2, 50), (2, 2, 1, 33)])
def test_split_matches_plain(shape, two_threads):
    B, H, Hkv, L = shape
    pattern = ac.sliding_window(9) | ac.global_tokens([0, 3])
    s = Schedule(block_m=16, block_n=16)
    layout = pattern.layout(L, L, 16, 16, batch=B, heads=H)
    q = torch.randn(B, H, L, 16) * 20
    k, v = torch.randn(B, Hkv, L, 16) * 20, torch.randn(B, Hkv, L, 16)
    calls = []

    def fn(*a):
        calls.append(a[0].shape)
        return block_sparse_attention(*a)

    with torch.no_grad():
        want = block_sparse_attention(q, k, v, layout, s, 0.25, True)
        got = split_heads(fn, q, k, v, layout, s, 0.25, True)
    assert len(calls) == parts_for(B, Hkv, 2) > 1  # really split
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(got[0].double(), ac.reference(pattern, q, k, v, 0.25), rtol=1e-4, atol=2e-4)  # logits ~1000
    assert torch.get_num_threads() == 2  # restored


def test_plain_path_with_gradient(two_threads):
    q, k, v = (torch.randn(1, 4, 40, 8, requires_grad=True) for _ in range(3))
    layout = ac.causal().layout(40, 40, 16, 16, batch=1, heads=4)
    calls = []

    def fn(*a):
        calls.append(1)
        return block_sparse_attention(*a)

    split_heads(fn, q, k, v, layout, Schedule(block_m=16, block_n=16), 0.3, True)
    assert calls == [1]


def test_compiled_module_splits_and_matches_oracle(two_threads, monkeypatch):
    """The torch stage runs inference through the split (with 2 threads), and the result is the
    float64 oracle's; turning the policy off gives the same numbers."""
    from attncompiler.codegen.pytorch import threads

    pattern = (ac.sliding_window(13) | ac.global_tokens([1, 40])) & ~ac.block_local(7)
    mod = ac.compile(pattern, backend="torch", schedule=Schedule(block_m=16, block_n=16))
    q = torch.randn(2, 4, 61, 16) * 15
    k, v = torch.randn(2, 2, 61, 16) * 15, torch.randn(2, 2, 61, 16)
    seen = []
    real = threads.split_heads

    def spy(fn, q_, *a):
        seen.append(parts_for(q_.shape[0], a[0].shape[1], torch.get_num_threads()))
        return real(fn, q_, *a)

    monkeypatch.setattr("attncompiler.codegen.pytorch.stages.split_heads", spy)
    with torch.no_grad():
        got = mod(q, k, v)
    assert seen == [2]
    torch.testing.assert_close(got.double(), ac.reference(pattern, q, k, v), rtol=1e-4, atol=2e-4)
    monkeypatch.setattr(threads, "ENABLED", False)
    with torch.no_grad():
        torch.testing.assert_close(mod(q, k, v), got, rtol=0, atol=1e-6)
    assert torch.get_num_threads() == 2


# ---- the training path: forward with a gradient and backward run as the same parts ----

def _grads(pattern, layout, s, q, k, v, dout, scale):
    qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, lse = block_sparse_attention(qq, kk, vv, layout, s, scale, True)
    return (out, lse, *torch.autograd.grad(out, (qq, kk, vv), dout))


def _count_parts(monkeypatch):
    from attncompiler.codegen.pytorch import threads

    seen = []
    real = threads.run_parts

    def spy(fn, n):
        seen.append(n)
        return real(fn, n)

    monkeypatch.setattr(threads, "run_parts", spy)
    return seen


@pytest.mark.parametrize("shape", [(1, 4, 4, 77), (3, 6, 2, 50), (2, 2, 1, 33), (1, 3, 3, 129)])
def test_training_split_matches_plain_and_oracle(shape, two_threads, monkeypatch):
    """Forward with a gradient and backward (dq, dk, dv) split into (batch, kv-head) parts equal
    the plain 1-thread call to 1e-6 and the float64 oracle, with logits of several hundred."""
    B, H, Hkv, L = shape
    gen = torch.Generator().manual_seed(L)
    pattern = (ac.sliding_window(9) | ac.global_tokens([0, 3])) & ~ac.block_local(5)
    s = Schedule(block_m=16, block_n=16, key_blocks_per_step=1)  # several online-softmax steps
    layout = pattern.layout(L, L, 16, 16, batch=B, heads=H)
    q = torch.randn(B, H, L, 16, generator=gen) * 20
    k, v = torch.randn(B, Hkv, L, 16, generator=gen) * 20, torch.randn(B, Hkv, L, 16, generator=gen)
    dout = torch.randn(B, H, L, 16, generator=gen)
    seen = _count_parts(monkeypatch)
    got = _grads(pattern, layout, s, q, k, v, dout, 0.25)
    assert seen == [parts_for(B, Hkv, 2)] * 2 and seen[0] > 1  # forward and backward really split
    torch.set_num_threads(1)
    want = _grads(pattern, layout, s, q, k, v, dout, 0.25)
    torch.set_num_threads(2)
    assert len(seen) == 2  # the 1-thread call ran plain
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    qd, kd, vd = (t.double().requires_grad_() for t in (q, k, v))
    ref = ac.reference(pattern, qd, kd, vd, 0.25)
    torch.testing.assert_close(got[0].double(), ref, rtol=1e-4, atol=2e-4)
    for g, r in zip(got[2:], torch.autograd.grad(ref, (qd, kd, vd), dout.double())):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-4 * float(r.abs().max()))
    assert torch.get_num_threads() == 2


def test_workers_run_with_one_thread_and_the_callers_grad_mode(two_threads, monkeypatch):
    """Each part runs in a pool thread with one intra-op thread (OpenMP's count is per OS
    thread, so the caller's setting would not reach it) and the caller's grad mode (off inside
    the autograd Function's forward: no graph is recorded); afterwards the caller's count holds,
    also for threads started later."""
    import threading

    from attncompiler.codegen.pytorch import attention

    seen = []
    real = attention._forward_plain

    def spy(*a):
        seen.append((threading.current_thread().name, torch.get_num_threads(), torch.is_grad_enabled()))
        return real(*a)

    monkeypatch.setattr(attention, "_forward_plain", spy)
    q, k, v = (torch.randn(2, 2, 40, 8, requires_grad=True) for _ in range(3))
    layout = ac.causal().layout(40, 40, 16, 16, batch=2, heads=2)
    out, _ = block_sparse_attention(q, k, v, layout, Schedule(block_m=16, block_n=16), 0.3, True)
    assert out.requires_grad and len(seen) == 2
    assert all(name.startswith("attnc-heads") and n == 1 and not grad for name, n, grad in seen)
    assert torch.get_num_threads() == 2
    later = []
    t = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
    t.start()
    t.join()
    assert later == [2]


def test_split_backward_refuses_double_backward(two_threads, monkeypatch):
    from attncompiler.errors import UnsupportedError

    seen = _count_parts(monkeypatch)
    q, k, v = (torch.randn(2, 2, 33, 8, requires_grad=True) for _ in range(3))
    layout = ac.causal().layout(33, 33, 16, 16, batch=2, heads=2)
    out, _ = block_sparse_attention(q, k, v, layout, Schedule(block_m=16, block_n=16), 0.3, True)
    (gq,) = torch.autograd.grad(out.sum(), q, create_graph=True)
    assert seen == [2, 2]
    with pytest.raises(UnsupportedError, match="double backward"):
        torch.autograd.grad(gq.sum(), q)
    assert torch.get_num_threads() == 2


def test_compiled_module_training_matches_oracle(two_threads, monkeypatch):
    """Through a compiled torch module (GQA, batch 2, odd length): forward and backward split,
    results the float64 oracle's, and the same as with the policy off."""
    from attncompiler.codegen.pytorch import threads

    pattern = (ac.sliding_window(13) | ac.global_tokens([1, 40])) & ~ac.block_local(7)
    mod = ac.compile(pattern, backend="torch", schedule=Schedule(block_m=16, block_n=16))
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 61, 16, generator=gen) * 15
    k, v = torch.randn(2, 2, 61, 16, generator=gen) * 15, torch.randn(2, 2, 61, 16, generator=gen)
    dout = torch.randn(2, 4, 61, 16, generator=gen)

    def run():
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        out = mod(qq, kk, vv)
        return (out, *torch.autograd.grad(out, (qq, kk, vv), dout))

    seen = _count_parts(monkeypatch)
    got = run()
    assert seen == [2, 2]
    qd, kd, vd = (t.double().requires_grad_() for t in (q, k, v))
    ref = ac.reference(pattern, qd, kd, vd)
    torch.testing.assert_close(got[0].double(), ref, rtol=1e-4, atol=2e-4)
    for g, r in zip(got[1:], torch.autograd.grad(ref, (qd, kd, vd), dout.double())):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-4 * float(r.abs().max()))
    monkeypatch.setattr(threads, "ENABLED", False)
    for a, b in zip(run(), got):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert seen == [2, 2] and torch.get_num_threads() == 2
