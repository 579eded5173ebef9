/* CPU kernels (x86-64, AVX2 + FMA) of the stored-P diffusion stages, float32.
 *
 * Both work on one chunk of the torch stages' plan (codegen/torch_diffusion_plan.py): query
 * blocks r = r0..r1-1 of the chunk, each with a [BM, W] tile of P whose columns are W keys:
 * nbk band keys from row band_start[r], then nr "rest" keys (other blocks, global keys) at rows
 * rest_idx[r * nr + j]. Those are rows of the plan's padded numbering; row p is row p - shift of
 * the key (or z) array itself, and rows outside [0, nrows) read as zeros, so the arrays are used
 * as they are, without padded copies. Every product is a 4-row x 16-column register tile
 * accumulated over the keys, read in place (no gathered copies, no temporaries in memory).
 *
 *   probs_f32: tile[r] = row-softmax(scale * q_r k^T + mask[r]), rows without a key give zeros.
 *   hop_f32:   out[r]  = gamma * v_r + beta * tile[r] @ z   (the axpby fused into the product).
 *
 * Needs BM % 4 == 0 (both) and Dv % 16 == 0 (hop); the caller checks.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* e^x for 8 floats: 2^n * p(r), x = n ln2 + r, |r| <= ln2 / 2, degree-6 Taylor polynomial
 * (relative error about 2e-7); -inf gives exactly 0. */
static inline __m256 exp8(__m256 x) {
    __m256 keep = _mm256_cmp_ps(x, _mm256_set1_ps(-INFINITY), _CMP_NEQ_OQ);
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  /* ln2 in two parts */
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.0f / 720);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), keep);
}

static inline float hmax8(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
}

static inline float hsum8(__m256 v) {
    __m128 m = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_add_ps(m, _mm_movehl_ps(m, m));
    m = _mm_add_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
}

/* Row j of query block r's keys in array x (D floats a row), or `zero` outside the array. */
static inline const float* key_row(const float* x, int64_t D, int64_t j, int64_t r, int64_t nbk, int64_t nr,
                                   const int64_t* band_start, const int64_t* rest_idx, int64_t shift,
                                   int64_t nrows, const float* zero) {
    int64_t p = (j < nbk ? band_start[r] + j : rest_idx[r * nr + j - nbk]) - shift;
    return p >= 0 && p < nrows ? x + p * D : zero;
}

/* dst[i * ld + t] = rows[t][d0 + i] for an 8 x 8 block (dst 32-byte aligned). */
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
    _mm256_store_ps(dst, _mm256_permute2f128_ps(u0, u4, 0x20));
    _mm256_store_ps(dst + ld, _mm256_permute2f128_ps(u1, u5, 0x20));
    _mm256_store_ps(dst + 2 * ld, _mm256_permute2f128_ps(u2, u6, 0x20));
    _mm256_store_ps(dst + 3 * ld, _mm256_permute2f128_ps(u3, u7, 0x20));
    _mm256_store_ps(dst + 4 * ld, _mm256_permute2f128_ps(u0, u4, 0x31));
    _mm256_store_ps(dst + 5 * ld, _mm256_permute2f128_ps(u1, u5, 0x31));
    _mm256_store_ps(dst + 6 * ld, _mm256_permute2f128_ps(u2, u6, 0x31));
    _mm256_store_ps(dst + 7 * ld, _mm256_permute2f128_ps(u3, u7, 0x31));
}

/* Softmax of one score row s[0..Wp) (entries W..Wp are padding) into out[0..W). */
static void softmax_row(float* s, float* out, int64_t W, int64_t Wp) {
    for (int64_t j = W; j < Wp; j++) s[j] = -INFINITY;
    __m256 mx = _mm256_set1_ps(-INFINITY);
    for (int64_t j = 0; j < Wp; j += 8) mx = _mm256_max_ps(mx, _mm256_load_ps(s + j));
    float m = hmax8(mx);
    if (m == -INFINITY) {  /* no visible key: a zero row, not NaN */
        memset(out, 0, sizeof(float) * W);
        return;
    }
    __m256 vm = _mm256_set1_ps(m), acc = _mm256_setzero_ps();
    for (int64_t j = 0; j < Wp; j += 8) {
        __m256 e = exp8(_mm256_sub_ps(_mm256_load_ps(s + j), vm));
        _mm256_store_ps(s + j, e);
        acc = _mm256_add_ps(acc, e);
    }
    float inv = 1.0f / hsum8(acc);
    __m256 vi = _mm256_set1_ps(inv);
    int64_t j = 0;
    for (; j + 8 <= W; j += 8) _mm256_storeu_ps(out + j, _mm256_mul_ps(_mm256_load_ps(s + j), vi));
    for (; j < W; j++) out[j] = s[j] * inv;
}

int probs_f32(float* tile, int64_t BM, int64_t W, int64_t nbk, int64_t nr, int64_t D,
              const int64_t* band_start, const int64_t* rest_idx, int64_t shift, int64_t nrows,
              const float* k, const float* q, const int64_t* qrow, float scale,
              const int64_t* patch_of_row, const float* patch, int64_t r0, int64_t r1)
{
    int64_t Wp = (W + 15) / 16 * 16;
    float* KT = aligned_alloc(32, sizeof(float) * D * Wp);  /* the row's keys, transposed */
    float* S = aligned_alloc(32, sizeof(float) * 4 * Wp);   /* scores of 4 query rows */
    float* zero = calloc(D, sizeof(float));
    if (!KT || !S || !zero) {
        free(KT);
        free(S);
        free(zero);
        return 1;
    }
    const __m256 sc = _mm256_set1_ps(scale);
    for (int64_t r = r0; r < r1; r++) {
        int64_t j = 0;
        if (D % 8 == 0) {  /* 8 keys x 8 dims at a time, transposed in registers */
            const float* kr8[8];
            for (; j + 8 <= W; j += 8) {
                for (int t = 0; t < 8; t++) kr8[t] = key_row(k, D, j + t, r, nbk, nr, band_start, rest_idx, shift, nrows, zero);
                for (int64_t d0 = 0; d0 < D; d0 += 8) transpose8(kr8, d0, KT + d0 * Wp + j, Wp);
            }
        }
        for (; j < W; j++) {
            const float* kr = key_row(k, D, j, r, nbk, nr, band_start, rest_idx, shift, nrows, zero);
            for (int64_t d = 0; d < D; d++) KT[d * Wp + j] = kr[d];
        }
        for (int64_t d = 0; d < D; d++)
            for (int64_t j = W; j < Wp; j++) KT[d * Wp + j] = 0.0f;
        const float* qr = q + qrow[r] * D;
        float* Pr = tile + r * BM * W;
        const float* mask = patch_of_row[r] >= 0 ? patch + patch_of_row[r] * BM * W : NULL;
        for (int64_t i0 = 0; i0 < BM; i0 += 4) {
            const float* q0 = qr + i0 * D;
            for (int64_t j0 = 0; j0 < Wp; j0 += 16) {
                __m256 a00 = _mm256_setzero_ps(), a01 = _mm256_setzero_ps();
                __m256 a10 = _mm256_setzero_ps(), a11 = _mm256_setzero_ps();
                __m256 a20 = _mm256_setzero_ps(), a21 = _mm256_setzero_ps();
                __m256 a30 = _mm256_setzero_ps(), a31 = _mm256_setzero_ps();
                for (int64_t d = 0; d < D; d++) {
                    const float* kt = KT + d * Wp + j0;
                    __m256 b0 = _mm256_load_ps(kt), b1 = _mm256_load_ps(kt + 8), x;
                    x = _mm256_broadcast_ss(q0 + d);
                    a00 = _mm256_fmadd_ps(x, b0, a00); a01 = _mm256_fmadd_ps(x, b1, a01);
                    x = _mm256_broadcast_ss(q0 + D + d);
                    a10 = _mm256_fmadd_ps(x, b0, a10); a11 = _mm256_fmadd_ps(x, b1, a11);
                    x = _mm256_broadcast_ss(q0 + 2 * D + d);
                    a20 = _mm256_fmadd_ps(x, b0, a20); a21 = _mm256_fmadd_ps(x, b1, a21);
                    x = _mm256_broadcast_ss(q0 + 3 * D + d);
                    a30 = _mm256_fmadd_ps(x, b0, a30); a31 = _mm256_fmadd_ps(x, b1, a31);
                }
                _mm256_store_ps(S + j0, _mm256_mul_ps(a00, sc));
                _mm256_store_ps(S + j0 + 8, _mm256_mul_ps(a01, sc));
                _mm256_store_ps(S + Wp + j0, _mm256_mul_ps(a10, sc));
                _mm256_store_ps(S + Wp + j0 + 8, _mm256_mul_ps(a11, sc));
                _mm256_store_ps(S + 2 * Wp + j0, _mm256_mul_ps(a20, sc));
                _mm256_store_ps(S + 2 * Wp + j0 + 8, _mm256_mul_ps(a21, sc));
                _mm256_store_ps(S + 3 * Wp + j0, _mm256_mul_ps(a30, sc));
                _mm256_store_ps(S + 3 * Wp + j0 + 8, _mm256_mul_ps(a31, sc));
            }
            for (int64_t i = 0; i < 4; i++) {
                float* s = S + i * Wp;
                if (mask) {
                    const float* m = mask + (i0 + i) * W;
                    for (int64_t j = 0; j < W; j++) s[j] += m[j];
                }
                softmax_row(s, Pr + (i0 + i) * W, W, Wp);
            }
        }
    }
    free(KT);
    free(S);
    free(zero);
    return 0;
}

int hop_f32(const float* P, int64_t BM, int64_t W, int64_t nbk, int64_t nr, int64_t Dv,
            const int64_t* band_start, const int64_t* rest_idx, int64_t shift, int64_t nrows,
            const float* z, const float* v, const int64_t* vrow, float* out, const int64_t* orow,
            float beta, float gamma, int64_t r0, int64_t r1)
{
    const float** zrow = malloc(sizeof(float*) * (W > 0 ? W : 1));
    float* zero = calloc(Dv, sizeof(float));
    if (!zrow || !zero) {
        free(zrow);
        free(zero);
        return 1;
    }
    const __m256 vb = _mm256_set1_ps(beta), vg = _mm256_set1_ps(gamma);
    for (int64_t r = r0; r < r1; r++) {
        for (int64_t k = 0; k < W; k++) zrow[k] = key_row(z, Dv, k, r, nbk, nr, band_start, rest_idx, shift, nrows, zero);
        const float* Pr = P + r * BM * W;
        const float* vr = v + vrow[r] * Dv;
        float* o = out + orow[r] * Dv;
        /* columns outermost: a 16-column slice of the W key rows stays in L1 over all row tiles */
        for (int64_t c0 = 0; c0 < Dv; c0 += 16) {
            for (int64_t i0 = 0; i0 < BM; i0 += 4) {
                __m256 a00 = _mm256_setzero_ps(), a01 = _mm256_setzero_ps();
                __m256 a10 = _mm256_setzero_ps(), a11 = _mm256_setzero_ps();
                __m256 a20 = _mm256_setzero_ps(), a21 = _mm256_setzero_ps();
                __m256 a30 = _mm256_setzero_ps(), a31 = _mm256_setzero_ps();
                const float* p0 = Pr + i0 * W;
                const float* p1 = p0 + W;
                const float* p2 = p1 + W;
                const float* p3 = p2 + W;
                for (int64_t k = 0; k < W; k++) {
                    const float* zk = zrow[k] + c0;
                    __m256 b0 = _mm256_loadu_ps(zk), b1 = _mm256_loadu_ps(zk + 8), x;
                    x = _mm256_broadcast_ss(p0 + k);
                    a00 = _mm256_fmadd_ps(x, b0, a00); a01 = _mm256_fmadd_ps(x, b1, a01);
                    x = _mm256_broadcast_ss(p1 + k);
                    a10 = _mm256_fmadd_ps(x, b0, a10); a11 = _mm256_fmadd_ps(x, b1, a11);
                    x = _mm256_broadcast_ss(p2 + k);
                    a20 = _mm256_fmadd_ps(x, b0, a20); a21 = _mm256_fmadd_ps(x, b1, a21);
                    x = _mm256_broadcast_ss(p3 + k);
                    a30 = _mm256_fmadd_ps(x, b0, a30); a31 = _mm256_fmadd_ps(x, b1, a31);
                }
                __m256 acc[4][2] = {{a00, a01}, {a10, a11}, {a20, a21}, {a30, a31}};
                for (int64_t i = 0; i < 4; i++) {
                    const float* vv = vr + (i0 + i) * Dv + c0;
                    float* oo = o + (i0 + i) * Dv + c0;
                    _mm256_storeu_ps(oo, _mm256_fmadd_ps(vg, _mm256_loadu_ps(vv), _mm256_mul_ps(vb, acc[i][0])));
                    _mm256_storeu_ps(oo + 8, _mm256_fmadd_ps(vg, _mm256_loadu_ps(vv + 8), _mm256_mul_ps(vb, acc[i][1])));
                }
            }
        }
    }
    free(zrow);
    free(zero);
    return 0;
}
