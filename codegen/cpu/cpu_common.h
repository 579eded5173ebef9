/* 8-lane float32 vectors for the CPU kernels: one small API, two implementations.
 *
 *   AVX2 + FMA (x86-64 built with -mavx2 -mfma): intrinsics.
 *   generic (any other build): GCC/Clang vector extensions, which the compiler lowers to NEON on
 *   aarch64 and SSE2 on x86-64; built with -ffp-contract=fast so that a * b + c is one fused
 *   multiply-add where the hardware has one (rounding may then differ from AVX2 by an ulp).
 *
 * Both give the same lane semantics: vf_max(a, b) = a > b ? a : b and vf_min(a, b) = a < b ? a : b
 * (the AVX operand-order rule: b when either is NaN), vf_eq is ordered (false on NaN), vf_neq and
 * vf_isnan unordered (true on NaN), masks are all bits set or clear, vf_blend(a, b, m) = m ? b : a
 * (as _mm256_blendv_ps), vf_keep(x, m) = m ? x : +0, and exp8 rounds to nearest. The kernels use
 * only these names, never x86 intrinsics.
 */
#ifndef ATTNC_CPU_COMMON_H
#define ATTNC_CPU_COMMON_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define VF_INLINE static inline __attribute__((always_inline))

/* bytes p[0..n) (n <= 8) as a word whose byte t (from the least significant) is p[t], 0 above n */
static inline uint64_t load_bytes(const uint8_t* p, size_t n) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    uint64_t w = 0;
    memcpy(&w, p, n);
    return w;
#else
    uint64_t w = 0;
    for (size_t t = 0; t < n; t++) w |= (uint64_t)p[t] << (8 * t);
    return w;
#endif
}

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

typedef __m256 vf; /* 8 floats */
typedef __m256 vm; /* 8 lane masks */

VF_INLINE vf vf_load(const float* p) { return _mm256_loadu_ps(p); }
VF_INLINE vf vf_load_a(const float* p) { return _mm256_load_ps(p); } /* p 32-byte aligned */
VF_INLINE void vf_store(float* p, vf x) { _mm256_storeu_ps(p, x); }
VF_INLINE void vf_store_a(float* p, vf x) { _mm256_store_ps(p, x); } /* p 32-byte aligned */
VF_INLINE vf vf_set1(float x) { return _mm256_set1_ps(x); }
VF_INLINE vf vf_bcast(const float* p) { return _mm256_broadcast_ss(p); }
VF_INLINE vf vf_zero(void) { return _mm256_setzero_ps(); }
VF_INLINE vf vf_iota(void) { return _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7); }
VF_INLINE vf vf_add(vf a, vf b) { return _mm256_add_ps(a, b); }
VF_INLINE vf vf_sub(vf a, vf b) { return _mm256_sub_ps(a, b); }
VF_INLINE vf vf_mul(vf a, vf b) { return _mm256_mul_ps(a, b); }
VF_INLINE vf vf_div(vf a, vf b) { return _mm256_div_ps(a, b); }
/* 1 / y for finite y with |y| in [2^-126, 2^126]: the 12-bit estimate and one Newton step
 * (relative error about 2^-22), without the divider */
VF_INLINE vf vf_recip(vf y) {
    __m256 r = _mm256_rcp_ps(y);
    return _mm256_mul_ps(r, _mm256_fnmadd_ps(y, r, _mm256_set1_ps(2.0f)));
}
VF_INLINE vf vf_fma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }   /* a b + c */
VF_INLINE vf vf_fnma(vf a, vf b, vf c) { return _mm256_fnmadd_ps(a, b, c); } /* c - a b */
VF_INLINE vf vf_max(vf a, vf b) { return _mm256_max_ps(a, b); }
VF_INLINE vf vf_min(vf a, vf b) { return _mm256_min_ps(a, b); }
VF_INLINE vm vf_eq(vf a, vf b) { return _mm256_cmp_ps(a, b, _CMP_EQ_OQ); }
VF_INLINE vm vf_neq(vf a, vf b) { return _mm256_cmp_ps(a, b, _CMP_NEQ_UQ); }
VF_INLINE vm vf_isnan(vf a) { return _mm256_cmp_ps(a, a, _CMP_UNORD_Q); }
VF_INLINE vf vf_blend(vf a, vf b, vm m) { return _mm256_blendv_ps(a, b, m); }
VF_INLINE vf vf_keep(vf x, vm m) { return _mm256_and_ps(x, m); }
VF_INLINE vm vm_zero(void) { return _mm256_setzero_ps(); }
VF_INLINE vm vm_or(vm a, vm b) { return _mm256_or_ps(a, b); }
VF_INLINE vm vm_andnot(vm a, vm b) { return _mm256_andnot_ps(a, b); } /* ~a & b */

/* Lanes t < n (n clamped to 0..8). */
VF_INLINE vm vm_first(int64_t n) {
    int k = (int)(n < 8 ? (n < 0 ? 0 : n) : 8);
    return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(k), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
}

/* Lanes t whose byte t of w (from the least significant, see load_bytes) is 0. */
VF_INLINE vm vm_zero_bytes(uint64_t w) {
    __m256i b = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)w));
    return _mm256_castsi256_ps(_mm256_cmpeq_epi32(b, _mm256_setzero_si256()));
}

/* x log2(e) rounded to the nearest integer (ties to even), for exp8 */
VF_INLINE vf vf_exp_n(vf x) {
    return _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                           _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
/* 2^n for integral n in [-126, 127] */
VF_INLINE vf vf_pow2i(vf n) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}

static inline float hmax8(vf v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
}

static inline float hsum8(vf v) {
    __m128 m = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_add_ps(m, _mm_movehl_ps(m, m));
    m = _mm_add_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
}

/* dst[i * ld + t] = rows[t][d0 + i] for an 8 x 8 block (any alignment). */
static inline void transpose8(const float* const* rows, int64_t d0, float* dst, int64_t ld) {
    __m256 r0 = _mm256_loadu_ps(rows[0] + d0), r1 = _mm256_loadu_ps(rows[1] + d0);
    __m256 r2 = _mm256_loadu_ps(rows[2] + d0), r3 = _mm256_loadu_ps(rows[3] + d0);
    __m256 r4 = _mm256_loadu_ps(rows[4] + d0), r5 = _mm256_loadu_ps(rows[5] + d0);
    __m256 r6 = _mm256_loadu_ps(rows[6] + d0), r7 = _mm256_loadu_ps(rows[7] + d0);
    __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
    __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
    __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
    __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
    __m256 u0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0)), u1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
    __m256 u2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0)), u3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
    __m256 u4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0)), u5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2));
    __m256 u6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0)), u7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
    _mm256_storeu_ps(dst, _mm256_permute2f128_ps(u0, u4, 0x20));
    _mm256_storeu_ps(dst + ld, _mm256_permute2f128_ps(u1, u5, 0x20));
    _mm256_storeu_ps(dst + 2 * ld, _mm256_permute2f128_ps(u2, u6, 0x20));
    _mm256_storeu_ps(dst + 3 * ld, _mm256_permute2f128_ps(u3, u7, 0x20));
    _mm256_storeu_ps(dst + 4 * ld, _mm256_permute2f128_ps(u0, u4, 0x31));
    _mm256_storeu_ps(dst + 5 * ld, _mm256_permute2f128_ps(u1, u5, 0x31));
    _mm256_storeu_ps(dst + 6 * ld, _mm256_permute2f128_ps(u2, u6, 0x31));
    _mm256_storeu_ps(dst + 7 * ld, _mm256_permute2f128_ps(u3, u7, 0x31));
}

#else /* generic: GCC/Clang vector extensions, no target intrinsics */

/* Two halves of 4 lanes: every target with SIMD has 128-bit registers (NEON, SSE2), so each
 * operation, compares included, maps to one instruction per half (a 256-bit vector type would
 * make GCC split the compares into scalar code where the target has no 256-bit registers). */
typedef float v4f __attribute__((vector_size(16)));
typedef int32_t v4i __attribute__((vector_size(16)));
typedef float v4f_u __attribute__((vector_size(16), aligned(4), may_alias)); /* unaligned access */
typedef struct { v4f lo, hi; } vf;
typedef struct { v4i lo, hi; } vm; /* a compare's lanes: -1 true, 0 false */

#define VF_MAP(a, b, op) ((vf){(a).lo op (b).lo, (a).hi op (b).hi})
#define VM_CMP(a, b, op) ((vm){(a).lo op (b).lo, (a).hi op (b).hi})

VF_INLINE vf vf_load(const float* p) { return (vf){*(const v4f_u*)p, *(const v4f_u*)(p + 4)}; }
VF_INLINE vf vf_load_a(const float* p) { return vf_load(p); }
VF_INLINE void vf_store(float* p, vf x) { *(v4f_u*)p = x.lo; *(v4f_u*)(p + 4) = x.hi; }
VF_INLINE void vf_store_a(float* p, vf x) { vf_store(p, x); }
VF_INLINE vf vf_set1(float x) { v4f h = {x, x, x, x}; return (vf){h, h}; }
VF_INLINE vf vf_bcast(const float* p) { return vf_set1(*p); }
VF_INLINE vf vf_zero(void) { return vf_set1(0.0f); }
VF_INLINE vf vf_iota(void) { return (vf){{0, 1, 2, 3}, {4, 5, 6, 7}}; }
VF_INLINE vf vf_add(vf a, vf b) { return VF_MAP(a, b, +); }
VF_INLINE vf vf_sub(vf a, vf b) { return VF_MAP(a, b, -); }
VF_INLINE vf vf_mul(vf a, vf b) { return VF_MAP(a, b, *); }
VF_INLINE vf vf_div(vf a, vf b) { return VF_MAP(a, b, /); }
VF_INLINE vf vf_recip(vf y) { return vf_div(vf_set1(1.0f), y); }
/* fused into one multiply-add under -ffp-contract=fast where the target has one */
VF_INLINE vf vf_fma(vf a, vf b, vf c) { return (vf){a.lo * b.lo + c.lo, a.hi * b.hi + c.hi}; }
VF_INLINE vf vf_fnma(vf a, vf b, vf c) { return (vf){c.lo - a.lo * b.lo, c.hi - a.hi * b.hi}; }
VF_INLINE v4f blend4(v4f a, v4f b, v4i m) { return (v4f)(((v4i)a & ~m) | ((v4i)b & m)); }
VF_INLINE vf vf_blend(vf a, vf b, vm m) { return (vf){blend4(a.lo, b.lo, m.lo), blend4(a.hi, b.hi, m.hi)}; }
VF_INLINE vf vf_keep(vf x, vm m) { return (vf){(v4f)((v4i)x.lo & m.lo), (v4f)((v4i)x.hi & m.hi)}; }
VF_INLINE vm vf_gt(vf a, vf b) { return VM_CMP(a, b, >); }
VF_INLINE vm vf_lt(vf a, vf b) { return VM_CMP(a, b, <); }
VF_INLINE vf vf_max(vf a, vf b) { return vf_blend(b, a, vf_gt(a, b)); }
VF_INLINE vf vf_min(vf a, vf b) { return vf_blend(b, a, vf_lt(a, b)); }
VF_INLINE vm vf_eq(vf a, vf b) { return VM_CMP(a, b, ==); }
VF_INLINE vm vf_neq(vf a, vf b) { return VM_CMP(a, b, !=); }
VF_INLINE vm vf_isnan(vf a) { return VM_CMP(a, a, !=); }
VF_INLINE vm vm_zero(void) { v4i z = {0, 0, 0, 0}; return (vm){z, z}; }
VF_INLINE vm vm_or(vm a, vm b) { return VM_CMP(a, b, |); }
VF_INLINE vm vm_andnot(vm a, vm b) { return (vm){~a.lo & b.lo, ~a.hi & b.hi}; }

/* Lanes t < n (n clamped to 0..8). */
VF_INLINE vm vm_first(int64_t n) {
    int32_t k = (int32_t)(n < 8 ? (n < 0 ? 0 : n) : 8);
    v4i kk = {k, k, k, k};
    return (vm){kk > (v4i){0, 1, 2, 3}, kk > (v4i){4, 5, 6, 7}};
}

/* Lanes t whose byte t of w (from the least significant, see load_bytes) is 0. */
VF_INLINE vm vm_zero_bytes(uint64_t w) {
    v4i lo = {(int32_t)(w & 255), (int32_t)(w >> 8 & 255), (int32_t)(w >> 16 & 255), (int32_t)(w >> 24 & 255)};
    v4i hi = {(int32_t)(w >> 32 & 255), (int32_t)(w >> 40 & 255), (int32_t)(w >> 48 & 255), (int32_t)(w >> 56)};
    v4i z = {0, 0, 0, 0};
    return (vm){lo == z, hi == z};
}

/* 2^n for integral n in [-126, 127] (NaN lanes set to 0 first: converting NaN is undefined in C;
 * their result is NaN anyway, from the polynomial). */
VF_INLINE v4f pow2_4(v4f n) {
    v4f n0 = (v4f)((v4i)n & (n == n));
    return (v4f)((__builtin_convertvector(n0, v4i) + 127) << 23);
}

/* x log2(e) rounded to nearest (even) by adding and subtracting 1.5 * 2^23 (exact for
 * |x log2(e)| < 2^22; under -ffp-contract the product may be fused into the add, which only moves
 * a tie by an ulp and keeps |r| <= ln2 / 2 + ulp in exp8) */
VF_INLINE vf vf_exp_n(vf x) {
    const vf big = vf_set1(12582912.0f);
    return vf_sub(vf_fma(x, vf_set1(1.44269504088896341f), big), big);
}
VF_INLINE vf vf_pow2i(vf n) { return (vf){pow2_4(n.lo), pow2_4(n.hi)}; }

static inline float max1(float a, float b) { return a > b ? a : b; }

/* The AVX2 reduction order: halves, then pairs, then the last two lanes. */
static inline float hmax8(vf v) {
    float m0 = max1(v.lo[0], v.hi[0]), m1 = max1(v.lo[1], v.hi[1]);
    float m2 = max1(v.lo[2], v.hi[2]), m3 = max1(v.lo[3], v.hi[3]);
    return max1(max1(m0, m2), max1(m1, m3));
}

static inline float hsum8(vf v) {
    v4f s = v.lo + v.hi;
    return (s[0] + s[2]) + (s[1] + s[3]);
}

/* dst[i * ld + t] = rows[t][d0 + i] for an 8 x 8 block (any alignment). */
static inline void transpose8(const float* const* rows, int64_t d0, float* dst, int64_t ld) {
    for (int i = 0; i < 8; i++)
        for (int t = 0; t < 8; t++) dst[i * ld + t] = rows[t][d0 + i];
}

#endif

/* e^x for 8 floats: 2^n * p(r), x = n ln2 + r, |r| <= ln2 / 2, degree-6 Taylor polynomial
 * (relative error about 2e-7); -inf gives exactly 0 and NaN gives NaN (the clamps take the
 * operand order that returns a NaN input, the -inf test is an unordered compare). */
VF_INLINE vf exp8(vf x) {
    vm keep = vf_neq(x, vf_set1(-INFINITY));
    /* max/min return their second operand when either is NaN */
    x = vf_min(vf_set1(88.0f), vf_max(vf_set1(-87.0f), x));
    vf n = vf_exp_n(x);
    vf r = vf_fnma(n, vf_set1(0.693359375f), x);  /* ln2 in two parts */
    r = vf_fnma(n, vf_set1(-2.12194440e-4f), r);
    vf p = vf_set1(1.0f / 720);
    p = vf_fma(p, r, vf_set1(1.0f / 120));
    p = vf_fma(p, r, vf_set1(1.0f / 24));
    p = vf_fma(p, r, vf_set1(1.0f / 6));
    p = vf_fma(p, r, vf_set1(0.5f));
    p = vf_fma(p, r, vf_set1(1.0f));
    p = vf_fma(p, r, vf_set1(1.0f));
    return vf_keep(vf_mul(p, vf_pow2i(n)), keep);
}

/* Softmax of one score row in place, s[0..len) (len % 8 == 0; entries that are not keys hold
 * -inf): a NaN score turns the whole row NaN (never a plausible row), a row with no visible key
 * (all -inf) becomes zeros. */
static inline void softmax_row_inplace(float* s, int64_t len) {
    vf vmx = vf_set1(-INFINITY);
    vm nan = vm_zero();
    for (int64_t t = 0; t < len; t += 8) {
        vf x = vf_load(s + t);
        vmx = vf_max(x, vmx);  /* skips NaN; the NaN lanes are tracked apart */
        nan = vm_or(nan, vf_isnan(x));
    }
    float mx = hsum8(vf_keep(vf_set1(1.0f), nan)) > 0.0f ? NAN : hmax8(vmx);
    if (mx == -INFINITY) {
        memset(s, 0, sizeof(float) * (size_t)len);
        return;
    }
    vf vmax = vf_set1(mx), sum = vf_zero();
    for (int64_t t = 0; t < len; t += 8) {
        vf e = exp8(vf_sub(vf_load(s + t), vmax));
        vf_store(s + t, e);
        sum = vf_add(sum, e);
    }
    vf inv = vf_set1(1.0f / hsum8(sum));
    for (int64_t t = 0; t < len; t += 8) vf_store(s + t, vf_mul(vf_load(s + t), inv));
}

#endif
