"""Template: block-sparse flash-attention forward (online softmax over a BCSR layout).

One program computes TM query rows of one (batch, head). It walks the full key blocks of its
layout row -- a few ``[start, end)`` ranges of key blocks, so a causal row is one range however
long -- without any mask work, then the partial blocks through ``_allowed``, which sees absolute
query positions ``q_start + row`` (``q_lo`` too, so byte-mask offsets stay local). Layout blocks
(BM x BN) are cut into kernel tiles (TM x TN) that divide them.
"""

import triton
import triton.language as tl

from common import LN2, LOG2E, _allowed, _score_mod  # noqa: F401  (the generated file holds both parts)

# --- template body ---


@triton.jit
def _fwd_tile(acc, m_i, l_i, q, k_ptrs, v_ptrs, start_n, pos_m, offs_n0, d_ok, dv_ok,
              b, h, q_lo, k_lo, mask_tab, tile_id, bufs, buf_meta, qk_scale, kv_len,
              stride_kn, stride_vn, sm_scale, sbuf, smeta, mbufs, mbuf_meta,
              BM: tl.constexpr, BN: tl.constexpr, MASKED: tl.constexpr, EVEN_N: tl.constexpr,
              OPAQUE: tl.constexpr, DOT_PREC: tl.constexpr, SCORE_MOD: tl.constexpr):
    offs_n = start_n + offs_n0  # [TN]
    n_ok = offs_n < kv_len
    k = tl.load(k_ptrs + offs_n[:, None] * stride_kn, mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # [TN, D]
    if SCORE_MOD:  # edge weights on the scaled score (natural units), before the mask
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * sm_scale
        s = _score_mod(s, b, h, pos_m[:, None], offs_n[None, :], sbuf, smeta, mbufs, mbuf_meta) * LOG2E
    else:
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # [TM, TN], log2 units
    if MASKED:
        ok = _allowed(b, h, pos_m[:, None], offs_n[None, :], q_lo, k_lo, mask_tab, tile_id,
                      bufs, buf_meta, BM, BN, OPAQUE)
        s = tl.where(ok & n_ok[None, :], s, float("-inf"))
    elif not EVEN_N:
        s = tl.where(n_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))  # [TM]
    # Rows that have seen no visible key yet keep m = -inf; shift by 0 so exp2 gives 0, not NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])  # [TM, TN]
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_ptrs + offs_n[:, None] * stride_vn, mask=n_ok[:, None] & dv_ok[None, :], other=0.0)  # [TN, DV]
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return acc, m_new, l_i


@triton.jit
def _attn_fwd(
    Q, K, V, Out, Lse,
    kv_num, kv_idx, full_nr, full_rng, mask_ids,  # partial [Bm, Hm, NQB(, PW)], ranges [.., RW, 2] int32
    mask_tab, bufs, buf_meta,  # opaque byte masks; predicate buffers
    sbuf, smeta, mbufs, mbuf_meta,  # score_mod: captured float tensors, its integer tables
    sm_scale,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    H, G, Bm, Hm, NQB, PW, RW, q_len, kv_len, head_dim, v_dim,
    q_start,  # absolute position of query row 0 (decoding, chunked prefill): runtime, not constexpr
    BM: tl.constexpr, BN: tl.constexpr, TM: tl.constexpr, TN: tl.constexpr,
    D_PAD: tl.constexpr, DV_PAD: tl.constexpr, EVEN_N: tl.constexpr,
    OPAQUE: tl.constexpr, DOT_PREC: tl.constexpr, SCORE_MOD: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    kh = h // G  # GQA: G query heads share one key/value head
    row = pid_m * TM // BM  # layout row of this tile
    q_lo = row * BM
    lay = ((b % Bm) * Hm + h % Hm) * NQB + row

    offs_m = pid_m * TM + tl.arange(0, TM)
    offs_n0 = tl.arange(0, TN)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    d_ok = offs_d < head_dim
    dv_ok = offs_dv < v_dim
    m_ok = offs_m < q_len
    pos_m = q_start + offs_m  # absolute query positions: what the predicate sees

    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)  # [TM, D]
    k_ptrs = K + b.to(tl.int64) * stride_kb + kh.to(tl.int64) * stride_kh + offs_d[None, :] * stride_kd
    v_ptrs = V + b.to(tl.int64) * stride_vb + kh.to(tl.int64) * stride_vh + offs_dv[None, :] * stride_vd
    qk_scale = sm_scale * LOG2E

    acc = tl.zeros([TM, DV_PAD], dtype=tl.float32)
    m_i = tl.full([TM], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([TM], dtype=tl.float32)

    # Full blocks: each range [c0, c1) of key blocks, tile by tile, no predicate.
    n_rng = tl.load(full_nr + lay)
    for j in range(0, n_rng):
        r_at = full_rng + (lay.to(tl.int64) * RW + j) * 2
        c0 = tl.load(r_at)
        c1 = tl.load(r_at + 1)
        for start_n in range(c0 * BN, c1 * BN, TN):
            acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, k_ptrs, v_ptrs, start_n, pos_m, offs_n0,
                                      d_ok, dv_ok, b, h, q_start + q_lo, start_n, mask_tab, 0, bufs, buf_meta,
                                      qk_scale, kv_len, stride_kn, stride_vn,
                                      sm_scale, sbuf, smeta, mbufs, mbuf_meta,
                                      BM, BN, False, EVEN_N, OPAQUE, DOT_PREC, SCORE_MOD)
    # Partial blocks: the predicate decides element by element.
    n_part = tl.load(kv_num + lay)
    for j in range(0, n_part):
        c = tl.load(kv_idx + lay.to(tl.int64) * PW + j)
        tile_id = tl.load(mask_ids + lay.to(tl.int64) * PW + j)
        for t in tl.static_range(BN // TN):
            acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, k_ptrs, v_ptrs, c * BN + t * TN, pos_m, offs_n0,
                                      d_ok, dv_ok, b, h, q_start + q_lo, c * BN, mask_tab, tile_id, bufs, buf_meta,
                                      qk_scale, kv_len, stride_kn, stride_vn,
                                      sm_scale, sbuf, smeta, mbufs, mbuf_meta,
                                      BM, BN, True, EVEN_N, OPAQUE, DOT_PREC, SCORE_MOD)

    # Rows with no visible key: output zeros and log-sum-exp -inf.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.log2(l_safe)) * LN2)
    o_base = Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    tl.store(o_base + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od,
             out.to(Out.dtype.element_ty), mask=m_ok[:, None] & dv_ok[None, :])
    tl.store(Lse + pid_bh.to(tl.int64) * q_len + offs_m, lse, mask=m_ok)


@triton.jit
def _attn_fwd_split(
    Q, K, V, OutP, LseP,  # partials: OutP [NS, B*H, q_len, v_dim] float32, LseP [NS, B*H, q_len] float32
    kv_num, kv_idx, full_nr, full_rng, mask_ids,
    mask_tab, bufs, buf_meta,
    sbuf, smeta, mbufs, mbuf_meta,
    sm_scale,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    H, G, Bm, Hm, NQB, PW, RW, q_len, kv_len, head_dim, v_dim,
    q_start,
    CH,  # key blocks per chunk: program (m, bh, s) walks blocks [s * CH, (s + 1) * CH) of its row
    BM: tl.constexpr, BN: tl.constexpr, TM: tl.constexpr, TN: tl.constexpr,
    D_PAD: tl.constexpr, DV_PAD: tl.constexpr, EVEN_N: tl.constexpr,
    OPAQUE: tl.constexpr, DOT_PREC: tl.constexpr, SCORE_MOD: tl.constexpr,
):
    # Split-K (flash-decoding): the row's key blocks, full ranges first then partial blocks, are
    # numbered 0.. and cut into chunks of CH; each program writes its chunk's normalized output
    # and log-sum-exp (-inf for a chunk that sees no key), merged on the host through the lse.
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    kh = h // G
    row = pid_m * TM // BM
    q_lo = row * BM
    lay = ((b % Bm) * Hm + h % Hm) * NQB + row
    lo = pid_s * CH
    hi = lo + CH

    offs_m = pid_m * TM + tl.arange(0, TM)
    offs_n0 = tl.arange(0, TN)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    d_ok = offs_d < head_dim
    dv_ok = offs_dv < v_dim
    m_ok = offs_m < q_len
    pos_m = q_start + offs_m

    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    k_ptrs = K + b.to(tl.int64) * stride_kb + kh.to(tl.int64) * stride_kh + offs_d[None, :] * stride_kd
    v_ptrs = V + b.to(tl.int64) * stride_vb + kh.to(tl.int64) * stride_vh + offs_dv[None, :] * stride_vd
    qk_scale = sm_scale * LOG2E

    acc = tl.zeros([TM, DV_PAD], dtype=tl.float32)
    m_i = tl.full([TM], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([TM], dtype=tl.float32)

    # Full ranges: range j holds blocks [base, base + c1 - c0) of the numbering; walk its overlap with the chunk.
    n_rng = tl.load(full_nr + lay)
    base = lo * 0
    for j in range(0, n_rng):
        r_at = full_rng + (lay.to(tl.int64) * RW + j) * 2
        c0 = tl.load(r_at)
        c1 = tl.load(r_at + 1)
        a0 = tl.maximum(c0, c0 + lo - base)
        a1 = tl.minimum(c1, c0 + hi - base)
        for start_n in range(a0 * BN, a1 * BN, TN):
            acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, k_ptrs, v_ptrs, start_n, pos_m, offs_n0,
                                      d_ok, dv_ok, b, h, q_start + q_lo, start_n, mask_tab, 0, bufs, buf_meta,
                                      qk_scale, kv_len, stride_kn, stride_vn,
                                      sm_scale, sbuf, smeta, mbufs, mbuf_meta,
                                      BM, BN, False, EVEN_N, OPAQUE, DOT_PREC, SCORE_MOD)
        base += c1 - c0
    # Partial blocks: entries [base, base + n_part) of the numbering.
    n_part = tl.load(kv_num + lay)
    p0 = tl.maximum(lo - base, 0)
    p1 = tl.minimum(hi - base, n_part)
    for j in range(p0, p1):
        c = tl.load(kv_idx + lay.to(tl.int64) * PW + j)
        tile_id = tl.load(mask_ids + lay.to(tl.int64) * PW + j)
        for t in tl.static_range(BN // TN):
            acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, k_ptrs, v_ptrs, c * BN + t * TN, pos_m, offs_n0,
                                      d_ok, dv_ok, b, h, q_start + q_lo, c * BN, mask_tab, tile_id, bufs, buf_meta,
                                      qk_scale, kv_len, stride_kn, stride_vn,
                                      sm_scale, sbuf, smeta, mbufs, mbuf_meta,
                                      BM, BN, True, EVEN_N, OPAQUE, DOT_PREC, SCORE_MOD)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.log2(l_safe)) * LN2)
    part = pid_s.to(tl.int64) * tl.num_programs(1) + pid_bh
    o_base = OutP + part * q_len * v_dim
    tl.store(o_base + offs_m[:, None] * v_dim + offs_dv[None, :], out, mask=m_ok[:, None] & dv_ok[None, :])
    tl.store(LseP + part * q_len + offs_m, lse, mask=m_ok)
