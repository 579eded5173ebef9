"""The head-split thread policy (codegen/pytorch/threads.py): the same numbers as the plain
block-sparse call, with lse, GQA and batch > 1; the plain call where the policy does not apply."""

import pytest
import torch

import attncompiler as ac
from attncompiler.codegen.pytorch.attention import block_sparse_attention
from attncompiler.codegen.pytorch.threads import parts_for, split_heads
from attncompiler.program.schedule import Schedule


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
