"""ABC memory on the Triton backend (interpreter on CPU; tiny sizes): the chunked SlotWrite scan,
SlotRead and their backward kernels against the float64 reference, causal and bidirectional,
chunk-size invariance, large control logits, and the torch fallback for huge logit spreads."""

from __future__ import annotations

import pytest
import torch

import attncompiler as ac
from attncompiler.families import memory as M
from attncompiler.program.schedule import Schedule
from oracle import assert_matches_oracle

triton = pytest.importorskip("triton")
from attncompiler.codegen.triton import memory as triton_memory  # noqa: E402  (registers the Triton memory stages)

CONTROLS = {"mlp": M.MLPControl(), "linformer": M.LinformerControl(max_len=32), "cluster": M.ClusterControl()}


@pytest.fixture
def kernels_only(monkeypatch):
    """Fail if a call takes the torch fallback instead of the Triton kernels."""
    def boom(*args, **kwargs):
        raise AssertionError("the torch fallback ran where the Triton kernels should")

    monkeypatch.setattr(triton_memory, "write_memory", boom)
    monkeypatch.setattr(triton_memory, "read_memory", boom)


def make(kind, n, causal, chunk):
    attn = ac.compile(M.memory(n, CONTROLS[kind], causal=causal), backend="triton",
                      schedule=Schedule(block_m=chunk, block_n=chunk))
    return attn


def qkv(B=1, H=2, Hkv=1, Lq=21, Lk=21, D=8, Dv=16):
    q = torch.randn(B, H, Lq, D, requires_grad=True)
    k = torch.randn(B, Hkv, Lk, D, requires_grad=True)
    v = torch.randn(B, Hkv, Lk, Dv, requires_grad=True)
    return q, k, v


def init_param(attn, kind, k):
    attn.materialize(k.shape[-1])
    if kind == "cluster":  # centroids at some keys so that several slots get hits
        attn.control_param.data.copy_(k[0, 0, 3:3 + attn.pattern.slots].detach())


@pytest.mark.parametrize("kind", ["mlp", "linformer", "cluster"])
@pytest.mark.parametrize("causal", [True, False])
def test_kernels_match_reference(kind, causal, kernels_only):
    # 21 tokens in chunks of 8: three chunks, the last ragged; GQA 2:1; D != Dv
    attn = make(kind, 5, causal, 8)
    q, k, v = qkv()
    init_param(attn, kind, k)
    out, lse = attn(q, k, v, return_lse=True)
    ref, ref_lse = attn.reference(q, k, v, return_lse=True)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=2e-5, atol=2e-5)
    assert_matches_oracle(out, ref, (q, k, v), rtol=2e-5)
    if kind != "cluster":  # the learned control parameter gets the oracle's gradient too
        W = attn.control_param.detach().double().requires_grad_()
        g = torch.randn_like(ref)
        (attn(q, k, v).double() * g).sum().backward()
        (ac.reference(attn.pattern, q, k, v, param=W) * g).sum().backward()
        torch.testing.assert_close(attn.control_param.grad.double(), W.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("causal", [True, False])
def test_caller_logits_and_batches(causal, kernels_only):
    # B=2, 4 query heads on 2 kv heads, 7 slots (padded to 16 in the kernels), logits passed in
    attn = make("mlp", 7, causal, 4)
    q, k, v = qkv(B=2, H=4, Hkv=2, Lq=10, Lk=10, D=16, Dv=8)
    s = torch.randn(2, 2, 10, 7, requires_grad=True)
    out = attn(q, k, v, control=s)
    ref = attn.reference(q, k, v, control=s)
    assert_matches_oracle(out, ref, (q, k, v, s), rtol=2e-5)


@pytest.mark.parametrize("lq,lk", [(9, 20), (20, 9)])
def test_causal_unequal_lengths(lq, lk, kernels_only):
    # queries past the last key read the final memory (the complete-memory kernel)
    attn = make("mlp", 3, True, 8)
    q, k, v = qkv(Lq=lq, Lk=lk)
    init_param(attn, "mlp", k)
    assert_matches_oracle(attn(q, k, v), attn.reference(q, k, v), (q, k, v), rtol=2e-5)


@pytest.mark.parametrize("kind,chunks", [("mlp", (2, 5, 16)), ("cluster", (3, 16))])
def test_chunk_size_does_not_change_results(kind, chunks, kernels_only):
    q, k, v = qkv(Lq=13, Lk=13)
    g = torch.randn(1, 2, 13, 16)
    results = []
    for chunk in chunks:  # 2 and 3: many chunks; 16: one chunk holds every token
        attn = make(kind, 6, True, chunk)
        torch.manual_seed(1)
        init_param(attn, kind, k)
        out = attn(q, k, v)
        results.append((out, *torch.autograd.grad(out, (q, k, v), g)))
    for res in results[1:]:
        for a, b in zip(res, results[0]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_large_control_logits_on_the_kernels(causal, kernels_only):
    # |logits| ~ 100: exp(100) overflows float32, so only the running log-sum-exp keeps this
    # finite. Causal: within a chunk they spread less than SPREAD_LIMIT, so the kernels run;
    # bidirectional reads only the final memory (normalizers >= 1), so any spread runs on them.
    attn = make("mlp", 4, causal, 8)
    q, k, v = qkv(Lq=21, Lk=21)
    sign = torch.tensor([1.0, -1.0, 1.0, -1.0])
    s = (100 * sign + (6 if causal else 60) * torch.randn(1, 1, 21, 4)).requires_grad_()
    out = attn(q, k, v, control=s)
    ref = attn.reference(q, k, v, control=s)
    assert torch.isfinite(out).all()
    assert_matches_oracle(out, ref, (q, k, v, s), rtol=2e-5)


def test_huge_logit_spread_falls_back_to_float64():
    # spreads past SPREAD_LIMIT inside a chunk leave float32 range: the torch path runs in float64
    attn = make("mlp", 4, True, 8)
    q, k, v = qkv(Lq=21, Lk=21)
    s = (60 * torch.randn(1, 1, 21, 4)).requires_grad_()
    mem = triton_memory.triton_write(k, v, s, True, True, 8)
    assert isinstance(mem, triton_memory.SlotMemory) and mem.dtype == torch.float64
    out = attn(q, k, v, control=s)
    assert_matches_oracle(out, attn.reference(q, k, v, control=s), (q, k, v, s), rtol=2e-5)


def test_window_control_runs_the_block_sparse_kernels():
    attn = ac.compile(M.memory(5, M.WindowControl(), causal=True), backend="triton",
                      schedule=Schedule(block_m=16, block_n=16))
    q, k, v = qkv(Lq=21, Lk=21)
    want = ac.reference(ac.sliding_window(4) & ac.causal(), q, k, v)
    assert_matches_oracle(attn(q, k, v), want, (q, k, v), rtol=2e-5)


def test_kernel_file_comes_from_the_cache(tmp_path, monkeypatch):
    from attncompiler.codegen import cache

    monkeypatch.setenv("ATTNC_CACHE_DIR", str(tmp_path))
    mod = triton_memory.memory_kernels()
    path = tmp_path / f"{triton_memory.CACHE_PREFIX}_{triton_memory.memory_cache_key()}.py"
    assert path.exists() and mod.__file__ == str(path)
    assert "cache key" in path.read_text().splitlines()[2]
    assert all(hasattr(mod, name) for name in triton_memory.KERNELS)
    cache.clear_memory()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
def test_gpu_sizes(dtype, causal):
    # the benchmark's shapes at a moderate length: 64 slots, D=64, chunks of 64, ragged end
    attn = ac.compile(M.memory(64, M.MLPControl(), causal=causal), backend="triton").cuda()
    q, k, v = (torch.randn(2, 4, 1000, 64, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    out = attn(q, k, v)
    ref = attn.reference(q, k, v)
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    assert_matches_oracle(out, ref, (q, k, v), rtol=tol, atol=tol, grad_rtol=10 * tol, grad_atol=10 * tol)


_AOT_SCRIPT = """
from attncompiler.codegen.triton.memory import KERNELS, compile_memory_for_target
shared = compile_memory_for_target(arch=90, head_dim=16, slots=16, chunk=16, num_warps=4)
print(sorted(shared) == sorted(KERNELS))
"""


@pytest.mark.slow
def test_memory_kernels_compile_for_sm90_without_a_gpu(tmp_path):
    # The interpreter forgives what compiled Triton rejects (loop-carried type changes,
    # non-constexpr globals): every memory kernel goes through the real compiler for an H100.
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["ATTNC_CACHE_DIR"] = str(tmp_path)
    res = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().splitlines()[-1] == "True"
