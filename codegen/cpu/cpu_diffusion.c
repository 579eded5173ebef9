/* CPU kernels of the stored-P diffusion stages, float32, on the 8-lane vectors of cpu_common.h
 * (AVX2 + FMA on x86-64, the compiler's vector extensions elsewhere).
 *
 * They work on one chunk of the torch stages' plan (codegen/torch_diffusion_plan.py): query
 * blocks r = r0..r1-1 of the chunk, each with a [BM, W] tile of P whose columns are W keys:
 * nbk band keys from row band_start[r], then nr "rest" keys (other blocks, global keys) at rows
 * rest_idx[r * nr + j]. Those are rows of the plan's padded numbering; row p is row p - shift of
 * the key (or z) array itself, and rows outside [0, nrows) read as zeros, so the arrays are used
 * as they are, without padded copies. Every product is a register tile of a few rows x 16
 * columns accumulated over the keys (or dims), read in place.
 *
 *   transpose_f32:   a head's keys transposed per key block, once per P stage.
 *   probs_f32:       tile[r] = row-softmax(scale * q_r k^T + mask[r]), rows without a key give
 *                    zeros; band keys read from the transposed keys, the others packed per block.
 *   dense_probs_f32: the same for the dense global rows (every key).
 *   hop_f32:         out[r] = gamma * v_r + beta * tile[r] @ z (the axpby fused into the product).
 *
 * Needs Dv % 16 == 0 (hop) and, to use the transposed keys, bn % 16 == 0; the caller checks.
 */
#include "cpu_common.h"

/* Row j of query block r's keys in array x (D floats a row), or `zero` outside the array. */
static inline const float* key_row(const float* x, int64_t D, int64_t j, int64_t r, int64_t nbk, int64_t nr,
                                   const int64_t* band_start, const int64_t* rest_idx, int64_t shift,
                                   int64_t nrows, const float* zero) {
    int64_t p = (j < nbk ? band_start[r] + j : rest_idx[r * nr + j - nbk]) - shift;
    return p >= 0 && p < nrows ? x + p * D : zero;
}

/* Softmax of one score row s[0..Wp) (entries W..Wp are padding) into out[0..W). */
static void softmax_row(float* s, float* out, int64_t W, int64_t Wp) {
    for (int64_t j = W; j < Wp; j++) s[j] = -INFINITY;
    softmax_row_inplace(s, Wp);
    memcpy(out, s, sizeof(float) * (size_t)W);
}

/* A head's keys transposed per block of bn rows, in the plan's padded row numbering: padded
 * row p (x row p - lo; zeros outside [lo, lo + n)) goes to xt[(p / bn) * D * bn + d * bn + p % bn].
 * The P kernels then read a band's key columns in place, 16 at a time. */
int transpose_f32(const float* x, int64_t n, int64_t D, float* xt, int64_t nblk, int64_t bn, int64_t lo)
{
    float* zero = calloc(D, sizeof(float));
    if (!zero) return 1;
    for (int64_t blk = 0; blk < nblk; blk++) {
        float* dst = xt + blk * D * bn;
        const float* rows[8];
        int64_t t = 0;
        for (; D % 8 == 0 && t + 8 <= bn; t += 8) {
            for (int i = 0; i < 8; i++) {
                int64_t p = blk * bn + t + i - lo;
                rows[i] = p >= 0 && p < n ? x + p * D : zero;
            }
            for (int64_t d0 = 0; d0 < D; d0 += 8) transpose8(rows, d0, dst + d0 * bn + t, bn);
        }
        for (; t < bn; t++) {
            int64_t p = blk * bn + t - lo;
            for (int64_t d = 0; d < D; d++) dst[d * bn + t] = p >= 0 && p < n ? x[p * D + d] : 0.0f;
        }
    }
    free(zero);
    return 0;
}

/* s[i * lds + 0..16) = scale * q_i . (16 key columns b[d * ldb + 0..16)) for the NR query rows
 * q_i = q0 + i * D. */
static inline __attribute__((always_inline)) void score_tile(const int NR, const float* q0, int64_t D,
        const float* b, int64_t ldb, float* s, int64_t lds, vf sc) {
    vf a[4][2];
    for (int i = 0; i < NR; i++) a[i][0] = a[i][1] = vf_zero();
    for (int64_t d = 0; d < D; d++) {
        const float* bd = b + d * ldb;
        vf b0 = vf_load(bd), b1 = vf_load(bd + 8);
        for (int i = 0; i < NR; i++) {
            vf x = vf_bcast(q0 + i * D + d);
            a[i][0] = vf_fma(x, b0, a[i][0]);
            a[i][1] = vf_fma(x, b1, a[i][1]);
        }
    }
    for (int i = 0; i < NR; i++) {
        vf_store_a(s + i * lds, vf_mul(a[i][0], sc));
        vf_store_a(s + i * lds + 8, vf_mul(a[i][1], sc));
    }
}

/* Scores of BM query rows against one 16-column slice of keys, in row tiles of 4 (then 2, 1). */
static void score_rows(const float* q, int64_t BM, int64_t D, const float* b, int64_t ldb, float* s, int64_t lds,
                       vf sc) {
    int64_t i = 0;
    for (; i + 4 <= BM; i += 4) score_tile(4, q + i * D, D, b, ldb, s + i * lds, lds, sc);
    for (; i + 2 <= BM; i += 2) score_tile(2, q + i * D, D, b, ldb, s + i * lds, lds, sc);
    for (; i < BM; i++) score_tile(1, q + i * D, D, b, ldb, s + i * lds, lds, sc);
}

/* Where padded key row p starts in the transposed keys (the blocked layout of transpose_f32). */
static inline const float* kt_col(const float* kt, int64_t D, int64_t bn, int64_t p) {
    return kt + p / bn * D * bn + p % bn;
}

int probs_f32(float* tile, int64_t BM, int64_t W, int64_t nbk, int64_t nr, int64_t D,
              const int64_t* band_start, const int64_t* rest_idx, int64_t shift, int64_t nrows,
              const float* k, const float* kt, int64_t bn, const float* q, const int64_t* qrow, float scale,
              const int64_t* patch_of_row, const float* patch, int64_t r0, int64_t r1)
{
    int64_t jb = kt && bn % 16 == 0 ? nbk / 16 * 16 : 0;  /* band columns read from kt in place */
    int64_t Wr = W - jb, Wrp = (Wr + 15) / 16 * 16, Wp = jb + Wrp;
    float* KR = aligned_alloc(32, sizeof(float) * D * (Wrp > 0 ? Wrp : 16));  /* the other keys, transposed */
    float* S = aligned_alloc(32, sizeof(float) * BM * (Wp > 0 ? Wp : 16));  /* the block's scores */
    float* zero = calloc(D, sizeof(float));
    if (!KR || !S || !zero) {
        free(KR);
        free(S);
        free(zero);
        return 1;
    }
    const vf sc = vf_set1(scale);
    for (int64_t r = r0; r < r1; r++) {
        int64_t j = 0;
        if (D % 8 == 0) {  /* 8 keys x 8 dims at a time, transposed in registers */
            const float* kr8[8];
            for (; j + 8 <= Wr; j += 8) {
                for (int t = 0; t < 8; t++)
                    kr8[t] = key_row(k, D, jb + j + t, r, nbk, nr, band_start, rest_idx, shift, nrows, zero);
                for (int64_t d0 = 0; d0 < D; d0 += 8) transpose8(kr8, d0, KR + d0 * Wrp + j, Wrp);
            }
        }
        for (; j < Wr; j++) {
            const float* kr = key_row(k, D, jb + j, r, nbk, nr, band_start, rest_idx, shift, nrows, zero);
            for (int64_t d = 0; d < D; d++) KR[d * Wrp + j] = kr[d];
        }
        for (int64_t d = 0; d < D; d++)
            for (int64_t j = Wr; j < Wrp; j++) KR[d * Wrp + j] = 0.0f;
        const float* qr = q + qrow[r] * D;
        /* columns outermost: a 16-column slice of the transposed keys stays in L1 over the rows */
        for (int64_t j0 = 0; j0 < jb; j0 += 16)
            score_rows(qr, BM, D, kt_col(kt, D, bn, band_start[r] + j0), bn, S + j0, Wp, sc);
        for (int64_t j0 = jb; j0 < Wp; j0 += 16)
            score_rows(qr, BM, D, KR + (j0 - jb), Wrp, S + j0, Wp, sc);
        float* Pr = tile + r * BM * W;
        const float* mask = patch_of_row[r] >= 0 ? patch + patch_of_row[r] * BM * W : NULL;
        for (int64_t i = 0; i < BM; i++) {
            float* s = S + i * Wp;
            if (mask) {
                const float* m = mask + i * W;
                for (int64_t j = 0; j < W; j++) s[j] += m[j];
            }
            softmax_row(s, Pr + i * W, W, Wp);
        }
    }
    free(KR);
    free(S);
    free(zero);
    return 0;
}

/* The dense rows of ng consecutive global queries q[0..ng): out[i] = row-softmax(scale q_i k^T
 * + bias[i]) over all n keys, read from kt (transpose_f32; needs bn % 16 == 0) from padded row lo;
 * bias may be NULL. */
int dense_probs_f32(float* out, int64_t ng, int64_t n, int64_t D, const float* q, const float* kt, int64_t bn,
                    int64_t lo, float scale, const float* bias)
{
    int64_t np = (n + 15) / 16 * 16;
    float* S = aligned_alloc(32, sizeof(float) * ng * np);
    if (!S) return 1;
    const vf sc = vf_set1(scale);
    for (int64_t j0 = 0; j0 < np; j0 += 16) score_rows(q, ng, D, kt_col(kt, D, bn, lo + j0), bn, S + j0, np, sc);
    for (int64_t i = 0; i < ng; i++) {
        float* s = S + i * np;
        if (bias)
            for (int64_t j = 0; j < n; j++) s[j] += bias[i * n + j];
        softmax_row(s, out + i * n, n, np);
    }
    free(S);
    return 0;
}

/* Keys per pass of the hop: a 16-column slice of this many z rows stays in L1 across the row
 * tiles (a P tile row is ~100-300 keys: one pass; the dense global rows take several). */
#define HOP_KEYS 256

/* out rows i < NR, 16 columns: (first pass) gamma v + beta acc, (later passes) out + beta acc,
 * with acc = P[i, k0:k1] @ z[k0:k1]. */
static inline __attribute__((always_inline)) void hop_tile(const int NR, const float* p0, int64_t W, int64_t k0,
        int64_t k1, const float* const* zrow, int64_t c0, const float* vv, float* oo, int64_t Dv, int first,
        vf vb, vf vg) {
    vf a[4][2];
    for (int i = 0; i < NR; i++) a[i][0] = a[i][1] = vf_zero();
    for (int64_t k = k0; k < k1; k++) {
        const float* zk = zrow[k - k0] + c0;
        vf b0 = vf_load(zk), b1 = vf_load(zk + 8);
        for (int i = 0; i < NR; i++) {
            vf x = vf_bcast(p0 + i * W + k);
            a[i][0] = vf_fma(x, b0, a[i][0]);
            a[i][1] = vf_fma(x, b1, a[i][1]);
        }
    }
    for (int i = 0; i < NR; i++) {
        const float* src = first ? vv + i * Dv : oo + i * Dv;
        vf g = first ? vg : vf_set1(1.0f);
        float* o = oo + i * Dv;
        vf_store(o, vf_fma(g, vf_load(src), vf_mul(vb, a[i][0])));
        vf_store(o + 8, vf_fma(g, vf_load(src + 8), vf_mul(vb, a[i][1])));
    }
}

/* out rows [0, n) (row stride Dv, every 16-column slice), tiles of 4, 2 and 1 rows (hop_tile). */
static void hop_rows(int64_t n, const float* p, int64_t W, int64_t k0, int64_t k1, const float* const* zrow,
                     const float* v, float* out, int64_t Dv, int first, vf vb, vf vg) {
    /* columns outermost: the slice of z rows stays in L1 over all row tiles */
    for (int64_t c0 = 0; c0 < Dv; c0 += 16) {
        int64_t i = 0;
        for (; i + 4 <= n; i += 4) hop_tile(4, p + i * W, W, k0, k1, zrow, c0, v + i * Dv + c0, out + i * Dv + c0, Dv, first, vb, vg);
        for (; i + 2 <= n; i += 2) hop_tile(2, p + i * W, W, k0, k1, zrow, c0, v + i * Dv + c0, out + i * Dv + c0, Dv, first, vb, vg);
        for (; i < n; i++) hop_tile(1, p + i * W, W, k0, k1, zrow, c0, v + i * Dv + c0, out + i * Dv + c0, Dv, first, vb, vg);
    }
}

int hop_f32(const float* P, int64_t BM, int64_t W, int64_t nbk, int64_t nr, int64_t Dv,
            const int64_t* band_start, const int64_t* rest_idx, int64_t shift, int64_t nrows,
            const float* z, const float* v, const int64_t* vrow, float* out, const int64_t* orow,
            float beta, float gamma, int64_t r0, int64_t r1)
{
    const float** zrow = malloc(sizeof(float*) * HOP_KEYS);
    float* zero = calloc(Dv, sizeof(float));
    if (!zrow || !zero) {
        free(zrow);
        free(zero);
        return 1;
    }
    const vf vb = vf_set1(beta), vg = vf_set1(gamma);
    for (int64_t r = r0; r < r1; r++) {
        const float* Pr = P + r * BM * W;
        const float* vr = v + vrow[r] * Dv;
        float* o = out + orow[r] * Dv;
        for (int64_t k0 = 0; k0 < W || k0 == 0; k0 += HOP_KEYS) {
            int64_t k1 = k0 + HOP_KEYS < W ? k0 + HOP_KEYS : W;
            for (int64_t k = k0; k < k1; k++)
                zrow[k - k0] = key_row(z, Dv, k, r, nbk, nr, band_start, rest_idx, shift, nrows, zero);
            hop_rows(BM, Pr, W, k0, k1, zrow, vr, o, Dv, k0 == 0, vb, vg);
        }
    }
    free(zrow);
    free(zero);
    return 0;
}
