/* The argument block of the fused attention kernels (cpu_attention.c), filled field by field by
 * the ctypes wrapper (codegen/cpu/attention.py, whose _Args mirrors it) and by test drivers. */
#ifndef ATTNC_CPU_ATTENTION_H
#define ATTNC_CPU_ATTENTION_H

#include <stdint.h>

typedef struct {
    const float *q, *k, *v, *dout, *lse_in, *delta;
    float *out, *lse, *dq, *dk, *dv;
    int64_t B, H, Hkv, Lq, Lk, D, Dv, bm, bn, nqb, nkb;
    const int64_t *range_ptr, *range_start, *range_end, *part_ptr, *part_cols, *part_mask;
    const int64_t *col_range_ptr, *row_start, *row_end, *col_part_ptr, *col_part_rows, *col_part_mask;
    const uint8_t *masks, *masks_t;  /* [nmask, bm, bn] and its transpose [nmask, bn, bm] */
    double scale;
    int64_t nops;
    const int64_t* op_kind;  /* 0: softcap, 1: alibi */
    const double* op_param;
    const float* slopes;
    int64_t q_pos0;
} Args;

int attn_fwd(const Args* a, int64_t* counter);
int attn_bwd(const Args* a, int64_t* counter, float* dq, int64_t kv0, int64_t kv1);
int attn_sum(const Args* a, int64_t* counter, float* dst, const float* bufs, int64_t nbuf, int64_t len,
             int64_t stride);
int attn_probs(const Args* a, int64_t* counter, int64_t nrows, const int64_t* qb, const int64_t* w,
               const int64_t* poff, const int64_t* cstart, const int64_t* cols, const int32_t* kind, float* p,
               int64_t psize, int64_t maxw);
int attn_apply(const Args* a, int64_t* counter, int64_t nrows, const int64_t* qb, const int64_t* w,
               const int64_t* poff, const int64_t* cstart, const int64_t* cols, const int32_t* kind, const float* p,
               int64_t psize);

#endif
