"""The two builds of the CPU kernels' vector layer (codegen/cpu/cpu_common.h): the generic build
uses no x86 intrinsic, and every lane operation of both builds has the same semantics (NaN and
signed-zero operand order of max/min, ordered and unordered compares, blends, the byte-mask
expansion, exp8 rounding to nearest), checked on random lanes against their definitions."""

from __future__ import annotations

import ctypes
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from attncompiler.codegen.cpu import build as cpu_build

CC = shutil.which("cc")
pytestmark = pytest.mark.skipif(CC is None, reason="no C compiler")
SOURCES = sorted(cpu_build.TEMPLATES.glob("*.c"))

# One row of 64 results per input row a, b (8 lanes each), bytes (8) and lim.
HARNESS = r"""
#include "cpu_common.h"

void lanes(int64_t n, const float* a, const float* b, const uint8_t* bytes, const int64_t* lim, float* out) {
    for (int64_t i = 0; i < n; i++, a += 8, b += 8, bytes += 8, out += 64) {
        vf x = vf_load(a), y = vf_load(b);
        vf_store(out, vf_max(x, y));
        vf_store(out + 8, vf_min(x, y));
        vf_store(out + 16, vf_blend(x, y, vf_eq(x, y)));
        vf_store(out + 24, vf_blend(x, y, vf_neq(x, y)));
        vf_store(out + 32, vf_keep(x, vm_or(vf_isnan(y), vm_zero())));
        int64_t k = lim[i] < 0 ? 0 : lim[i] > 8 ? 8 : lim[i];
        vf_store(out + 40, vf_keep(x, vm_andnot(vm_zero_bytes(load_bytes(bytes, (size_t)k)), vm_first(lim[i]))));
        vf_store(out + 48, exp8(x));
        out[56] = hmax8(x);
        out[57] = hsum8(x);
    }
}

void transpose(const float* m, int64_t ld, float* dst) {
    const float* rows[8];
    for (int t = 0; t < 8; t++) rows[t] = m + t * ld;
    transpose8(rows, 3, dst, 9);
}
"""


# Reads n, then the inputs of lanes() from stdin and writes its output to stdout (for a
# cross-compiled run).
DRIVER = r"""
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
void lanes(int64_t n, const float* a, const float* b, const uint8_t* bytes, const int64_t* lim, float* out);
int main(void) {
    int64_t n;
    if (fread(&n, 8, 1, stdin) != 1) return 1;
    float *a = malloc(32 * n), *b = malloc(32 * n), *out = malloc(256 * n);
    uint8_t* bytes = malloc(8 * n);
    int64_t* lim = malloc(8 * n);
    if (fread(a, 32, n, stdin) != (size_t)n || fread(b, 32, n, stdin) != (size_t)n ||
        fread(bytes, 8, n, stdin) != (size_t)n || fread(lim, 8, n, stdin) != (size_t)n) return 1;
    lanes(n, a, b, bytes, lim, out);
    return fwrite(out, 256, n, stdout) == (size_t)n ? 0 : 1;
}
"""


def _compile(tmp_path: Path, variant: str) -> ctypes.CDLL:
    src = tmp_path / "harness.c"
    src.write_text(HARNESS)
    lib = tmp_path / f"harness_{variant}.so"
    subprocess.run([*cpu_build.compile_command(CC, variant), "-o", str(lib), str(src), "-lm"], check=True,
                   capture_output=True)
    return ctypes.CDLL(str(lib))


def _preprocessed(variant: str, source: Path) -> str:
    res = subprocess.run([*cpu_build.compile_command(CC, variant), "-E", str(source)], capture_output=True,
                         text=True, check=True)
    return res.stdout


@pytest.mark.parametrize("source", SOURCES, ids=[s.name for s in SOURCES])
def test_generic_build_uses_no_x86_intrinsics(source):
    generic = _preprocessed("generic", source)
    for word in ("immintrin", "_mm256", "__m256", "_mm_"):
        assert word not in generic, f"{source.name} uses {word} in the generic build"
    assert "vector_size" in generic
    if cpu_build.default_variant() == "avx2":  # the same grep finds them in the AVX2 build
        assert "immintrin" in _preprocessed("avx2", source)


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.int32)


def _same_values(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Equal bits, except that any NaN equals any NaN (an add's NaN payload and sign depend on the
    operand order, which the compiler may commute)."""
    nan = x.isnan()
    return torch.equal(nan, y.isnan()) and torch.equal(_bits(x[~nan]), _bits(y[~nan]))


def _inputs(n: int):
    g = torch.Generator().manual_seed(11)
    special = torch.tensor([math.nan, -math.nan, math.inf, -math.inf, 0.0, -0.0, 1.0, -1.0, 88.5, -90.0])
    a = torch.randn(n, 8, generator=g) * 30
    b = torch.randn(n, 8, generator=g) * 30
    for x in (a, b):  # a third of the lanes special values, and equal lanes (ties, +0 against -0)
        pick = torch.rand(n, 8, generator=g) < 0.33
        x[pick] = special[torch.randint(0, len(special), (int(pick.sum()),), generator=g)]
    same = torch.rand(n, 8, generator=g) < 0.1
    b[same] = a[same]
    zeros = torch.rand(n, 8, generator=g) < 0.05
    a[zeros], b[zeros] = 0.0, -0.0
    bytes_ = (torch.randint(0, 4, (n, 8), generator=g) * (torch.rand(n, 8, generator=g) < 0.6)).to(torch.uint8)
    lim = torch.randint(-2, 11, (n,), generator=g)
    return a, b, bytes_, lim


def _run(lib, a, b, bytes_, lim):
    out = torch.zeros(a.shape[0], 64)
    lib.lanes.argtypes = [ctypes.c_int64] + [ctypes.c_void_p] * 5
    lib.lanes(a.shape[0], a.data_ptr(), b.data_ptr(), bytes_.data_ptr(), lim.data_ptr(), out.data_ptr())
    return out


@pytest.mark.parametrize("variant", ["generic", "avx2"])
def test_lane_semantics(tmp_path, variant):
    if variant == "avx2" and cpu_build.default_variant() != "avx2":
        pytest.skip("no AVX2 on this CPU")
    lib = _compile(tmp_path, variant)
    a, b, bytes_, lim = _inputs(4000)
    _check_lanes(_run(lib, a, b, bytes_, lim), a, b, bytes_, lim)
    m8 = torch.randn(8, 13)
    dst = torch.full((8, 9), -1.0)
    lib.transpose.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
    lib.transpose(m8.data_ptr(), 13, dst.data_ptr())
    assert torch.equal(dst[:, :8], m8[:, 3:11].T) and (dst[:, 8] == -1).all()


AARCH64_CC, QEMU = shutil.which("aarch64-linux-gnu-gcc"), shutil.which("qemu-aarch64")


@pytest.mark.skipif(AARCH64_CC is None or QEMU is None, reason="no aarch64 cross compiler and qemu-aarch64 here")
def test_lane_semantics_on_aarch64_neon(tmp_path):
    """The generic build as aarch64 compiles it (NEON, fused multiply-adds), run under qemu."""
    (tmp_path / "harness.c").write_text(HARNESS)
    (tmp_path / "driver.c").write_text(DRIVER)
    flags = [f for f in cpu_build.VARIANTS["generic"] if f not in ("-shared", "-fPIC")]
    exe = tmp_path / "lanes"
    subprocess.run([AARCH64_CC, *flags, "-static", "-I", str(cpu_build.TEMPLATES), "-o", str(exe),
                    str(tmp_path / "harness.c"), str(tmp_path / "driver.c"), "-lm"], check=True, capture_output=True)
    assert "fmla" in subprocess.run(["aarch64-linux-gnu-objdump", "-d", str(exe)], capture_output=True,
                                    text=True).stdout  # NEON fused multiply-adds
    a, b, bytes_, lim = _inputs(4000)
    feed = b"".join(x.contiguous().numpy().tobytes() for x in (torch.tensor([a.shape[0]]), a, b, bytes_, lim))
    res = subprocess.run([QEMU, str(exe)], input=feed, capture_output=True, check=True)
    out = torch.frombuffer(bytearray(res.stdout), dtype=torch.float32).view(a.shape[0], 64)
    _check_lanes(out, a, b, bytes_, lim)


def _check_lanes(out, a, b, bytes_, lim):
    """The lane results of the harness against the AVX definitions."""
    t = torch.arange(8)
    visible = (t[None, :] < lim[:, None]) & (bytes_ != 0)
    want = {  # the AVX definitions, bit for bit
        0: torch.where(a > b, a, b),  # max: b when either is NaN (and for +0 against -0)
        8: torch.where(a < b, a, b),
        16: torch.where(a == b, b, a),  # ordered equal
        24: torch.where(a != b, b, a),  # unordered not-equal: NaN lanes take b
        32: torch.where(b.isnan(), a, torch.zeros_like(a)),
        40: torch.where(visible, a, torch.zeros_like(a)),
    }
    for at, w in want.items():
        assert torch.equal(_bits(out[:, at:at + 8]), _bits(w)), f"lanes {at}..{at + 7}"

    def mx(x, y):
        return torch.where(x > y, x, y)

    m = mx(a[:, :4], a[:, 4:])
    assert torch.equal(_bits(out[:, 56]), _bits(mx(mx(m[:, 0], m[:, 2]), mx(m[:, 1], m[:, 3]))))
    s = a[:, :4] + a[:, 4:]
    assert _same_values(out[:, 57], (s[:, 0] + s[:, 2]) + (s[:, 1] + s[:, 3]))

    e = out[:, 48:56]
    assert torch.equal(e[a.isnan()].isnan(), torch.ones(int(a.isnan().sum()), dtype=torch.bool))
    assert torch.equal(e[a == -math.inf], torch.zeros(int((a == -math.inf).sum())))
    finite = a.isfinite()
    x = a[finite].double().clamp(-87.0, 88.0)  # the clamps of exp8
    rel = ((e[finite].double() - x.exp()) / x.exp()).abs()
    assert float(rel.max()) < 5e-7  # nearest rounding: |r| <= ln2 / 2 keeps the polynomial at ~2e-7


def test_builds_agree_on_exp8(tmp_path):
    if cpu_build.default_variant() != "avx2":
        pytest.skip("no AVX2 on this CPU")
    a, b, bytes_, lim = _inputs(4000)
    got = [_run(_compile(tmp_path, v), a, b, bytes_, lim) for v in ("generic", "avx2")]
    torch.testing.assert_close(got[0][:, 48:56], got[1][:, 48:56], rtol=3e-7, atol=0, equal_nan=True)
    assert torch.equal(_bits(got[0][:, :48]), _bits(got[1][:, :48]))
    assert torch.equal(_bits(got[0][:, 56]), _bits(got[1][:, 56])) and _same_values(got[0][:, 57], got[1][:, 57])


# Runs attn_fwd, then attn_bwd on one thread, on tensors and tables read from stdin (each array as
# its byte length and bytes, in the order below); writes out, lse, dq, dk, dv to stdout.
ATTN_DRIVER = r"""
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include "cpu_attention.h"
static void* blob(void) {
    int64_t n;
    if (fread(&n, 8, 1, stdin) != 1) exit(2);
    void* p = malloc(n > 0 ? n : 1);
    if (n > 0 && fread(p, 1, n, stdin) != (size_t)n) exit(3);
    return p;
}
int main(void) {
    Args a = {0};
    int64_t* s = blob();  /* B H Hkv Lq Lk D Dv bm bn nqb nkb nops q_pos0 */
    a.B = s[0], a.H = s[1], a.Hkv = s[2], a.Lq = s[3], a.Lk = s[4], a.D = s[5], a.Dv = s[6];
    a.bm = s[7], a.bn = s[8], a.nqb = s[9], a.nkb = s[10], a.nops = s[11], a.q_pos0 = s[12];
    a.scale = *(double*)blob();
    a.q = blob(), a.k = blob(), a.v = blob(), a.dout = blob();
    const int64_t** idx[] = {&a.range_ptr, &a.range_start, &a.range_end, &a.part_ptr, &a.part_cols, &a.part_mask,
                             &a.col_range_ptr, &a.row_start, &a.row_end, &a.col_part_ptr, &a.col_part_rows,
                             &a.col_part_mask};
    for (int i = 0; i < 12; i++) *idx[i] = blob();
    a.masks = blob(), a.masks_t = blob(), a.op_kind = blob(), a.op_param = blob(), a.slopes = blob();
    int64_t rows = a.B * a.H * a.Lq, kv = a.B * a.Hkv * a.Lk;
    float *out = calloc(rows * a.Dv + 1, 4), *lse = calloc(rows + 1, 4), *delta = calloc(rows + 1, 4);
    float *dq = calloc(rows * a.D + 1, 4), *dk = calloc(kv * a.D + 1, 4), *dv = calloc(kv * a.Dv + 1, 4);
    a.out = out, a.lse = lse;
    int64_t counter = 0;
    if (attn_fwd(&a, &counter)) return 4;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t d = 0; d < a.Dv; d++) delta[r] += a.dout[r * a.Dv + d] * out[r * a.Dv + d];
    a.lse_in = lse, a.delta = delta, a.dq = dq, a.dk = dk, a.dv = dv;
    counter = 0;
    if (attn_bwd(&a, &counter, dq, 0, a.B * a.Hkv)) return 5;
    fwrite(out, 4, rows * a.Dv, stdout), fwrite(lse, 4, rows, stdout), fwrite(dq, 4, rows * a.D, stdout);
    fwrite(dk, 4, kv * a.D, stdout), fwrite(dv, 4, kv * a.Dv, stdout);
    return 0;
}
"""


@pytest.mark.skipif(AARCH64_CC is None or QEMU is None, reason="no aarch64 cross compiler and qemu-aarch64 here")
@pytest.mark.parametrize("kind, logit, ops", [("random", 300.0, ()), ("causal", 1000.0, (("softcap", 30.0),)),
                                              ("window", 100.0, (("alibi", 0.0),))])
def test_attention_kernels_on_aarch64_neon(tmp_path, kind, logit, ops):
    """cpu_attention.c as aarch64 compiles it (generic build), forward and backward under qemu,
    against the float64 reference, with large logits, odd lengths, ragged blocks and GQA."""
    from test_cpu_attention_kernel import make_mask, reference, tables_from_dense

    from attncompiler.codegen.cpu import attention as cpu_attn

    (tmp_path / "driver.c").write_text(ATTN_DRIVER)
    flags = [f for f in cpu_build.VARIANTS["generic"] if f not in ("-shared", "-fPIC")]
    exe = tmp_path / "attn"
    subprocess.run([AARCH64_CC, *flags, "-static", "-I", str(cpu_build.TEMPLATES), "-o", str(exe),
                    str(cpu_build.TEMPLATES / "cpu_attention.c"), str(tmp_path / "driver.c"), "-lm"], check=True,
                   capture_output=True)
    B, H, Hkv, Lq, Lk, D, Dv, bm, bn = 1, 4, 2, 45, 61, 20, 12, 16, 8
    g = torch.Generator().manual_seed(int(logit))
    scale = 0.25
    r = max(1, round(math.sqrt(3 * logit / (scale * math.sqrt(D)))))  # integer q, k: exact float32 scores
    q = torch.randint(-r, r + 1, (B, H, Lq, D), generator=g).float()
    k = torch.randint(-r, r + 1, (B, Hkv, Lk, D), generator=g).float()
    v, dout = torch.randn(B, Hkv, Lk, Dv, generator=g), torch.randn(B, H, Lq, Dv, generator=g)
    mask = make_mask(kind, Lq, Lk, g)
    slopes = torch.rand(H, generator=g) * 2
    mods = cpu_attn.ScoreMods(ops, slopes, q_pos0=Lk - Lq)
    tables = tables_from_dense(mask, bm, bn, 1)
    p = cpu_attn._prepared(tables)
    kinds, params, _, nops = cpu_attn._mods(mods, H)
    qp, kp, vp, dp = (cpu_attn._pad8(x) for x in (q, k, v, dout))
    sizes = torch.tensor([B, H, Hkv, Lq, Lk, qp.shape[3], vp.shape[3], bm, bn, tables.nqb, tables.nkb, nops,
                          Lk - Lq])
    arrays = [sizes, torch.tensor([scale], dtype=torch.float64), qp, kp, vp, dp,
              *(p[f] for f in cpu_attn._INDEX_FIELDS), p["masks"], p["masks_t"], kinds, params, slopes]
    feed = b"".join(int(x.numel() * x.element_size()).to_bytes(8, "little") + x.contiguous().numpy().tobytes()
                    for x in arrays)
    res = subprocess.run([QEMU, str(exe)], input=feed, capture_output=True, check=True)
    flat = torch.frombuffer(bytearray(res.stdout), dtype=torch.float32)
    shapes = [(B, H, Lq, vp.shape[3]), (B, H, Lq), (B, H, Lq, qp.shape[3]), (B, Hkv, Lk, kp.shape[3]),
              (B, Hkv, Lk, vp.shape[3])]
    got, at = [], 0
    for shape in shapes:
        n = math.prod(shape)
        got.append(flat[at:at + n].view(shape))
        at += n
    assert at == flat.numel()
    out, lse, dq, dk, dv = got[0][..., :Dv], got[1], got[2][..., :D], got[3][..., :D], got[4][..., :Dv]
    qd, kd, vd = (x.double().requires_grad_() for x in (q, k, v))
    ro, rl = reference(qd, kd, vd, mask, scale, mods)
    want = torch.autograd.grad(ro, (qd, kd, vd), dout.double())

    def close(x, y, rtol):
        torch.testing.assert_close(x.double(), y.double(), rtol=rtol, atol=rtol * max(1.0, float(y.abs().max())))

    close(out, ro.detach(), 1e-4)
    empty = ~mask.any(-1)
    assert (lse[..., empty] == -math.inf).all()
    close(lse[..., ~empty], rl.detach()[..., ~empty], 1e-4)
    for x, y in zip((dq, dk, dv), want):
        close(x, y, 1e-3)
