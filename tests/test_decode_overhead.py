"""The decode-step fast paths keep every answer and every check.

A causal call whose first row already sees every key (``q_offset >= Lk - 1``, a decode step) runs
as full attention through the fused kernel; the call-time positions of plain int offsets are
validated once per (pattern, shapes, positions) and cached. Checked against the independent
float64 oracle with large logits (~100-1000), odd lengths, GQA and random schedules, forward and
backward, on both sides of the boundary; errors are still raised after a cached success.
"""

import random

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import attncompiler as ac
from attncompiler.errors import InputError, UnexpectedArgumentError
from attncompiler.program.positions import scalar_groups
from attncompiler.program.schedule import Schedule
from oracle import assert_matches_oracle, masked_softmax_attention


def _qkv(B, H, Hkv, Lq, Lk, D, seed, magnitude):
    """Float32 leaves whose logits are of size ``magnitude`` (q and k scaled)."""
    g = torch.Generator().manual_seed(seed)
    s = (magnitude * D ** 0.5) ** 0.5 / D ** 0.25
    q = torch.randn(B, H, Lq, D, generator=g, dtype=torch.float64) * s
    k = torch.randn(B, Hkv, Lk, D, generator=g, dtype=torch.float64) * s
    v = torch.randn(B, Hkv, Lk, D, generator=g, dtype=torch.float64)
    return [t.float().requires_grad_(True) for t in (q, k, v)]


def _oracle(pattern, q, k, v, offset):
    """Float64 ``(out, lse)``: rows ``offset..offset+Lq-1`` of the dense mask at ``(offset + Lq, Lk)``."""
    Lq, Lk = q.shape[2], k.shape[2]
    mask = pattern.to_dense(offset + Lq, Lk)[offset:].expand(q.shape[0], q.shape[1], Lq, Lk)
    q64, k64, v64 = (t.double() for t in (q, k, v))
    return masked_softmax_attention(q64, k64, v64, mask, q.shape[-1] ** -0.5)


@pytest.mark.parametrize("seed", range(6))
def test_causal_at_an_offset_matches_the_oracle_on_both_sides_of_full(seed):
    rng = random.Random(seed)
    Lk = rng.choice([1, 7, 33, 67, 129])
    Lq = rng.choice([1, 1, 3, 5])
    H, Hkv = rng.choice([(4, 4), (4, 2), (6, 1)])
    D = rng.choice([8, 16])
    magnitude = rng.choice([100.0, 300.0, 1000.0])
    sched = Schedule(block_m=rng.choice([16, 32, 64]), block_n=rng.choice([16, 32, 64]))
    mod = ac.compile(ac.causal(), backend="torch", schedule=sched)
    offsets = sorted({max(0, Lk - d) for d in (3, 2, 1, 0)} | {Lk + 4})
    for offset in offsets:
        q, k, v = _qkv(2, H, Hkv, Lq, Lk, D, seed * 100 + offset, magnitude)
        want, want_lse = _oracle(ac.causal(), q, k, v, offset)
        out, lse = mod(q, k, v, q_offset=offset, return_lse=True)
        torch.testing.assert_close(lse.double(), want_lse, rtol=1e-5, atol=1e-3)
        assert_matches_oracle(out, _oracle(ac.causal(), q, k, v, offset)[0], (q, k, v), rtol=1e-4, atol=1e-4,
                              grad_rtol=1e-3, grad_atol=1e-3)
        if offset == Lk - Lq:  # the same call through align
            torch.testing.assert_close(mod(q, k, v, align="bottom_right"), out, rtol=0, atol=0)


def test_a_decode_step_is_one_fused_kernel_call():
    mod = ac.compile(ac.causal(), backend="torch")
    q, k, v = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 37, 16), torch.randn(1, 2, 37, 16)

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    mod(q, k, v, align="bottom_right")
    with Ops() as ops:
        mod(q, k, v, align="bottom_right")
    flash = [n for n in ops.names if "flash_attention_for_cpu" in n]
    assert len(flash) == 1, ops.names
    # Views and reshapes (a copy to unfold the GQA heads) and the kernel's NaN-row guard only: no
    # mask, layout or gather tensors.
    allowed = ("view", "_unsafe_view", "reshape", "_reshape_alias", "clone", "detach",
               "_scaled_dot_product_flash_attention_for_cpu", "isnan", "any", "is_nonzero", "_local_scalar_dense")
    assert all(n.split(".")[1] in allowed for n in ops.names), ops.names


def test_cached_positions_still_reject_bad_values():
    mod = ac.compile(ac.causal(), backend="torch")
    q, k, v = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 9, 8), torch.randn(1, 2, 9, 8)
    mod(q, k, v, q_offset=1)  # cached
    with pytest.raises(InputError, match="bool"):
        mod(q, k, v, q_offset=True)  # equal to 1 as a key: must not hit the cache
    with pytest.raises(InputError, match="q_offset"):
        mod(q, k, v, q_offset=-1)
    with pytest.raises(InputError, match="q_offset"):
        mod(q, k, v, q_offset=-1)  # a failed validation is not cached
    with pytest.raises(InputError, match="align"):
        mod(q, k, v, align="bottom-right")
    with pytest.raises(InputError, match="either"):
        mod(q, k, v, q_offset=3, align="bottom_right")
    with pytest.raises(UnexpectedArgumentError, match="q_ofset"):
        mod(q, k, v, q_ofset=8)
    qb = torch.randn(1, 2, 10, 8)
    with pytest.raises(InputError, match="bottom_right"):
        mod(qb, k, v, align="bottom_right")  # more queries than keys


def test_position_cache_is_bounded_and_keyed_by_shapes():
    scalar_groups.cache_clear()
    mod = ac.compile(ac.causal(), backend="torch")
    for lk in range(1, 1200):
        q, k = torch.randn(1, 1, 1, 4), torch.randn(1, 1, lk, 4)
        mod(q, k, k, align="bottom_right")
    info = scalar_groups.cache_info()
    assert info.currsize <= info.maxsize == 1024
    a, b = scalar_groups(ac.causal(), 1, 1, 5, 4, None), scalar_groups(ac.causal(), 2, 1, 5, 4, None)
    assert a[0].positions.q_offset == b[0].positions.q_offset == 4 and a is not b


def test_sliding_window_decode_matches_the_oracle_with_large_logits():
    p = ac.sliding_window(5).causal()
    mod = ac.compile(p, backend="torch", schedule=Schedule(block_m=16, block_n=16))
    for lk in (1, 6, 7, 31, 45):
        q, k, v = _qkv(1, 4, 2, 1, lk, 8, lk, 500.0)
        assert_matches_oracle(mod(q, k, v, align="bottom_right"), _oracle(p, q, k, v, lk - 1)[0], (q, k, v),
                              rtol=1e-4, atol=1e-4, grad_rtol=1e-3, grad_atol=1e-3)


def test_cached_int_positions_agree_with_the_general_validation():
    import itertools

    from attncompiler.dsl.pattern import INT_LIMIT
    from attncompiler.program.positions import _groups

    def outcome(fn):
        try:
            return "ok", tuple(fn())
        except Exception as e:  # noqa: BLE001 - the two paths must raise the same error
            return type(e).__name__, str(e)

    pats = [ac.causal(), ac.sliding_window(3).causal(), ac.document(), ac.full()]
    for p, B, Lq, Lk, off, align in itertools.product(pats, (1, 3), (1, 5), (1, 5, 9), (0, 3, INT_LIMIT - 5, -1),
                                                      (None, "top_left", "bottom_right", "x")):
        fast = outcome(lambda: scalar_groups.__wrapped__(p, B, Lq, Lk, off, align))
        assert fast == outcome(lambda: _groups(p, B, Lq, Lk, off, align, None, None)), (p, B, Lq, Lk, off, align)
