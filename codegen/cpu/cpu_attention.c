/* Fused block-sparse attention on the CPU (float32, on the 8-lane vectors of cpu_common.h: AVX2 +
 * FMA on x86-64, the compiler's vector extensions elsewhere): forward and backward.
 *
 * One layout (block tables, see codegen/cpu/attention.py) for every (batch, head). Each entry
 * point is called once per thread with the same arguments and a shared counter; a thread takes
 * the next work item with an atomic add until none is left, so a thread slowed down by another
 * process simply does fewer items and nothing waits on a barrier.
 *
 *   attn_fwd: items (b * H + h, query block r): online softmax over the row's key blocks.
 *   attn_bwd: items (b * Hkv + hkv, key block c) over the group's query heads and the column's
 *             query blocks, P recomputed from lse: dv = P^T dO, dk = scale * dS^T Q (every item
 *             owns its rows) and dq += scale * dS K into the calling thread's own dq buffer
 *             (zeroed by that thread; 5 block products per visible block); attn_sum then adds
 *             the buffers into dq, split across the threads the same way.
 *   attn_probs: items (b * Hkv + hkv, row of a list of query-block rows): the row's normalized
 *             probabilities written to a stored tile (cross-layer reuse) and out = P V.
 *   attn_apply: the same items: out = P V for stored tiles and other values (V read in place).
 *
 * The forward works on S^T (keys x queries: the lanes of a vector are 8 query rows), so the
 * keys and values are read in place and only the query block is packed (transposed) per item;
 * the backward works on S (queries x keys), reading queries, dO and keys in place and packing
 * K^T, V^T once per item. Every product is gemm(): C[M x N] (+)= A B with A read through (row, k) strides (so
 * transposed uses need no copy) and B row-major; N and the head dims are multiples of 8 (the
 * wrapper pads odd head dims with zeros). Ragged last blocks are bounds-checked here.
 *
 * Score mods (in order, on the scaled score, before masking): softcap s = cap * tanh(s / cap)
 * and alibi s += slope[h] * (kpos - qpos). A NaN score has a NaN exponential, so the row's sum,
 * output and lse turn NaN instead of the score being dropped; masked entries are exactly 0 in P
 * and dS.
 */
#include "cpu_common.h"

#include "cpu_attention.h"

#define AI static inline __attribute__((always_inline))
#define RUP8(x) (((x) + 7) / 8 * 8)

/* C[MR x 8 NV] (+)= A[MR x K] B[K x 8 NV]: broadcast A scalars, FMA rows of B. cmax (or NULL):
 * the column maxima of C so far, updated from the tile's rows (NaN skipped, as by vf_max). */
AI void tile(const int MR, const int NV, int64_t K, const float* A, int64_t ar, int64_t ak, const float* B,
             int64_t ldb, float* C, int64_t ldc, int acc, float* cmax) {
    vf c[6][2];
    for (int i = 0; i < MR; i++)
        for (int v = 0; v < NV; v++) c[i][v] = acc ? vf_load(C + i * ldc + 8 * v) : vf_zero();
    for (int64_t kk = 0; kk < K; kk++) {
        const float* b = B + kk * ldb;
        vf b0 = vf_load(b), b1 = NV > 1 ? vf_load(b + 8) : b0;
        for (int i = 0; i < MR; i++) {
            vf a = vf_bcast(A + i * ar + kk * ak);
            c[i][0] = vf_fma(a, b0, c[i][0]);
            if (NV > 1) c[i][1] = vf_fma(a, b1, c[i][1]);
        }
    }
    for (int i = 0; i < MR; i++)
        for (int v = 0; v < NV; v++) vf_store(C + i * ldc + 8 * v, c[i][v]);
    if (cmax)
        for (int v = 0; v < NV; v++) {
            vf mx = vf_load(cmax + 8 * v);
            for (int i = 0; i < MR; i++) mx = vf_max(c[i][v], mx);
            vf_store(cmax + 8 * v, mx);
        }
}

AI void gemm_cols(const int NV, int64_t M, int64_t K, const float* A, int64_t ar, int64_t ak, const float* B,
                  int64_t ldb, float* C, int64_t ldc, int acc, float* cmax) {
    int64_t i = 0;
    for (; i + 6 <= M; i += 6) tile(6, NV, K, A + i * ar, ar, ak, B, ldb, C + i * ldc, ldc, acc, cmax);
    const float* a = A + i * ar;
    float* c = C + i * ldc;
    switch (M - i) {
        case 5: tile(5, NV, K, a, ar, ak, B, ldb, c, ldc, acc, cmax); break;
        case 4: tile(4, NV, K, a, ar, ak, B, ldb, c, ldc, acc, cmax); break;
        case 3: tile(3, NV, K, a, ar, ak, B, ldb, c, ldc, acc, cmax); break;
        case 2: tile(2, NV, K, a, ar, ak, B, ldb, c, ldc, acc, cmax); break;
        case 1: tile(1, NV, K, a, ar, ak, B, ldb, c, ldc, acc, cmax); break;
        default: break;
    }
}

/* C[M x N] (+)= sum_k A[i * ar + k * ak] B[k * ldb + j], N % 8 == 0; column panels of 16 keep
 * B's panel in L1 while every row tile passes over it. cmax (or NULL): C's column maxima, see
 * tile(). */
static void gemm_max(int64_t M, int64_t N, int64_t K, const float* A, int64_t ar, int64_t ak, const float* B,
                     int64_t ldb, float* C, int64_t ldc, int acc, float* cmax) {
    int64_t j = 0;
    for (; j + 16 <= N; j += 16) gemm_cols(2, M, K, A, ar, ak, B + j, ldb, C + j, ldc, acc, cmax ? cmax + j : NULL);
    if (j < N) gemm_cols(1, M, K, A, ar, ak, B + j, ldb, C + j, ldc, acc, cmax ? cmax + j : NULL);
}

static void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t ar, int64_t ak, const float* B,
                 int64_t ldb, float* C, int64_t ldc, int acc) {
    gemm_max(M, N, K, A, ar, ak, B, ldb, C, ldc, acc, NULL);
}

/* tanh of 8 floats as x P(x^2) / Q(x^2) for |x| <= 9 (tanh(9) is 1 in float32), P and Q of degree
 * 4 in x^2: a Lawson-weighted least-squares fit to tanh on [0, 9]; float32 absolute error about
 * 3e-7, half the cost of 1 - 2 / (e^{2x} + 1). The clamp's operand order keeps NaN. */
AI vf tanh8(vf x) {
    x = vf_min(vf_set1(9.0f), vf_max(vf_set1(-9.0f), x));
    vf z = vf_mul(x, x);
    vf p = vf_fma(vf_set1(1.31838536e-08f), z, vf_set1(2.04716559e-05f));
    p = vf_fma(p, z, vf_set1(3.48657653e-03f));
    p = vf_fma(p, z, vf_set1(1.33731953e-01f));
    p = vf_fma(p, z, vf_set1(9.99999907e-01f));
    vf q = vf_fma(vf_set1(7.70253719e-07f), z, vf_set1(3.27137269e-04f));
    q = vf_fma(q, z, vf_set1(2.58419652e-02f));
    q = vf_fma(q, z, vf_set1(4.67064923e-01f));
    q = vf_fma(q, z, vf_set1(1.0f));
    return vf_div(vf_mul(x, p), q);
}

/* Lanes t < lim whose byte bytes[t] is not 0 (bytes NULL: every lane < lim); never reads
 * bytes[lim..]. */
AI vm visible8(int64_t lim, const uint8_t* bytes) {
    vm in = vm_first(lim);
    if (bytes) {
        in = vm_andnot(vm_zero_bytes(load_bytes(bytes, lim >= 8 ? 8 : (size_t)(lim < 0 ? 0 : lim))), in);
    }
    return in;
}

/* One row of scores s[0..len) (len % 8 == 0): the mods in order, then -inf where not visible
 * (lane t visible iff t < lim and bytes[t] != 0). For alibi, kpos - qpos = pos0 + step * t.
 * deriv (or NULL) receives the product of the mods' derivatives. */
static void mod_mask(float* s, float* deriv, int64_t len, int64_t lim, const uint8_t* bytes, const Args* a,
                     float slope, float pos0, float step) {
    const vf ninf = vf_set1(-INFINITY);
    const vf iota = vf_iota();
    const int64_t nops = a->nops;
    if (nops == 1 && a->op_kind[0] == 0) {  /* softcap alone (Gemma 2): the op dispatch hoisted */
        const float cap = (float)a->op_param[0];
        const vf inv = vf_set1(1.0f / cap), vcap = vf_set1(cap), one = vf_set1(1.0f);
        for (int64_t t = 0; t < len; t += 8) {
            vf th = tanh8(vf_mul(vf_load(s + t), inv));
            vf_store(s + t, vf_blend(ninf, vf_mul(th, vcap), visible8(lim - t, bytes ? bytes + t : NULL)));
            if (deriv) vf_store(deriv + t, vf_fnma(th, th, one));
        }
        return;
    }
    if (nops == 1 && a->op_kind[0] == 1) {  /* ALiBi alone (BLOOM, MPT): the same, an add per score */
        const vf vslope = vf_set1(slope), vstep = vf_set1(step);
        for (int64_t t = 0; t < len; t += 8) {
            vf rel = vf_fma(iota, vstep, vf_set1(pos0 + step * (float)t));
            vf x = vf_fma(vslope, rel, vf_load(s + t));
            vf_store(s + t, vf_blend(ninf, x, visible8(lim - t, bytes ? bytes + t : NULL)));
            if (deriv) vf_store(deriv + t, vf_set1(1.0f));
        }
        return;
    }
    for (int64_t t = 0; t < len; t += 8) {
        vf x = vf_load(s + t), d = vf_set1(1.0f);
        for (int64_t o = 0; o < nops; o++) {
            if (a->op_kind[o] == 0) {
                float cap = (float)a->op_param[o];
                vf th = tanh8(vf_mul(x, vf_set1(1.0f / cap)));
                d = vf_mul(d, vf_fnma(th, th, vf_set1(1.0f)));
                x = vf_mul(th, vf_set1(cap));
            } else {
                vf rel = vf_fma(iota, vf_set1(step), vf_set1(pos0 + step * (float)t));
                x = vf_fma(vf_set1(slope), rel, x);
            }
        }
        vm vis = visible8(lim - t, bytes ? bytes + t : NULL);
        vf_store(s + t, vf_blend(ninf, x, vis));
        if (deriv) vf_store(deriv + t, d);
    }
}

/* A^T of rows x cols (row stride lda) into dst (row stride ldd), times mul; dst columns
 * rows..ldd are zeroed. */
static void pack_t(const float* A, int64_t rows, int64_t cols, int64_t lda, float* dst, int64_t ldd, float mul) {
    for (int64_t c = 0; c < cols; c++) {
        float* d = dst + c * ldd;
        for (int64_t r = 0; r < rows; r++) d[r] = A[r * lda + c] * mul;
        for (int64_t r = rows; r < ldd; r++) d[r] = 0.0f;
    }
}

/* The key blocks of query block r: full ranges first, then partial blocks with their masks. */
typedef struct { int64_t c; const uint8_t* mask; } Block;

static int64_t row_blocks(const Args* a, int64_t r, Block* out) {  /* masks transposed (S^T) */
    int64_t n = 0, msz = a->bm * a->bn;
    for (int64_t i = a->range_ptr[r]; i < a->range_ptr[r + 1]; i++)
        for (int64_t c = a->range_start[i]; c < a->range_end[i]; c++) out[n++] = (Block){c, NULL};
    for (int64_t i = a->part_ptr[r]; i < a->part_ptr[r + 1]; i++)
        out[n++] = (Block){a->part_cols[i], a->masks_t + a->part_mask[i] * msz};
    return n;
}

static int64_t col_blocks(const Args* a, int64_t c, Block* out) {
    int64_t n = 0, msz = a->bm * a->bn;
    for (int64_t i = a->col_range_ptr[c]; i < a->col_range_ptr[c + 1]; i++)
        for (int64_t r = a->row_start[i]; r < a->row_end[i]; r++) out[n++] = (Block){r, NULL};
    for (int64_t i = a->col_part_ptr[c]; i < a->col_part_ptr[c + 1]; i++)
        out[n++] = (Block){a->col_part_rows[i], a->masks + a->col_part_mask[i] * msz};
    return n;
}

static int has_softcap(const Args* a) {
    for (int64_t o = 0; o < a->nops; o++)
        if (a->op_kind[o] == 0) return 1;
    return 0;
}

static float slope_of(const Args* a, int64_t h) { return a->slopes ? a->slopes[h] : 0.0f; }

/* S^T[j][t] for the key block at j0 (n keys) against the packed query block QT (queries
 * i0..i0+m as lanes), mods and mask applied. Returns 1 for a full block of whole rows without
 * mods or with softcap alone, whose per-lane maxima are then in cmax (from the product's tiles). */
static int scores_t(const Args* a, const float* kh, const float* QT, int64_t j0, int64_t n, int64_t i0,
                    int64_t m, const uint8_t* mask_t, float slope, float* S, float* cmax) {
    int64_t bmp = RUP8(a->bm);
    /* softcap alone is increasing: the capped maxima are the caps of the raw ones */
    int soft1 = a->nops == 1 && a->op_kind[0] == 0;
    int clean = (a->nops == 0 || soft1) && !mask_t && m == bmp;
    if (clean)
        for (int64_t t = 0; t < bmp; t += 8) vf_store(cmax + t, vf_set1(-INFINITY));
    gemm_max(n, bmp, a->D, kh + j0 * a->D, a->D, 1, QT, bmp, S, bmp, 0, clean ? cmax : NULL);
    if (clean && a->nops == 0) return 1;
    for (int64_t j = 0; j < n; j++)
        mod_mask(S + j * bmp, NULL, bmp, m, mask_t ? mask_t + j * a->bm : NULL, a, slope,
                 (float)(j0 + j - a->q_pos0 - i0), -1.0f);
    if (clean) {
        const float cap = (float)a->op_param[0];
        for (int64_t t = 0; t < bmp; t += 8)
            vf_store(cmax + t, vf_mul(tanh8(vf_mul(vf_load(cmax + t), vf_set1(1.0f / cap))), vf_set1(cap)));
    }
    return clean;
}

int attn_fwd(const Args* a, int64_t* counter) {
    const int64_t D = a->D, Dv = a->Dv, bm = a->bm, bn = a->bn, bmp = RUP8(bm), G = a->H / a->Hkv;
    float* QT = aligned_alloc(32, sizeof(float) * D * bmp);
    float* S = aligned_alloc(32, sizeof(float) * RUP8(bn) * bmp);
    float* acc = aligned_alloc(32, sizeof(float) * bm * Dv);
    float* st = aligned_alloc(32, sizeof(float) * 4 * bmp);  /* row max, row sum, rescale, block max */
    Block* blocks = malloc(sizeof(Block) * (a->nkb + 1));
    int fail = !QT || !S || !acc || !st || !blocks;
    const int64_t total = a->B * a->H * a->nqb;
    for (int64_t item; !fail && (item = __atomic_fetch_add(counter, 1, __ATOMIC_RELAXED)) < total;) {
        int64_t bh = item / a->nqb, r = item % a->nqb, h = bh % a->H, kvh = bh / a->H * a->Hkv + h / G;
        int64_t i0 = r * bm, m = a->Lq - i0 < bm ? a->Lq - i0 : bm;
        const float *kh = a->k + kvh * a->Lk * D, *vh = a->v + kvh * a->Lk * Dv;
        float slope = slope_of(a, h), *mx = st, *l = st + bmp, *alpha = st + 2 * bmp, *bmax = st + 3 * bmp;
        pack_t(a->q + (bh * a->Lq + i0) * D, m, D, D, QT, bmp, (float)a->scale);
        memset(acc, 0, sizeof(float) * m * Dv);
        for (int64_t t = 0; t < bmp; t++) mx[t] = -INFINITY, l[t] = 0.0f;
        int64_t nb = row_blocks(a, r, blocks);
        for (int64_t b = 0; b < nb; b++) {
            int64_t j0 = blocks[b].c * bn, n = a->Lk - j0 < bn ? a->Lk - j0 : bn;
            if (b + 1 < nb) {  /* the next block's keys and values on their way (long rows stream them from memory) */
                int64_t j1 = blocks[b + 1].c * bn, n1 = a->Lk - j1 < bn ? a->Lk - j1 : bn;
                for (int64_t o = 0; o < n1 * D; o += 16) __builtin_prefetch(kh + j1 * D + o);
                for (int64_t o = 0; o < n1 * Dv; o += 16) __builtin_prefetch(vh + j1 * Dv + o);
            }
            int plain = scores_t(a, kh, QT, j0, n, i0, m, blocks[b].mask, slope, S, bmax);
            for (int64_t t = 0; t < bmp; t += 8) {
                /* the max skips NaN scores: exp of one is NaN, so the row's sum, out and lse
                 * turn NaN all the same */
                vf bmx = vf_set1(-INFINITY);
                if (plain) bmx = vf_load(bmax + t);
                else
                    for (int64_t j = 0; j < n; j++) bmx = vf_max(vf_load(S + j * bmp + t), bmx);
                vf mo = vf_load(mx + t);
                vf mn = vf_max(bmx, mo);
                vm none = vf_eq(mn, vf_set1(-INFINITY));
                vf ms = vf_blend(mn, vf_zero(), none);  /* no key yet: P = exp(-inf) = 0 */
                vf al = exp8(vf_sub(mo, ms)), sum = vf_zero();
                for (int64_t j = 0; j < n; j++) {
                    vf p = exp8(vf_sub(vf_load(S + j * bmp + t), ms));
                    vf_store(S + j * bmp + t, p);
                    sum = vf_add(sum, p);
                }
                vf_store(l + t, vf_fma(vf_load(l + t), al, sum));
                vf_store(mx + t, mn);
                vf_store(alpha + t, al);
            }
            for (int64_t i = 0; i < m; i++) {
                if (alpha[i] == 1.0f) continue;
                vf al = vf_set1(alpha[i]);
                for (int64_t d = 0; d < Dv; d += 8)
                    vf_store(acc + i * Dv + d, vf_mul(al, vf_load(acc + i * Dv + d)));
            }
            gemm(m, Dv, n, S, 1, bmp, vh + j0 * Dv, Dv, acc, Dv, 1);
        }
        float* o = a->out + (bh * a->Lq + i0) * Dv;
        for (int64_t i = 0; i < m; i++) {
            int empty = l[i] == 0.0f;  /* no visible key: zeros and lse -inf */
            float inv = empty ? 0.0f : 1.0f / l[i];
            for (int64_t d = 0; d < Dv; d++) o[i * Dv + d] = empty ? 0.0f : acc[i * Dv + d] * inv;
            if (a->lse) a->lse[bh * a->Lq + i0 + i] = empty ? -INFINITY : mx[i] + logf(l[i]);
        }
    }
    free(QT); free(S); free(acc); free(st); free(blocks);
    return fail;
}

/* The whole backward in one pass over items (b * Hkv + hkv, key block c): for every query head
 * of the group and query block r seeing c, S and dP = dO V^T give P (from lse) and dS; then
 * dv += P^T dO and dk += dS^T Q (rows the item owns) and dq[r] += dS K into this thread's own
 * dq buffer (the wrapper sums the threads' buffers), so no two threads write the same memory.
 * Only the items of key/value heads kv0..kv1 are done; dq holds their rows from head kv0 on. */
int attn_bwd(const Args* a, int64_t* counter, float* dq, int64_t kv0, int64_t kv1) {
    const int64_t D = a->D, Dv = a->Dv, bm = a->bm, bn = a->bn, bnp = RUP8(bn), G = a->H / a->Hkv;
    float* KT = aligned_alloc(32, sizeof(float) * D * bnp);
    float* QS = aligned_alloc(32, sizeof(float) * bm * D);
    float* VT = aligned_alloc(32, sizeof(float) * Dv * bnp);
    float* S = aligned_alloc(32, sizeof(float) * bm * bnp);
    float* dP = aligned_alloc(32, sizeof(float) * bm * bnp);
    float* der = aligned_alloc(32, sizeof(float) * bm * bnp);
    float* dk = aligned_alloc(32, sizeof(float) * bn * D);
    float* dv = aligned_alloc(32, sizeof(float) * bn * Dv);
    Block* blocks = malloc(sizeof(Block) * (a->nqb + 1));
    int fail = !KT || !QS || !VT || !S || !dP || !der || !dk || !dv || !blocks, soft = has_softcap(a);
    const int64_t total = (kv1 - kv0) * a->nkb;
    const vf scale = vf_set1((float)a->scale);
    memset(dq, 0, sizeof(float) * (kv1 - kv0) * G * a->Lq * D);  /* this thread's own buffer */
    for (int64_t item; !fail && (item = __atomic_fetch_add(counter, 1, __ATOMIC_RELAXED)) < total;) {
        int64_t bkv = kv0 + item / a->nkb, c = item % a->nkb, hkv = bkv % a->Hkv;
        int64_t j0 = c * bn, n = a->Lk - j0 < bn ? a->Lk - j0 : bn;
        const float* kb = a->k + (bkv * a->Lk + j0) * D;
        pack_t(kb, n, D, D, KT, bnp, 1.0f);
        pack_t(a->v + (bkv * a->Lk + j0) * Dv, n, Dv, Dv, VT, bnp, 1.0f);
        memset(dk, 0, sizeof(float) * n * D);
        memset(dv, 0, sizeof(float) * n * Dv);
        int64_t nb = col_blocks(a, c, blocks);
        for (int64_t g = 0; g < G; g++) {
            int64_t h = hkv * G + g, bh = bkv * G + g;  /* b * H + h, as H = Hkv * G */
            float slope = slope_of(a, h);
            for (int64_t b = 0; b < nb; b++) {
                int64_t i0 = blocks[b].c * bm, m = a->Lq - i0 < bm ? a->Lq - i0 : bm;
                const float *qb = a->q + (bh * a->Lq + i0) * D, *ob = a->dout + (bh * a->Lq + i0) * Dv;
                if (b + 1 < nb) {  /* the next block's queries and dO on their way, as in the forward */
                    int64_t i1 = blocks[b + 1].c * bm, m1 = a->Lq - i1 < bm ? a->Lq - i1 : bm;
                    for (int64_t o = 0; o < m1 * D; o += 16) __builtin_prefetch(a->q + (bh * a->Lq + i1) * D + o);
                    for (int64_t o = 0; o < m1 * Dv; o += 16) __builtin_prefetch(a->dout + (bh * a->Lq + i1) * Dv + o);
                }
                /* S exactly as the forward computed it (sum over d of k * fl(q * scale), in the same
                 * order): P = exp(S - lse) then sums to 1 with the forward's lse, so the rounding
                 * of the scores does not leak into dv and dk */
                for (int64_t i = 0; i < m * D; i++) QS[i] = qb[i] * (float)a->scale;
                gemm(m, bnp, D, QS, D, 1, KT, bnp, S, bnp, 0);
                gemm(m, bnp, Dv, ob, Dv, 1, VT, bnp, dP, bnp, 0);
                for (int64_t i = 0; i < m; i++) {
                    float* s = S + i * bnp;
                    mod_mask(s, soft ? der + i * bnp : NULL, bnp, n, blocks[b].mask ? blocks[b].mask + i * bn : NULL,
                             a, slope, (float)(j0 - a->q_pos0 - i0 - i), 1.0f);
                    vf lse = vf_set1(a->lse_in[bh * a->Lq + i0 + i]);
                    vf delta = vf_set1(a->delta[bh * a->Lq + i0 + i]);
                    for (int64_t t = 0; t < bnp; t += 8) {
                        vf x = vf_load(s + t);
                        vm vis = vf_neq(x, vf_set1(-INFINITY));
                        vf p = vf_keep(exp8(vf_sub(x, lse)), vis);
                        vf ds = vf_mul(p, vf_sub(vf_load(dP + i * bnp + t), delta));
                        if (soft) ds = vf_mul(ds, vf_load(der + i * bnp + t));
                        vf_store(s + t, p);
                        /* the scale of S = scale Q K^T, folded in once for both dk and dq */
                        vf_store(dP + i * bnp + t, vf_keep(vf_mul(ds, scale), vis));
                    }
                }
                gemm(n, Dv, m, S, 1, bnp, ob, Dv, dv, Dv, 1);
                gemm(n, D, m, dP, 1, bnp, qb, D, dk, D, 1);
                gemm(m, D, n, dP, bnp, 1, kb, D, dq + ((bh - kv0 * G) * a->Lq + i0) * D, D, 1);
            }
        }
        memcpy(a->dk + (bkv * a->Lk + j0) * D, dk, sizeof(float) * n * D);
        memcpy(a->dv + (bkv * a->Lk + j0) * Dv, dv, sizeof(float) * n * Dv);
    }
    free(KT); free(QS); free(VT); free(S); free(dP); free(der); free(dk); free(dv); free(blocks);
    return fail;
}

/* dst[0..len) += bufs[0..len) + bufs[stride..stride + len) + ... (nbuf buffers): the backward's
 * per-thread dq buffers summed into dq, in items of 4096 floats taken from the counter. */
int attn_sum(const Args* a, int64_t* counter, float* dst, const float* bufs, int64_t nbuf, int64_t len,
             int64_t stride) {
    (void)a;
    const int64_t step = 4096, total = (len + step - 1) / step;
    for (int64_t item; (item = __atomic_fetch_add(counter, 1, __ATOMIC_RELAXED)) < total;) {
        int64_t i0 = item * step, i1 = i0 + step < len ? i0 + step : len;
        for (int64_t b = 0; b < nbuf; b++) {
            const float* src = bufs + b * stride;
            int64_t i = i0;
            for (; i + 8 <= i1; i += 8) vf_store(dst + i, vf_add(vf_load(dst + i), vf_load(src + i)));
            for (; i < i1; i++) dst[i] += src[i];
        }
    }
    return 0;
}

/* Stored probabilities (cross-layer reuse): items (b * Hkv + hkv, row gr) over a list of rows,
 * each a query block qb[gr] with w[gr] key-block columns cols[cstart[gr] + j] of kind
 * kind[cstart[gr] + j] (-2 padding: P = 0 and never read, -1 full, >= 0 the mask id). For the G
 * query heads of the group (folded into the rows, head-major) the row's scores are masked and
 * normalized over the whole row (max, then exp and sum, then scale), written to the tile
 * p[(b * Hkv + hkv) * psize + poff[gr] ...] of [G * bm, w * bn] floats, and out = P V. Rows past
 * Lq and keys past Lk hold P = 0; a row with no visible key has P = 0 and out = 0; a NaN score
 * makes its whole row NaN. The scores are built in place in the tile when bn % 8 == 0, else in a
 * scratch row of 8-padded blocks (maxw columns at most) copied into the tile at the end. */
int attn_probs(const Args* a, int64_t* counter, int64_t nrows, const int64_t* qb, const int64_t* w,
               const int64_t* poff, const int64_t* cstart, const int64_t* cols, const int32_t* kind, float* p,
               int64_t psize, int64_t maxw) {
    const int64_t D = a->D, Dv = a->Dv, bm = a->bm, bn = a->bn, bnp = RUP8(bn), G = a->H / a->Hkv, GM = G * bm;
    const int inplace = bn % 8 == 0;
    float* QS = aligned_alloc(32, sizeof(float) * GM * D);
    float* KT = aligned_alloc(32, sizeof(float) * D * bnp);
    float* SC = inplace ? NULL : aligned_alloc(32, sizeof(float) * GM * maxw * bnp);
    int fail = !QS || !KT || (!inplace && !SC);
    const int64_t total = a->B * a->Hkv * nrows;
    const vf ninf = vf_set1(-INFINITY);
    for (int64_t item; !fail && (item = __atomic_fetch_add(counter, 1, __ATOMIC_RELAXED)) < total;) {
        int64_t bkv = item / nrows, gr = item % nrows, W = w[gr], i0 = qb[gr] * bm;
        int64_t m = a->Lq - i0 < bm ? a->Lq - i0 : bm;
        const int64_t* rc = cols + cstart[gr];
        const int32_t* rk = kind + cstart[gr];
        float* tile = p + bkv * psize + poff[gr];
        const int64_t ldt = W * bn, ld = inplace ? ldt : W * bnp, bs = inplace ? bn : bnp, len = W * bs;
        float* S = inplace ? tile : SC;
        const float *kh = a->k + bkv * a->Lk * D, *vh = a->v + bkv * a->Lk * Dv;
        for (int64_t g = 0; g < G; g++) {  /* scaled queries, as the backward rounds them; rows past Lq 0 */
            const float* qs = a->q + ((bkv * G + g) * a->Lq + i0) * D;
            float* d = QS + g * bm * D;
            for (int64_t i = 0; i < m * D; i++) d[i] = qs[i] * (float)a->scale;
            memset(d + m * D, 0, sizeof(float) * (bm - m) * D);
        }
        for (int64_t j = 0; j < W; j++) {
            float* sj = S + j * bs;
            if (rk[j] == -2) {
                for (int64_t r = 0; r < GM; r++)
                    for (int64_t t = 0; t < bs; t += 8) vf_store(sj + r * ld + t, ninf);
                continue;
            }
            int64_t j0 = rc[j] * bn, n = a->Lk - j0 < bn ? a->Lk - j0 : bn;
            pack_t(kh + j0 * D, n, D, D, KT, bnp, 1.0f);
            gemm(GM, bnp, D, QS, D, 1, KT, bnp, sj, ld, 0);
            if (rk[j] >= 0 || n < bs) {
                const uint8_t* mk = rk[j] >= 0 ? a->masks + rk[j] * bm * bn : NULL;
                for (int64_t g = 0; g < G; g++)
                    for (int64_t i = 0; i < m; i++)
                        mod_mask(sj + (g * bm + i) * ld, NULL, bs, n, mk ? mk + i * bn : NULL, a, 0.0f, 0.0f, 0.0f);
            }
        }
        for (int64_t g = 0; g < G; g++) {
            for (int64_t i = 0; i < m; i++) softmax_row_inplace(S + (g * bm + i) * ld, len);
            float* o = a->out + ((bkv * G + g) * a->Lq + i0) * Dv;
            memset(o, 0, sizeof(float) * m * Dv);
            for (int64_t j = 0; j < W; j++) {
                if (rk[j] == -2) continue;
                int64_t j0 = rc[j] * bn, n = a->Lk - j0 < bn ? a->Lk - j0 : bn;
                gemm(m, Dv, n, S + g * bm * ld + j * bs, ld, 1, vh + j0 * Dv, Dv, o, Dv, 1);
            }
        }
        for (int64_t g = 0; g < G; g++) {
            for (int64_t i = 0; i < bm; i++) {
                float* t = tile + (g * bm + i) * ldt;
                if (i >= m) memset(t, 0, sizeof(float) * ldt);
                else if (!inplace)
                    for (int64_t j = 0; j < W; j++)
                        memcpy(t + j * bn, S + (g * bm + i) * ld + j * bs, sizeof(float) * bn);
            }
        }
    }
    free(QS); free(KT); free(SC);
    return fail;
}

/* Stored probabilities applied to other values (cross-layer reuse): out = P V over the rows of
 * attn_probs (same row arrays and tile layout), items (b * Hkv + hkv, row gr). Each key block of
 * the row (padding skipped) adds its [G * bm, bn] slice of the tile times V's block rows, read in
 * place; only the valid rows of a ragged last block are read. Rows past Lq are not written;
 * query blocks in no row keep the caller's zeros. A NaN in P or in a used row of V
 * reaches the outputs it multiplies (FMA, no skipping of zeros). */
int attn_apply(const Args* a, int64_t* counter, int64_t nrows, const int64_t* qb, const int64_t* w,
               const int64_t* poff, const int64_t* cstart, const int64_t* cols, const int32_t* kind, const float* p,
               int64_t psize) {
    const int64_t Dv = a->Dv, bm = a->bm, bn = a->bn, G = a->H / a->Hkv;
    const int64_t total = a->B * a->Hkv * nrows;
    for (int64_t item; (item = __atomic_fetch_add(counter, 1, __ATOMIC_RELAXED)) < total;) {
        int64_t bkv = item / nrows, gr = item % nrows, W = w[gr], i0 = qb[gr] * bm, ldt = W * bn;
        int64_t m = a->Lq - i0 < bm ? a->Lq - i0 : bm;
        if (m <= 0) continue;
        const int64_t* rc = cols + cstart[gr];
        const int32_t* rk = kind + cstart[gr];
        const float *tile = p + bkv * psize + poff[gr], *vh = a->v + bkv * a->Lk * Dv;
        for (int64_t g = 0; g < G; g++) {
            float* o = a->out + ((bkv * G + g) * a->Lq + i0) * Dv;
            memset(o, 0, sizeof(float) * m * Dv);
            for (int64_t j = 0; j < W; j++) {  /* block by block: V's [bn, Dv] panel stays in L1 */
                if (rk[j] == -2) continue;
                int64_t j0 = rc[j] * bn, n = a->Lk - j0 < bn ? a->Lk - j0 : bn;
                gemm(m, Dv, n, tile + g * bm * ldt + j * bn, ldt, 1, vh + j0 * Dv, Dv, o, Dv, 1);
            }
        }
    }
    return 0;
}
