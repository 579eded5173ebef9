"""Regressions of issue 15 (no silent wrong answers): crashes and raw Python/numpy/torch errors
that must be right answers or clear attncompiler errors."""

from __future__ import annotations

import time
import tracemalloc

import pytest
import torch

import attncompiler as ac
from attncompiler import patterns
from attncompiler.errors import InputError, LayoutError, PatternError, UnexpectedArgumentError


def _qkv(B=1, H=2, Lq=8, Lk=None, D=4, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    Lk = Lq if Lk is None else Lk
    return (torch.randn(B, H, Lq, D, generator=g, dtype=dtype), torch.randn(B, H, Lk, D, generator=g, dtype=dtype),
            torch.randn(B, H, Lk, D, generator=g, dtype=dtype))


# ---------------------------------------------------------------------------------------------
# Diffusion over a base graph with empty rows: every query row sees no key, so out = alpha * V
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["materialize", "recompute"])
@pytest.mark.parametrize("base, L", [(~ac.full(), 8), (~ac.full(), 70), (ac.sliding_window(5) & ~ac.causal(), 1)])
def test_diffusion_without_edges_gives_alpha_v(base, L, mode):
    pattern = ac.diffuse(base, hops=2, alpha=0.1)
    q, k, v = _qkv(Lq=L, dtype=torch.float64)
    attn = ac.compile(pattern, backend="torch")
    attn.hops_mode = mode
    out = attn(q, k, v)
    torch.testing.assert_close(out, 0.1 * v, rtol=0, atol=1e-12)
    torch.testing.assert_close(out, ac.reference(pattern, q, k, v), rtol=0, atol=1e-12)


@pytest.mark.parametrize("base", [ac.sliding_window(5) & ~ac.causal(), ~ac.full() | ac.global_tokens([3]),
                                  (ac.sliding_window(5) & ~ac.causal()) | ac.global_tokens(range(128), clip=True)],
                         ids=["last-rows-empty", "only-globals", "clipped-globals"])
def test_diffusion_with_some_empty_rows_matches_reference(base):
    # float32 with value heads of 16: the CPU C kernels' path where the library builds
    pattern = ac.diffuse(base, hops=3, alpha=0.2)
    q, k, v = _qkv(B=2, Lq=70, D=16)
    out = ac.compile(pattern, backend="torch")(q, k, v)
    torch.testing.assert_close(out.double(), ac.reference(pattern, q, k, v), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# ABC memory: validate before the lazy parameter takes its shape
# ---------------------------------------------------------------------------------------------

def test_memory_rejected_call_leaves_module_usable():
    attn = ac.compile(ac.memory(4))
    q, k, v = _qkv()
    with pytest.raises(InputError, match="head_dim"):
        attn(q, k[..., :3], v)
    out = attn(q, k, v)
    assert attn.control_param.shape == (4, 4)
    torch.testing.assert_close(out.double(), attn.reference(q, k, v), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("which", [0, 1, 2])
def test_memory_list_inputs_raise_input_error(which):
    attn = ac.compile(ac.memory(4, causal=True))
    args = list(_qkv())
    args[which] = args[which].tolist()
    with pytest.raises(InputError, match="must be a torch.Tensor"):
        attn(*args)
    with pytest.raises(InputError, match="must be a torch.Tensor"):
        attn.reference(*args)


def test_memory_step_checks_its_state():
    attn = ac.compile(ac.memory(3, causal=True))
    q, k, v = _qkv(Lq=1)
    with pytest.raises(InputError, match="init_state"):
        attn.step(q, k, v, None)
    _, state = attn.step(q, k, v, attn.init_state(1))
    q2, k2, v2 = _qkv(Lq=1, D=4, H=1)
    with pytest.raises(InputError, match="kv_heads"):
        attn.step(q2, k2, v2, state)


# ---------------------------------------------------------------------------------------------
# Integer parameters beyond int64: rejected at construction, naming the parameter and range
# ---------------------------------------------------------------------------------------------

BIG = 2**63
TOO_BIG = [
    ("window", lambda: ac.sliding_window(BIG)),
    ("block", lambda: ac.block_local(2**64)),
    ("window", lambda: ac.dilated_window(BIG, 1)),
    ("dilation", lambda: ac.dilated_window(1, BIG)),
    ("window", lambda: ac.block_window(BIG, 2)),
    ("block", lambda: ac.block_window(1, BIG)),
    ("stride", lambda: ac.strided(BIG)),
    ("count", lambda: ac.random_blocks(BIG, 4)),
    ("block", lambda: ac.random_blocks(1, BIG)),
    ("seed", lambda: ac.random_blocks(1, 4, seed=BIG)),
    ("prefix", lambda: ac.prefix_lm(BIG)),
    ("global token index", lambda: ac.global_tokens([0, BIG])),
    ("document length", lambda: ac.document([3, BIG])),
    ("hops", lambda: ac.diffuse(ac.causal(), hops=BIG)),
    ("slots", lambda: ac.memory(BIG)),
    ("max_len", lambda: ac.LinformerControl(max_len=BIG)),
    ("span", lambda: ac.combiner_fixed(BIG)),
    ("cols", lambda: ac.combiner_axial(BIG)),
    ("rows", lambda: ac.combiner_axial(4, rows=BIG)),
    ("block", lambda: patterns.bigbird(block=BIG)),
    ("global_blocks", lambda: patterns.bigbird(global_blocks=BIG)),
    ("window", lambda: patterns.longformer(window=BIG)),
    ("dilation", lambda: patterns.longformer(dilation=BIG)),
    ("summary", lambda: patterns.sparse_transformer_fixed(summary=BIG)),
    ("stride", lambda: patterns.sparse_transformer_strided(stride=BIG)),
    ("local", lambda: patterns.logsparse(local=BIG)),
    ("cols", lambda: patterns.axial(cols=BIG)),
    ("window", lambda: patterns.diffuser(window=2**64)),
    ("num_global", lambda: patterns.diffuser(num_global=BIG)),
    ("slots", lambda: patterns.abc_mlp(slots=BIG)),
    ("max_len", lambda: patterns.abc_linformer(max_len=BIG)),
]


@pytest.mark.parametrize("name, build", TOO_BIG)
def test_integer_parameters_beyond_int64_are_rejected(name, build):
    with pytest.raises(PatternError) as err:
        build()
    msg = str(err.value)
    assert "<=" in msg and f"{name}=" in msg, msg


def test_dilated_window_reach_must_fit():
    with pytest.raises(PatternError, match="window \\* dilation"):
        ac.dilated_window(2**40, 2**40)


@pytest.mark.parametrize("build", [lambda: ac.sliding_window(True), lambda: ac.block_local(True),
                                   lambda: ac.memory(True), lambda: patterns.bigbird(block=True),
                                   lambda: patterns.diffuser(num_global=False)])
def test_bools_are_not_integer_parameters(build):
    with pytest.raises(PatternError, match="must be an integer"):
        build()


def test_largest_allowed_parameters_still_work():
    dense = ac.sliding_window(2**62).to_dense(9)
    assert bool(dense.all())
    assert ac.block_local(2**62).layout(100, block_m=16).num_blocks == 49
    assert torch.equal(ac.dilated_window(2**31, 2**31).to_dense(5), torch.eye(5, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------
# Requests that cannot fit in memory: a LayoutError with the estimate, before allocating
# ---------------------------------------------------------------------------------------------

def test_huge_layout_is_refused_with_an_estimate():
    with pytest.raises(LayoutError, match=r"needs about [\d.]+ TiB.*larger blocks"):
        ac.full().layout(2**40)


def test_huge_dense_mask_is_refused_with_an_estimate():
    with pytest.raises(LayoutError, match=r"needs about [\d.]+ TiB.*layout"):
        ac.causal().to_dense(10**6)


def test_document_cost_is_bounded_by_the_length_asked_for():
    pattern = ac.document([10**8])
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        dense = pattern.to_dense(8)
        layout_blocks = pattern.layout(300, block_m=16).num_blocks
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert bool(dense.all()) and layout_blocks == 19 * 19
    assert peak < 16 * 2**20, f"peak {peak} bytes: the segment table was not clipped"
    assert time.perf_counter() - t0 < 5.0


def test_document_past_a_huge_segment_is_exact():
    pattern = ac.document([3, 2**62, 2**62])
    want = torch.zeros(8, 8, dtype=torch.bool)
    want[:3, :3] = True
    want[3:, 3:] = True
    assert torch.equal(pattern.to_dense(8), want)
    lay = pattern.layout(8, block_m=2)
    assert lay.num_blocks == int(want.view(4, 2, 4, 2).any(dim=(1, 3)).sum()) == 12


# ---------------------------------------------------------------------------------------------
# BigBird shorter than its global blocks: the global part is clipped to the length
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("L", [1, 63, 100])
def test_bigbird_shorter_than_its_global_blocks(L):
    pattern = patterns.bigbird(block=64)
    dense = pattern.to_dense(L)
    assert bool(dense[:, : min(L, 128)].all()) and bool(dense[: min(L, 128)].all())
    q, k, v = _qkv(H=1, Lq=L, D=8)
    out = ac.compile(pattern, backend="torch")(q, k, v)
    torch.testing.assert_close(out.double(), ac.reference(pattern, q, k, v), rtol=1e-5, atol=1e-5)


def test_explicit_global_tokens_out_of_range_still_raise():
    with pytest.raises(PatternError, match="out of range"):
        ac.global_tokens([70]).to_dense(63)
    assert bool(ac.global_tokens([0, 70], clip=True).to_dense(8)[0].all())


# ---------------------------------------------------------------------------------------------
# Unknown keywords raise UnexpectedArgumentError (an InputError and a TypeError) naming them
# ---------------------------------------------------------------------------------------------

def test_unexpected_argument_error_hierarchy():
    assert issubclass(UnexpectedArgumentError, InputError) and issubclass(UnexpectedArgumentError, TypeError)
    for kind in (TypeError, InputError, ValueError, ac.AttnCompilerError):
        with pytest.raises(kind):
            raise UnexpectedArgumentError("x")


def _expect_unknown(call, name="q_offset"):
    with pytest.raises(UnexpectedArgumentError, match=f"'{name}'.*accepted"):
        call()


@pytest.mark.parametrize("pattern", [ac.causal(), ac.diffuse(ac.causal(), hops=2), ac.combiner_fixed(4),
                                     ac.memory(4), ac.memory(4, ac.WindowControl(), causal=True)],
                         ids=["mask", "diffusion", "combiner", "memory", "window-memory"])
def test_forward_rejects_unknown_keywords(pattern):
    q, k, v = _qkv()
    attn = ac.compile(pattern, backend="torch")
    _expect_unknown(lambda: attn(q, k, v, kv_offset=5), "kv_offset")
    _expect_unknown(lambda: ac.reference(pattern, q, k, v, kv_offset=5), "kv_offset")
    attn(q, k, v)  # the module still works


def test_memory_methods_reject_unknown_keywords():
    attn = ac.compile(ac.memory(4, causal=True))
    q, k, v = _qkv(Lq=1)
    _expect_unknown(lambda: attn.reference(q, k, v, q_offset=1))
    _expect_unknown(lambda: attn.init_state(1, q_offset=1))
    _expect_unknown(lambda: attn.step(q, k, v, attn.init_state(1), q_offset=1))
    logits = torch.randn(1, 2, 1, 4)
    out = attn(q, k, v, control=logits)  # the keywords a memory does read still work
    torch.testing.assert_close(out.double(), attn.reference(q, k, v, control=logits), rtol=1e-5, atol=1e-5)
    window = ac.compile(ac.memory(4, ac.WindowControl(), causal=True))
    _expect_unknown(lambda: window(q, k, v, control=logits), "control")  # a window memory has no control


def test_accepted_keywords_come_from_the_program():
    assert ac.compile(ac.causal()).program.call_inputs() == ()
    assert set(ac.compile(ac.memory(4)).program.call_inputs()) == {"param:control", "control"}


def test_nn_modules_reject_unknown_keywords():
    x = torch.randn(1, 5, 8)
    mha = ac.nn.MultiheadAttention(8, 2, ac.causal())
    _expect_unknown(lambda: mha(x, q_offset=1))
    block = ac.nn.TransformerBlock(8, 2, ac.causal(), mlp_ratio=0)
    _expect_unknown(lambda: block(x, q_offset=1))
    stack = ac.nn.TransformerStack(8, 2, [ac.causal(), ac.causal()], reuse={1: 1}, mlp_ratio=0)
    _expect_unknown(lambda: stack(x, q_offset=1))
    assert stack(x).shape == x.shape


# ---------------------------------------------------------------------------------------------
# Meta tensors, lse dtype, top-left positions
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pattern", [ac.causal(), ac.memory(4), ac.diffuse(ac.causal(), hops=1)])
def test_meta_tensors_raise_input_error(pattern):
    q, k, v = (t.to("meta") for t in _qkv())
    with pytest.raises(InputError, match="meta"):
        ac.compile(pattern, backend="torch")(q, k, v)
    with pytest.raises(InputError, match="meta"):
        ac.reference(pattern, q, k, v)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("pattern", [ac.sliding_window(3) & ac.causal(), ac.memory(4, causal=True)],
                         ids=["mask", "memory"])
def test_lse_dtype_matches_the_docstring(pattern, dtype, backend):
    q, k, v = _qkv(Lq=16, D=8, dtype=dtype)
    attn = ac.compile(pattern, backend=backend)
    out, lse = attn(q, k, v, return_lse=True)
    assert out.dtype == dtype
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    _, ref_lse = attn.reference(q, k, v, return_lse=True)
    assert ref_lse.dtype == torch.float64
    tol = 1e-10 if dtype == torch.float64 and backend == "torch" else 1e-4
    torch.testing.assert_close(lse.double(), ref_lse, rtol=tol, atol=tol)


def test_lse_is_float32_for_half_inputs():
    q, k, v = _qkv(Lq=16, D=8, dtype=torch.bfloat16)
    _, lse = ac.compile(ac.causal(), backend="torch")(q, k, v, return_lse=True)
    assert lse.dtype == torch.float32


def test_positions_are_top_left_when_lengths_differ():
    q, k, v = _qkv(Lq=3, Lk=5, dtype=torch.float64)
    out = ac.compile(ac.causal(), backend="torch")(q, k, v)
    torch.testing.assert_close(out[:, :, 0], v[:, :, 0])  # query row 0 is position 0: sees key 0 only
    torch.testing.assert_close(out, ac.reference(ac.causal(), q, k, v))
