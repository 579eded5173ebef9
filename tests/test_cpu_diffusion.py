"""The C kernels of the CPU diffusion stages (codegen/cpu/cpu_diffusion.c) against the
float64 reference and against the plain torch path, on both builds (AVX2 where the CPU has it,
and the generic one of aarch64 and x86 CPUs without AVX2), and their build fallbacks."""

from __future__ import annotations

import pytest
import torch

import attncompiler as ac
from attncompiler.codegen.cpu import build as cpu_build, diffusion as cpu_diffusion
from attncompiler.errors import InputError
from attncompiler.families.diffusion.pattern import diffuse
from attncompiler.families.diffusion.program import split_global_tokens
from attncompiler.patterns.diffuser import diffuser
from cpu_builds import BUILDS, use_build
from oracle import assert_matches_oracle

pytestmark = pytest.mark.skipif(cpu_diffusion._library() is None,
                                reason=f"C kernels unavailable here: {cpu_build.STATUS.get('cpu_diffusion')}")

# Value heads a multiple of 16 so that the hop kernel runs too (the other diffusion tests use
# odd value widths, which keep the torch hop).
CASES = [
    (diffuser(window=8, random_blocks=1, num_global=2, hops=3), 300, None),  # default block, ragged end
    (diffuse(ac.sliding_window(5), hops=3), 50, 16),
    (diffuser(window=8, random_blocks=1, num_global=1, hops=3, causal=True), 61, 16),
    (diffuse(ac.sliding_window(3) | ac.global_tokens([0, 9]), hops=4, kernel="heat", t=2.0), 45, 8),
    (diffuse(ac.random_blocks(2, block=8, seed=4) | ac.global_tokens([0, 30]), hops=2), 40, (8, 64)),
    (diffuse(ac.block_local(8) & ac.mask(lambda b, h, q_idx, kv_idx: q_idx != 3), hops=2), 24, 8),  # an empty row
    (diffuser(window=20, random_blocks=1, num_global=3, hops=2, causal=True), 97, 10),  # tails of 2 rows, no transpose
    (diffuse(ac.random_blocks(24, block=16, seed=1) | ac.sliding_window(8), hops=2), 512, 16),  # > 256 keys a row: passes
]


@pytest.fixture(params=BUILDS)
def variant(request, monkeypatch):
    """The kernel build the test runs on (ATTNC_CPU_KERNELS selects it)."""
    use_build(monkeypatch, request.param)
    assert cpu_diffusion._library() is cpu_build.load("cpu_diffusion", request.param) is not None
    return request.param


def _schedule(block):
    if block is None:
        return None
    bm, tile = block if isinstance(block, tuple) else (block, 256 * 1024)
    return ac.Schedule(block_m=bm, block_n=bm, tile_elems=tile)  # a small tile_elems: several chunks


@pytest.mark.parametrize("case", CASES, ids=[repr(c[0])[:50] for c in CASES])
def test_kernels_match_reference_forward_backward(case, variant):
    pattern, L, block = case
    gen = torch.Generator().manual_seed(L)
    q = torch.randn(2, 4, L, 16, generator=gen, requires_grad=True)
    k = torch.randn(2, 2, L, 16, generator=gen, requires_grad=True)
    v = torch.randn(2, 2, L, 32, generator=gen, requires_grad=True)
    attn = ac.compile(pattern, backend="torch", schedule=_schedule(block))
    out = attn(q, k, v)
    assert_matches_oracle(out, ac.reference(pattern, q, k, v), (q, k, v), atol=2e-5, grad_atol=2e-5)


@pytest.mark.parametrize("head_dim,block", [(12, 16), (12, 10), (40, 32)])
def test_kernels_with_head_dims_off_the_vector_width(head_dim, block, variant):
    # head_dim % 8 != 0 takes the scalar key transposes; 40 with blocks of 32: two band tiles of
    # 16 per key block and a rest of 36 keys padded to 48 columns.
    pattern = diffuser(window=2 * block, random_blocks=1, num_global=2, hops=2)
    gen = torch.Generator().manual_seed(head_dim + block)
    q, k = (torch.randn(1, 2, 150, head_dim, generator=gen, requires_grad=True) for _ in range(2))
    v = torch.randn(1, 2, 150, 16, generator=gen, requires_grad=True)
    attn = ac.compile(pattern, backend="torch", schedule=ac.Schedule(block_m=block, block_n=block))
    assert_matches_oracle(attn(q, k, v), ac.reference(pattern, q, k, v), (q, k, v), atol=2e-5, grad_atol=2e-5)


@pytest.mark.parametrize("logit", [100.0, 1000.0])
def test_kernels_with_large_logits(variant, logit):
    # integer q, k and a power-of-two scale: exact float32 scores of magnitude ~logit, so the
    # comparison measures the kernels (a sharp softmax), not the conditioning of the scores
    pattern = diffuser(window=8, random_blocks=1, num_global=2, hops=2)
    gen = torch.Generator().manual_seed(int(logit))
    r = max(1, round((3 * logit / 4) ** 0.5))  # scale 1/4 at head_dim 16
    q, k = (torch.randint(-r, r + 1, (1, 2, 97, 16), generator=gen).float().requires_grad_() for _ in range(2))
    v = torch.randn(1, 2, 97, 16, generator=gen, requires_grad=True)
    attn = ac.compile(pattern, backend="torch", schedule=ac.Schedule(block_m=16, block_n=16))
    assert_matches_oracle(attn(q, k, v), ac.reference(pattern, q, k, v), (q, k, v), atol=2e-5, grad_atol=2e-4)


def test_kernels_and_torch_ops_store_the_same_probabilities(monkeypatch, variant):
    from attncompiler.codegen.pytorch import diffusion as td
    from attncompiler.codegen.pytorch.diffusion_plan import items_for

    pattern = diffuser(window=16, random_blocks=2, num_global=3, hops=2)
    split = split_global_tokens(pattern.base)
    L = 200
    layout = split.light.layout(L, L, 16, 16, batch=1, heads=2)
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, L, 16, generator=gen) for _ in range(3))
    sched = ac.Schedule(block_m=16, block_n=16, tile_elems=4096)
    it = items_for(layout, sched, 1, 2, split)[0]
    assert len(it.plan.chunks) > 1

    def run():
        P, PG = td._probs_forward(it, split, q, k, 0.25, torch.float32)
        return P, td._hop_forward(it, split, P, PG, v, v, 0.9, 0.1)

    native = run()
    monkeypatch.setattr(cpu_diffusion, "usable", lambda *a, **kw: False)
    plain = run()
    for a, b in zip(native, plain):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_kernels_split_rows_across_threads():
    pattern = diffuser(window=8, hops=2)
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 1, 256, 16, generator=gen) for _ in range(3))  # one head: rows split
    attn = ac.compile(pattern, backend="torch", schedule=ac.Schedule(block_m=16, block_n=16))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = attn(q, k, v)
        torch.set_num_threads(2)
        two = attn(q, k, v)
    finally:
        torch.set_num_threads(before)
    # The kernels' products are the same split by rows; the dense global rows (a torch product)
    # may sum in another order on two threads.
    torch.testing.assert_close(one, two, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(one, ac.reference(pattern, q, k, v).float(), atol=2e-5, rtol=2e-5)


def test_build_falls_back_without_a_compiler_or_when_disabled(monkeypatch, tmp_path):
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    assert cpu_build._build("cpu_diffusion") is None
    assert cpu_build.STATUS["cpu_diffusion"].startswith("build failed")
    monkeypatch.setenv("CC", "no-such-compiler-here")
    assert cpu_build._build("cpu_diffusion") is None
    assert "no C compiler" in cpu_build.STATUS["cpu_diffusion"]
    monkeypatch.setenv("ATTNC_CPU_KERNELS", "0")
    assert not cpu_build.enabled()
    assert cpu_build._build("cpu_diffusion") is None
    monkeypatch.delenv("CC")
    monkeypatch.delenv("ATTNC_CPU_KERNELS")
    lib = cpu_build._build("cpu_diffusion")  # builds into the fresh cache directory
    default = cpu_build.default_variant()
    assert lib is not None and cpu_build.STATUS["cpu_diffusion"] == f"loaded ({default})"
    assert len(list(tmp_path.glob(f"cpu_diffusion_{default}_*.so"))) == 1


def test_variants_build_apart_and_follow_the_switch(monkeypatch, tmp_path):
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpu_build, "_LIBS", {})
    monkeypatch.setattr(cpu_build, "STATUS", {})
    monkeypatch.delenv("ATTNC_CPU_KERNELS", raising=False)
    default = cpu_build.default_variant()
    lib = cpu_build.load("cpu_diffusion")
    generic = cpu_build.load("cpu_diffusion", "generic")  # explicit: the default's status is kept
    assert lib is not None and generic is not None
    assert cpu_build.STATUS["cpu_diffusion"] == f"loaded ({default})"
    assert cpu_build.status("cpu_diffusion", "generic") == "loaded (generic)"
    assert len(list(tmp_path.glob("cpu_diffusion_generic_*.so"))) == 1
    assert (generic is lib) == (default == "generic")
    monkeypatch.setenv("ATTNC_CPU_KERNELS", "generic")
    assert cpu_build.default_variant() == "generic" and cpu_build.load("cpu_diffusion") is generic
    assert cpu_diffusion._library() is generic and cpu_build.STATUS["cpu_diffusion"] == "loaded (generic)"
    monkeypatch.setenv("ATTNC_CPU_KERNELS", "0")  # takes effect at once, even after a load
    assert cpu_build.load("cpu_diffusion") is None and cpu_diffusion._library() is None
    assert cpu_build.load("cpu_diffusion", "generic") is None
    assert cpu_build.STATUS["cpu_diffusion"].startswith("disabled")
    with pytest.raises(InputError, match="neon"):
        cpu_build.load("cpu_diffusion", "neon")
    monkeypatch.setenv("ATTNC_CPU_KERNELS", "1")
    monkeypatch.setattr(cpu_build.platform, "machine", lambda: "aarch64")  # any CPU but x86-64 with AVX2
    # there the generic build is opt-in (slower than ATen's ops on x86, untimed on ARM)
    assert cpu_build.default_variant() == "generic" and cpu_build.load("cpu_diffusion") is None
    assert cpu_build.STATUS["cpu_diffusion"] == cpu_build.OPT_IN_NOTE and cpu_diffusion._library() is None
    monkeypatch.setenv("ATTNC_CPU_KERNELS", "generic")
    assert cpu_build.load("cpu_diffusion") is generic
    monkeypatch.setenv("ATTNC_CPU_KERNELS", "1")
    assert cpu_build.load("cpu_diffusion", "avx2") is None or default == "avx2"  # built before on this CPU
    monkeypatch.setattr(cpu_build, "_LIBS", {})
    assert cpu_build.load("cpu_diffusion", "avx2") is None  # never an AVX2 build where it cannot run
    assert "needs an x86-64 CPU with AVX2" in cpu_build.status("cpu_diffusion", "avx2")
