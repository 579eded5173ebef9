"""Bad inputs raise the documented error class with a message naming the value and a hint."""

from __future__ import annotations

import pytest
import torch

import attncompiler as ac
from attncompiler import patterns


def _qkv(B=1, H=2, Hkv=2, Lq=10, Lk=10, D=8, dtype=torch.float32):
    return (torch.randn(B, H, Lq, D, dtype=dtype), torch.randn(B, Hkv, Lk, D, dtype=dtype),
            torch.randn(B, Hkv, Lk, D, dtype=dtype))


@pytest.mark.parametrize("make,match", [
    (lambda: ac.sliding_window(-1), r"window=-1 must be >= 0"),
    (lambda: ac.sliding_window(2.5), r"window=2.5 must be an integer"),
    (lambda: ac.dilated_window(2, 0), r"dilation=0 must be >= 1"),
    (lambda: ac.block_local(0), r"block=0 must be >= 1"),
    (lambda: ac.block_window(1, 0), r"block=0 must be >= 1"),
    (lambda: ac.strided(0), r"stride=0 must be >= 1"),
    (lambda: ac.strided(-3), r"stride=-3 must be >= 1"),
    (lambda: ac.random_blocks(-1, 4), r"count=-1 must be >= 0"),
    (lambda: ac.random_blocks(1, 0), r"block=0 must be >= 1"),
    (lambda: ac.prefix_lm(-2), r"prefix=-2 must be >= 0"),
    (lambda: ac.document([3, 0]), r"document length=0 must be >= 1"),
    (lambda: ac.global_tokens([-1]), r"index=-1 must be >= 0"),
    (lambda: ac.global_tokens([1.5]), r"must be an integer"),
])
def test_negative_or_zero_sizes(make, match):
    with pytest.raises(ac.PatternError, match=match):
        make()


@pytest.mark.parametrize("make,match", [
    (lambda: ac.global_tokens([]), r"global_tokens\(\[\]\) is empty"),
    (lambda: ac.document([]), r"document\(\[\]\) has no documents"),
    (lambda: ac.per_head([]), r"per_head\(\[\]\) needs at least one pattern"),
    (lambda: ac.union(), r"union\(\) of no patterns is empty"),
    (lambda: ac.intersection(), r"intersection\(\) of no patterns is empty"),
])
def test_empty_patterns(make, match):
    with pytest.raises(ac.PatternError, match=match):
        make()


def test_a_pattern_that_allows_nothing_is_valid_and_gives_zeros():
    # Empty *declarations* are errors (above); a pattern whose set is empty is a valid pattern.
    q, k, v = _qkv()
    out = ac.compile(~ac.full(), backend="torch")(q, k, v)
    assert torch.equal(out, torch.zeros_like(out))


def test_global_index_out_of_range():
    p = ac.sliding_window(2) | ac.global_tokens([3, 50])
    for action in (lambda: p.layout(20), lambda: p.to_dense(20),
                   lambda: ac.compile(p, backend="torch")(*_qkv(Lq=20, Lk=20)),
                   lambda: ac.reference(p, *_qkv(Lq=20, Lk=20))):
        with pytest.raises(ac.PatternError, match=r"global token indices \[50\] are out of range.*q_len=20"):
            action()


@pytest.mark.parametrize("call,match", [
    (lambda p: p.layout(0), r"q_len=0 must be a positive integer"),
    (lambda p: p.layout(16, -4), r"kv_len=-4 must be a positive integer"),
    (lambda p: p.layout(16, 16, 0), r"block_m=0 must be a positive integer"),
    (lambda p: p.layout(16, 16, 8, -8), r"block_n=-8 must be a positive integer"),
    (lambda p: p.layout(16, 16, 8, heads=0), r"heads=0 must be a positive integer"),
    (lambda p: p.layout(16, 16, 8, batch=-1), r"batch=-1 must be a positive integer"),
    (lambda p: p.to_dense(0), r"q_len=0 must be a positive integer"),
    (lambda p: p.to_dense(4.0), r"q_len=4.0 must be a positive integer"),
])
def test_bad_layout_sizes(call, match):
    with pytest.raises(ac.LayoutError, match=match):
        call(ac.causal())


def test_bad_schedule_sizes():
    with pytest.raises(ac.ScheduleError, match=r"block_m=0 must be a positive integer"):
        ac.Schedule(block_m=0)
    with pytest.raises(ac.ScheduleError, match=r"kernel_block_m=24 must divide the layout block size 64"):
        ac.Schedule(kernel_block_m=24)


@pytest.mark.parametrize("mutate,match", [
    (lambda q, k, v: (q[0], k, v), r"q must be \[batch, heads, seq, head_dim\], got shape \(2, 10, 8\)"),
    (lambda q, k, v: ([1.0], k, v), r"q must be a torch.Tensor, got list"),
    (lambda q, k, v: (q, k[..., :4], v), r"q head_dim 8 != k head_dim 4"),
    (lambda q, k, v: (q, k, v[:, :, :7]), r"k has 10 positions but v has 7"),
    (lambda q, k, v: (q, torch.cat([k, k]), v), r"batch sizes differ: q 1, k 2, v 1"),
    (lambda q, k, v: (torch.cat([q, q[:, :1]], 1), k, v), r"q has 3 heads, not a multiple of the 2"),
    (lambda q, k, v: (q, k, v[:, :1]), r"k has 2 heads but v has 1"),
    (lambda q, k, v: (q[:, :, :0], k, v), r"q has an empty dimension"),
    (lambda q, k, v: (q.double(), k, v), r"q, k, v must share a dtype, got torch.float64, torch.float32"),
    (lambda q, k, v: (q.long(), k.long(), v.long()), r"q has dtype torch.int64; use float16"),
    (lambda q, k, v: (q.to("meta"), k, v), r"q, k, v must be on one device, got meta, cpu, cpu"),
])
@pytest.mark.parametrize("runner", ["compiled", "reference"])
def test_bad_qkv(mutate, match, runner):
    q, k, v = mutate(*_qkv())
    with pytest.raises(ac.InputError, match=match):
        if runner == "compiled":
            ac.compile(ac.causal(), backend="torch")(q, k, v)
        else:
            ac.reference(ac.causal(), q, k, v)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("which", [0, 1, 2])
def test_non_finite_inputs(bad, which):
    qkv = list(_qkv())
    qkv[which] = qkv[which].clone()
    qkv[which][0, 1, 3, 2] = bad
    name = "qkv"[which]
    with pytest.raises(ac.InputError, match=rf"{name} contains NaN or inf.*check_finite=False"):
        ac.compile(ac.causal(), backend="torch", check_finite=True)(*qkv)
    with pytest.raises(ac.InputError, match=rf"{name} contains NaN or inf"):
        ac.reference(ac.causal(), *qkv)
    # Documented opt-out: no check and no error.
    out = ac.compile(ac.causal(), backend="torch", check_finite=False)(*qkv)
    assert out.shape == qkv[0].shape


@pytest.mark.parametrize("which", [0, 2])
def test_unchecked_nan_inputs_propagate(which):
    # inputs.check_qkv documents check_finite=False as "accept NaN outputs": a NaN in q (or v)
    # must not come back as a plausible-looking zero row.
    qkv = list(_qkv())
    qkv[which] = qkv[which].clone()
    qkv[which][0, 1, 3, 2] = float("nan")
    out = ac.compile(ac.causal(), backend="torch", check_finite=False)(*qkv)
    assert torch.isnan(out[0, 1, 3]).any()


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), "0.1", True])
def test_bad_scale(scale):
    with pytest.raises(ac.InputError, match="scale=.* must be a finite number"):
        ac.compile(ac.causal(), backend="torch")(*_qkv(), scale=scale)


def _wrong_shape(b, h, q_idx, kv_idx):
    return torch.ones(3, dtype=torch.bool) if isinstance(q_idx, torch.Tensor) else q_idx.untraceable


def _wrong_dtype(b, h, q_idx, kv_idx):
    return (q_idx - kv_idx).remainder(2)  # integers, not bools


def _float_result(b, h, q_idx, kv_idx):
    return (q_idx - kv_idx).float().abs() < 2.5 if isinstance(q_idx, torch.Tensor) else q_idx.nope


def _returns_none(b, h, q_idx, kv_idx):
    return None


@pytest.mark.parametrize("fn,match", [
    (_wrong_shape, r"mask_mod _wrong_shape returned shape \(3,\) .* it must be element-wise"),
    (_wrong_dtype, r"mask_mod _wrong_dtype returned dtype torch.int64; it must return a bool tensor"),
    (_returns_none, r"mask_mod _returns_none returned NoneType None; it must return a bool tensor"),
])
def test_mask_mod_with_wrong_output(fn, match):
    p = ac.mask(fn)
    for action in (lambda: p.to_dense(16), lambda: p.layout(16, block_m=4),
                   lambda: ac.compile(p, backend="torch")(*_qkv()), lambda: ac.reference(p, *_qkv())):
        with pytest.raises(ac.PatternError, match=match):
            action()


def test_mask_mod_returning_floats_compared_is_fine():
    # A comparison of floats is a bool tensor: a valid (opaque) mask_mod.
    assert torch.equal(ac.mask(_float_result).to_dense(8), ac.sliding_window(2).to_dense(8))


def test_traced_mask_mod_must_return_a_boolean():
    with pytest.raises(ac.PatternError, match=r"mask_mod must return a boolean.*q_idx - kv_idx"):
        ac.mask(lambda b, h, q_idx, kv_idx: q_idx - kv_idx)
    with pytest.raises(ac.PatternError, match=r"needs a callable mask_mod"):
        ac.mask(3)


def test_mask_mod_that_raises_is_named():
    def broken(b, h, q_idx, kv_idx):
        return q_idx.remainder(0) == 0  # integer division by zero on tensors

    with pytest.raises(ac.PatternError, match=r"mask_mod .*broken raised RuntimeError"):
        ac.mask(broken).to_dense(4)


def test_combining_with_non_patterns_and_truth_values():
    with pytest.raises(ac.PatternError, match=r"cannot combine a pattern with int 3 using \|"):
        ac.causal() | 3
    with pytest.raises(ac.PatternError, match="truth value"):
        bool(ac.causal())
    with pytest.raises(ac.PatternError, match=r"compile\(\) needs an attention pattern, got str"):
        ac.compile("causal")
    with pytest.raises(ac.UnsupportedError, match=r"unknown backend 'bogus'"):
        ac.compile(ac.causal(), backend="bogus")


@pytest.mark.parametrize("make,match", [
    (lambda: patterns.bigbird(window_blocks=2), r"window_blocks=2 must be a positive odd number"),
    (lambda: patterns.bigbird(global_blocks=-1), r"global_blocks=-1 must be >= 0"),
    (lambda: patterns.longformer(dilation=0), r"dilation=0 must be >= 1"),
    (lambda: patterns.sparse_transformer_fixed(stride=4, summary=5), r"summary=5 must be in \[1, stride=4\]"),
    (lambda: patterns.axial(cols=0), r"block=0 must be >= 1"),
])
def test_catalogue_parameter_errors(make, match):
    with pytest.raises(ac.PatternError, match=match):
        make()


def test_no_assert_or_torch_error_leaks_for_bad_lengths_in_compiled_call():
    # The same module serves any length; each call validates its own inputs.
    attn = ac.compile(ac.sliding_window(3), backend="torch")
    attn(*_qkv(Lq=12, Lk=12))
    with pytest.raises(ac.InputError):
        attn(*_qkv(Lq=0, Lk=12))
