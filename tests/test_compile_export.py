"""``torch.compile(fullgraph=True)``, ``dynamic=True`` and ``torch.export`` of models using compiled
attention: mask patterns run as the custom operators of :mod:`attncompiler.runtime.ops`.

Every compiled result is compared with the eager module (forward and gradients) and, at the
attention level, with the independent float64 oracle of ``tests/oracle.py`` on large-magnitude
logits (about 100-1000) and odd lengths.
"""

import io

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import attncompiler as ac
from attncompiler import patterns
from attncompiler.errors import InputError, UnsupportedError
from attncompiler.nn import MultiheadAttention, TransformerStack
from attncompiler.program.schedule import Schedule
from attncompiler.runtime import ops
from oracle import assert_matches_oracle, dense_mask, masked_softmax_attention

SMALL = Schedule(block_m=16, block_n=16)
L = 37  # odd, not a multiple of the block
PATTERNS = {
    "sliding_window": ac.sliding_window(5),
    "causal": ac.causal(),
    "global_tokens": ac.global_tokens([0, 7]),
    "block_local": ac.block_local(8),
    "dilated": ac.dilated_window(3, 2),
    "strided": ac.strided(4),
    "document": ac.document([10, 13, 14]),
    "prefix_lm": ac.prefix_lm(6),
    "traced_mask": ac.mask(lambda b, h, q, k: (q - k) % 3 != 1),
    "bigbird": patterns.bigbird(block=16, window_blocks=1, global_blocks=1, random_blocks=1, seed=0),
}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class TwoLayer(nn.Module):
    """Two attention layers with projections and residuals around ``ac.compile(pattern)``."""

    def __init__(self, pattern, E=16, H=2, schedule=SMALL):
        super().__init__()
        self.H = H
        self.qkv = nn.ModuleList(nn.Linear(E, 3 * E) for _ in range(2))
        self.proj = nn.ModuleList(nn.Linear(E, E) for _ in range(2))
        self.attn = ac.compile(pattern, backend="torch", schedule=schedule)

    def forward(self, x):
        B, n, E = x.shape
        for qkv, proj in zip(self.qkv, self.proj):
            q, k, v = qkv(x).view(B, n, 3, self.H, E // self.H).permute(2, 0, 3, 1, 4)
            x = x + proj(self.attn(q, k, v).transpose(1, 2).reshape(B, n, E))
        return x


def _x(B=2, n=L, E=16, seed=0):
    return torch.randn(B, n, E, generator=torch.Generator().manual_seed(seed)) * 4


def _grads(model, x):
    x = x.clone().requires_grad_(True)
    out = model(x)
    out.backward(torch.cos(out.detach()))
    return out.detach(), [x.grad] + [p.grad.clone() for p in model.parameters()]


def _big_qkv(B, H, Hkv, Lq, Lk, D=8, seed=0):
    """Inputs whose logits are about 100-1000 in magnitude (fp32 leaves with gradients)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Lq, D, generator=g, dtype=torch.float64) * 12
    k = torch.randn(B, Hkv, Lk, D, generator=g, dtype=torch.float64) * 12
    v = torch.randn(B, Hkv, Lk, D, generator=g, dtype=torch.float64)
    return tuple(t.float().requires_grad_(True) for t in (q, k, v))


@pytest.mark.parametrize("name", list(PATTERNS))
def test_fullgraph_compile_matches_eager_and_oracle(name):
    pattern = PATTERNS[name]
    model = TwoLayer(pattern)
    x = _x()
    want, want_grads = _grads(model, x)
    model.zero_grad()
    counter = CompileCounterWithBackend("aot_eager")
    got, got_grads = _grads(torch.compile(model, fullgraph=True, backend=counter), x)
    assert counter.frame_count == 1  # one graph: fullgraph would have raised on a break
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # The attention alone, compiled, against the float64 oracle (forward and backward).
    q, k, v = _big_qkv(2, 2, 1, L, L, seed=3)
    fn = torch.compile(ac.compile(pattern, backend="torch", schedule=SMALL), fullgraph=True, backend="eager")
    ref = masked_softmax_attention(q, k, v, dense_mask(pattern, 2, 2, L, L), q.shape[-1] ** -0.5)[0]
    assert_matches_oracle(fn(q, k, v), ref, (q, k, v), rtol=1e-5, atol=1e-4, grad_rtol=1e-4, grad_atol=1e-3)


def test_no_graph_break_reported_by_explain():
    explained = torch._dynamo.explain(TwoLayer(ac.sliding_window(5).causal()))(_x())
    assert explained.graph_break_count == 0 and explained.graph_count == 1


def test_dynamic_shapes_do_not_recompile_for_a_new_length():
    model = TwoLayer(ac.sliding_window(6) | ac.global_tokens([0]))
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter, dynamic=True)
    for n in (37, 53, 70):
        x = _x(n=n, seed=n)
        want, want_grads = _grads(model, x)
        model.zero_grad()
        got, got_grads = _grads(compiled, x)
        model.zero_grad()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        for a, b in zip(got_grads, want_grads):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1


@pytest.mark.slow  # inductor's first C++ build takes ~25 s on a small CPU machine
def test_inductor_fullgraph_matches_eager():
    # Inference only: inductor's C++ compilation of the backward graph too would double the cost.
    model = TwoLayer(ac.sliding_window(5))
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), model(x), rtol=1e-5, atol=1e-5)


# --- torch.export ----------------------------------------------------------------------------

def test_export_matches_eager_and_reloads_in_a_fresh_registry(monkeypatch):
    model = TwoLayer(patterns.bigbird(block=16, window_blocks=1, global_blocks=1, random_blocks=1, seed=0))
    x = _x()
    with torch.no_grad():
        want = model(x)
    ep = torch.export.export(model, (x,))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert "attncompiler.mask_attention.default" in targets
    torch.testing.assert_close(ep.module()(x), want, rtol=1e-5, atol=1e-5)
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    buf.seek(0)
    loaded = torch.export.load(buf)
    # A fresh process has no registered pattern: the operator reads the pattern back from its text.
    monkeypatch.setattr(ops, "_PATTERNS", {})
    monkeypatch.setattr(ops, "_KEYS", {})
    ops.mask_program.cache_clear()
    torch.testing.assert_close(loaded.module()(x), want, rtol=1e-5, atol=1e-5)
    ops.mask_program.cache_clear()


def test_export_with_dynamic_length():
    model = TwoLayer(ac.sliding_window(5).causal())
    n = torch.export.Dim("n", min=2, max=4096)
    ep = torch.export.export(model, (_x(),), dynamic_shapes={"x": {1: n}})
    for length in (37, 64, 91):
        x = _x(n=length, seed=length)
        with torch.no_grad():
            torch.testing.assert_close(ep.module()(x), model(x), rtol=1e-5, atol=1e-5)


class Decoder(nn.Module):
    """Attention with call-time positions as model inputs."""

    def __init__(self, pattern):
        super().__init__()
        self.attn = ac.compile(pattern, backend="torch", schedule=SMALL)

    def forward(self, q, k, v, q_offset, kv_lens):
        return self.attn(q, k, v, q_offset=q_offset, kv_lens=kv_lens)


def test_export_with_q_offset_and_kv_lens_tensors():
    model = Decoder(ac.sliding_window(7).causal())
    q, k, v = (t.detach() for t in _big_qkv(3, 2, 1, 5, 40))
    args = (q, k, v, torch.tensor([0, 20, 35]), torch.tensor([40, 33, 40]))
    ep = torch.export.export(model, args)
    with torch.no_grad():
        want = model(*args)
        torch.testing.assert_close(ep.module()(*args), want, rtol=1e-5, atol=1e-5)
        other = (q, k, v, torch.tensor([3, 0, 30]), torch.tensor([11, 40, 35]))  # new values, same program
        torch.testing.assert_close(ep.module()(*other), model(*other), rtol=1e-5, atol=1e-5)


def test_process_local_pattern_raises_naming_it_elsewhere(monkeypatch):
    table = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2, 2, 2] * 4)
    pattern = ac.mask(lambda b, h, q, k: table[q] == table[k])
    attn = ac.compile(pattern, backend="torch", schedule=SMALL)
    assert attn.pattern_key.startswith(ops.LOCAL_PREFIX)
    q, k, v = (t.detach() for t in _big_qkv(1, 2, 2, 40, 40))
    fn = torch.compile(attn, fullgraph=True, backend="eager")
    torch.testing.assert_close(fn(q, k, v), attn(q, k, v))  # same process: the registry resolves it
    torch._dynamo.reset()
    monkeypatch.setattr(ops, "_PATTERNS", {})
    ops.mask_program.cache_clear()
    with pytest.raises(UnsupportedError, match=r"table\d*\[q_idx\]"):
        torch.compile(attn, fullgraph=True, backend="eager")(q, k, v)
    ops.mask_program.cache_clear()


# --- call-time positions under compile ---------------------------------------------------------

def _position_mask(pattern, B, H, Lq, Lk, offsets, kv_lens=None):
    m = torch.zeros(B, H, Lq, Lk, dtype=torch.bool)
    for b in range(B):
        n = Lk if kv_lens is None else int(kv_lens[b])
        if n:
            m[b, :, :, :n] = pattern.to_dense(int(offsets[b]) + Lq, n)[int(offsets[b]):]
    return m


@pytest.mark.parametrize("case, backend", [("int", "eager"), ("tensor", "aot_eager"), ("bottom_right", "aot_eager"),
                                           ("kv_lens", "eager"), ("bottom_right_kv_lens", "aot_eager")])
def test_positions_under_compile_match_oracle(case, backend):
    pattern = ac.sliding_window(9).causal() | ac.global_tokens([1])
    B, Lq, Lk = 3, 7, 45
    kv = torch.tensor([45, 30, 0]) if "kv_lens" in case else None
    kwargs = {"int": dict(q_offset=11), "tensor": dict(q_offset=torch.tensor([0, 20, 38])),
              "bottom_right": dict(align="bottom_right"), "kv_lens": dict(kv_lens=kv, q_offset=5),
              "bottom_right_kv_lens": dict(kv_lens=torch.tensor([45, 30, 7]), align="bottom_right")}[case]
    kv = kwargs.get("kv_lens")
    if "q_offset" in kwargs:
        off = kwargs["q_offset"]
        offsets = off.tolist() if isinstance(off, torch.Tensor) else [off] * B
    else:
        offsets = [(Lk if kv is None else int(kv[b])) - Lq for b in range(B)]
    attn = ac.compile(pattern, backend="torch", schedule=SMALL)
    fn = torch.compile(lambda q, k, v: attn(q, k, v, **kwargs), fullgraph=True, backend=backend)
    q, k, v = _big_qkv(B, 4, 2, Lq, Lk, seed=5)
    mask = _position_mask(pattern, B, 4, Lq, Lk, offsets, kv)
    ref = masked_softmax_attention(q, k, v, mask, q.shape[-1] ** -0.5)[0]
    assert_matches_oracle(fn(q, k, v), ref, (q, k, v), rtol=1e-5, atol=1e-4, grad_rtol=1e-4, grad_atol=1e-3)


@pytest.mark.parametrize("kwargs", [{}, {"q_offset": "tensor", "kv_lens": "tensor"}])
def test_triton_backend_under_compile_matches_oracle(kwargs, monkeypatch):
    """The operator runs the Triton kernels (interpreted on CPU) forward and backward."""
    from attncompiler.codegen.triton import kernels

    calls, real = [], kernels.triton_attention_backward
    monkeypatch.setattr(kernels, "triton_attention_backward", lambda *a: calls.append(1) or real(*a))
    pattern = ac.sliding_window(9).causal()
    B, Lq, Lk = 2, 5, 40
    offsets, kv = ([30, 3], torch.tensor([40, 21])) if kwargs else ([0, 0], None)
    call = {"q_offset": torch.tensor(offsets), "kv_lens": kv} if kwargs else {}
    attn = ac.compile(pattern, backend="triton", schedule=SMALL)
    fn = torch.compile(lambda q, k, v: attn(q, k, v, **call), fullgraph=True, backend="aot_eager")
    q, k, v = _big_qkv(B, 2, 1, Lq, Lk, D=16, seed=9)
    ref = masked_softmax_attention(q, k, v, _position_mask(pattern, B, 2, Lq, Lk, offsets, kv), 0.25)[0]
    assert_matches_oracle(fn(q, k, v), ref, (q, k, v), rtol=1e-5, atol=1e-4, grad_rtol=1e-4, grad_atol=1e-3)
    assert calls  # the backward ran the Triton kernels


def test_decode_loop_under_compile_does_not_recompile_per_step():
    attn = ac.compile(ac.sliding_window(6).causal(), backend="torch", schedule=SMALL)
    counter = CompileCounterWithBackend("eager")
    step_int = torch.compile(lambda q, k, v, n: attn(q, k, v, q_offset=n), fullgraph=True, backend=counter)
    q, k, v = (t.detach() for t in _big_qkv(2, 2, 1, 1, 30, seed=4))
    for n in range(20, 26):  # a KV cache of 30 slots, the query at position n (causal: keys <= n)
        torch.testing.assert_close(step_int(q, k, v, n), attn(q, k, v, q_offset=n))
    assert counter.frame_count <= 2  # the int offset becomes dynamic after its first change


def test_cu_seqlens_under_compile_match_oracle_and_keep_one_graph():
    pattern = ac.document() & ac.sliding_window(4)
    attn = ac.compile(pattern, backend="torch", schedule=SMALL)
    counter = CompileCounterWithBackend("aot_eager")
    fn = torch.compile(lambda q, k, v, cu: attn(q, k, v, cu_seqlens=cu), fullgraph=True, backend=counter)
    for cu in ([0, 5, 5, 6, 40], [0, 17, 33, 33, 40], [0, 1, 2, 39, 40]):
        q, k, v = _big_qkv(1, 2, 2, 40, 40, seed=len(cu))
        mask = dense_mask(ac.document([b - a for a, b in zip(cu, cu[1:]) if b > a]) & ac.sliding_window(4),
                          1, 2, 40, 40)
        ref = masked_softmax_attention(q, k, v, mask, q.shape[-1] ** -0.5)[0]
        out = fn(q, k, v, torch.tensor(cu, dtype=torch.int32))
        assert_matches_oracle(out, ref, (q, k, v), rtol=1e-5, atol=1e-4, grad_rtol=1e-4, grad_atol=1e-3)
    assert counter.frame_count == 1  # new documents (same count) are data, not a new graph


def test_bad_positions_raise_input_errors_under_compile():
    attn = ac.compile(ac.document() & ac.causal(), backend="torch", schedule=SMALL)
    q, k, v = (t.detach() for t in _big_qkv(1, 1, 1, 16, 16))
    with pytest.raises(InputError, match="non-decreasing"):
        torch.compile(lambda *a: attn(*a, cu_seqlens=torch.tensor([0, 9, 4, 16])), backend="eager",
                      fullgraph=True)(q, k, v)
    torch._dynamo.reset()
    causal = ac.compile(ac.causal(), backend="torch", schedule=SMALL)
    with pytest.raises(InputError, match="kv_lens"):
        torch.compile(lambda *a: causal(*a, kv_lens=torch.tensor([17])), backend="eager", fullgraph=True)(q, k, v)
    with pytest.raises(InputError, match="align"):  # a value: checked by the operator at run time
        torch.compile(lambda *a: causal(*a, align="bottom"), backend="eager", fullgraph=True)(q, k, v)
    torch._dynamo.reset()
    # A wrong Python type is found while tracing: torch reports it in its own error, with our message.
    with pytest.raises(Exception, match=r"q_offset='3' must be an int"):
        torch.compile(lambda *a: causal(*a, q_offset="3"), backend="eager", fullgraph=True)(q, k, v)
    with pytest.raises(InputError, match="NaN"):  # check_finite runs inside the operator
        bad = q.clone()
        bad[0, 0, 3, 1] = float("nan")
        checked = ac.compile(ac.causal(), backend="torch", check_finite=True)
        torch.compile(checked, backend="eager", fullgraph=True)(bad, k, v)


# --- no host reads of tensor values ------------------------------------------------------------

def _forbid_host_reads(monkeypatch):
    def boom(*_a, **_k):
        raise AssertionError("a tensor value was read on the host")

    for name in ("item", "__bool__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, boom)


@pytest.mark.parametrize("kv_lens", [False, True])
def test_forward_reads_no_tensor_value_eager_or_compiled(monkeypatch, kv_lens):
    attn = ac.compile(ac.sliding_window(5).causal(), backend="torch", schedule=SMALL)
    kwargs = {"kv_lens": torch.tensor([33, 20])} if kv_lens else {}
    q, k, v = _big_qkv(2, 2, 1, 33, 33, seed=7)
    fn = torch.compile(lambda q, k, v: attn(q, k, v, **kwargs), fullgraph=True, backend="aot_eager")
    want = attn(q, k, v, **kwargs)
    fn(q, k, v).sum().backward()  # compile (tracing may read values) and warm the caches
    _forbid_host_reads(monkeypatch)
    out = fn(q, k, v)
    out.sum().backward()
    attn(q, k, v, **kwargs).sum().backward()
    monkeypatch.undo()
    torch.testing.assert_close(out, want)


# --- modules of attncompiler.nn and the families -----------------------------------------------

@pytest.mark.parametrize("is_causal", [False, True])
def test_multihead_attention_fullgraph(is_causal):
    mha = MultiheadAttention(16, 2, ac.sliding_window(4), backend="torch", schedule=SMALL)
    x = _x()

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = mha

        def forward(self, x):
            return self.mha(x, is_causal=is_causal)[0]

    model = Wrap()
    want, want_grads = _grads(model, x)
    model.zero_grad()
    got, got_grads = _grads(torch.compile(model, fullgraph=True, backend="aot_eager"), x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_transformer_stack_without_reuse_fullgraph():
    stack = TransformerStack(16, 2, ac.sliding_window(4), num_layers=2, backend="torch", schedule=SMALL)
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(stack, fullgraph=True, backend="eager")(x), stack(x),
                                   rtol=1e-5, atol=1e-5)


# Documented in attncompiler/runtime/ops.py: these families do not trace under fullgraph yet.
UNSUPPORTED = {
    "combiner": lambda: ac.compile(patterns.combiner_fixed(span=8), backend="torch"),
    "diffuser": lambda: ac.compile(patterns.diffuser(window=4, hops=2, num_global=1, random_blocks=0),
                                   backend="torch"),
    "abc": lambda: ac.compile(patterns.abc_mlp(slots=8), backend="torch"),
    "reuse": lambda: TransformerStack(16, 2, ac.sliding_window(4), num_layers=2, backend="torch", reuse={1: "all"}),
}


@pytest.mark.parametrize("name", list(UNSUPPORTED))
def test_families_not_yet_traceable_raise_torch_errors(name):
    module = UNSUPPORTED[name]()
    args = (_x(1, 32),) if name == "reuse" else tuple(torch.randn(1, 2, 32, 16) for _ in range(3))
    module(*args)  # eager works
    with pytest.raises((torch._dynamo.exc.Unsupported, torch._dynamo.exc.UserError)):
        torch.compile(module, fullgraph=True, backend="eager")(*args)


def test_double_backward_raises():
    attn = ac.compile(ac.causal(), backend="torch", schedule=SMALL)
    q, k, v = _big_qkv(1, 1, 1, 9, 9)
    out = torch.compile(attn, fullgraph=True, backend="eager")(q, k, v)
    (gq,) = torch.autograd.grad(out.sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="autograd"):
        gq.sum().backward()


def test_edge_weights_run_eagerly_under_compile():
    """A module with a score_mod and sinks has no operator yet: compiled without fullgraph it
    breaks the graph cleanly and matches eager and the oracle, forward and backward; with
    fullgraph torch refuses it."""
    pattern = ac.sliding_window(5).causal()
    sinks = torch.nn.Parameter(torch.randn(2))
    attn = ac.compile(pattern, backend="torch", schedule=SMALL, score_mod=ac.softcap(20.0), sinks=sinks)
    q, k, v = _big_qkv(1, 2, 1, L, L, seed=5)
    want = attn(q, k, v)
    got = torch.compile(attn, backend="eager")(q, k, v)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    ref = ac.reference(pattern, q.detach().double(), k.detach().double(), v.detach().double(),
                       score_mod=ac.softcap(20.0), sinks=sinks.detach().double())
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=5e-5)
    g_want = torch.autograd.grad(want.sum(), (q, sinks))
    g_got = torch.autograd.grad(got.sum(), (q, sinks))
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)

    def model(q, k, v):  # work on both sides of the attention: the break cannot be skipped
        return attn(q * 2.0, k, v) + 1.0

    torch.testing.assert_close(torch.compile(model, backend="eager")(q, k, v), model(q, k, v), rtol=0, atol=0)
    torch._dynamo.reset()  # the frame above is cached with its graph break
    with pytest.raises((torch._dynamo.exc.Unsupported, torch._dynamo.exc.UserError)):
        torch.compile(model, fullgraph=True, backend="eager")(q, k, v)
