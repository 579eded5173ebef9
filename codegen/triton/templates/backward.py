"""Template: block-sparse flash-attention backward, deterministic (no atomics).

``_attn_bwd_dkdv``: one program owns TN keys of one (batch, kv head) and walks the transposed
(by key block) lists of every query head that shares the kv head -- full query blocks as
``[start, end)`` ranges, then the partial ones -- so dk/dv are summed in a fixed order.
``_attn_bwd_dq``: one program owns TM queries and walks the same ranges and lists as the
forward pass. Probabilities are recomputed from the saved log-sum-exp. The predicate sees absolute
query positions ``q_start + row`` (decoding, chunked prefill).
"""

import triton
import triton.language as tl

from common import LOG2E, _allowed, _score_mod, _score_mod_grad  # noqa: F401  (the generated file holds both parts)

# --- template body ---


@triton.jit
def _dkdv_tile(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptr, delta_ptr, start_m, offs_m0, offs_n, n_ok,
               d_ok, dv_ok, b, h, q_lo, k_lo, mask_tab, tile_id, bufs, buf_meta, qk_scale, q_len, q_start,
               stride_qm, stride_dom, sm_scale, sbuf, smeta, mbufs, mbuf_meta,
               BM: tl.constexpr, BN: tl.constexpr, MASKED: tl.constexpr, OPAQUE: tl.constexpr,
               DOT_PREC: tl.constexpr, SCORE_MOD: tl.constexpr):
    offs_m = start_m + offs_m0  # [TM]
    m_ok = offs_m < q_len
    q = tl.load(q_ptrs + offs_m[:, None] * stride_qm, mask=m_ok[:, None] & d_ok[None, :], other=0.0)  # [TM, D]
    do = tl.load(do_ptrs + offs_m[:, None] * stride_dom, mask=m_ok[:, None] & dv_ok[None, :], other=0.0)  # [TM, DV]
    lse = tl.load(lse_ptr + offs_m, mask=m_ok, other=0.0)  # [TM]
    delta = tl.load(delta_ptr + offs_m, mask=m_ok, other=0.0)  # [TM]
    lse2 = tl.where(lse == float("-inf"), 0.0, lse * LOG2E)
    if SCORE_MOD:  # transposed tile: q_idx [1, TM], kv_idx [TN, 1]
        raw_t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * sm_scale
        pos_t = (q_start + offs_m)[None, :]
        s_t = _score_mod(raw_t, b, h, pos_t, offs_n[:, None], sbuf, smeta, mbufs, mbuf_meta) * LOG2E
        dmod_t = _score_mod_grad(raw_t, b, h, pos_t, offs_n[:, None], sbuf, smeta, mbufs, mbuf_meta)
    else:
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale  # [TN, TM]
    ok = m_ok[:, None] & n_ok[None, :]  # [TM, TN]
    if MASKED:
        ok = ok & _allowed(b, h, q_start + offs_m[:, None], offs_n[None, :], q_start + q_lo, k_lo, mask_tab,
                           tile_id, bufs, buf_meta, BM, BN, OPAQUE)
    ok_t = tl.trans(ok.to(tl.int8)) != 0  # [TN, TM]
    p_t = tl.where(ok_t, tl.exp2(s_t - lse2[None, :]), 0.0)  # [TN, TM]
    dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PREC)
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)  # [TN, TM]
    ds_t = p_t * (dp_t - delta[None, :])
    if SCORE_MOD:
        ds_t = tl.where(ok_t, ds_t * dmod_t, 0.0)  # masked edges: no gradient, even a NaN weight's
    dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PREC)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, DO, DK, DV, Lse, Delta,
    q_num, q_idx, full_nr, full_rng, mask_ids,  # transposed: partial [Bm, Hm, NKB(, PW)], ranges [.., RW, 2]
    mask_tab, bufs, buf_meta,
    sbuf, smeta, mbufs, mbuf_meta,
    sm_scale,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    H, Hkv, G, Bm, Hm, NKB, PW, RW, q_len, kv_len, head_dim, v_dim,
    q_start,  # absolute position of query row 0: runtime, not constexpr
    BM: tl.constexpr, BN: tl.constexpr, TM: tl.constexpr, TN: tl.constexpr,
    D_PAD: tl.constexpr, DV_PAD: tl.constexpr, OPAQUE: tl.constexpr, DOT_PREC: tl.constexpr,
    SCORE_MOD: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hkv
    kh = pid_bh % Hkv
    col = pid_n * TN // BN  # layout column of this tile
    k_lo = col * BN

    offs_n = pid_n * TN + tl.arange(0, TN)
    offs_m0 = tl.arange(0, TM)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    d_ok = offs_d < head_dim
    dv_ok = offs_dv < v_dim
    n_ok = offs_n < kv_len

    kv_off = b.to(tl.int64) * stride_kb + kh.to(tl.int64) * stride_kh
    k = tl.load(K + kv_off + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # [TN, D]
    vv_off = b.to(tl.int64) * stride_vb + kh.to(tl.int64) * stride_vh
    v = tl.load(V + vv_off + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                mask=n_ok[:, None] & dv_ok[None, :], other=0.0)  # [TN, DV]
    qk_scale = sm_scale * LOG2E
    dk = tl.zeros([TN, D_PAD], dtype=tl.float32)
    dv = tl.zeros([TN, DV_PAD], dtype=tl.float32)

    for g in range(0, G):  # query heads sharing this kv head, in a fixed order
        h = kh * G + g
        lay = ((b % Bm) * Hm + h % Hm) * NKB + col
        q_ptrs = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + offs_d[None, :] * stride_qd
        do_ptrs = DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh + offs_dv[None, :] * stride_dod
        lse_ptr = Lse + (b * H + h).to(tl.int64) * q_len
        delta_ptr = Delta + (b * H + h).to(tl.int64) * q_len
        n_rng = tl.load(full_nr + lay)
        for j in range(0, n_rng):
            r_at = full_rng + (lay.to(tl.int64) * RW + j) * 2
            r0 = tl.load(r_at)
            r1 = tl.load(r_at + 1)
            for start_m in range(r0 * BM, r1 * BM, TM):
                dk, dv = _dkdv_tile(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptr, delta_ptr, start_m,
                                    offs_m0, offs_n, n_ok, d_ok, dv_ok, b, h, start_m, k_lo, mask_tab, 0,
                                    bufs, buf_meta, qk_scale, q_len, q_start, stride_qm, stride_dom,
                                    sm_scale, sbuf, smeta, mbufs, mbuf_meta,
                                    BM, BN, False, OPAQUE, DOT_PREC, SCORE_MOD)
        n_part = tl.load(q_num + lay)
        for j in range(0, n_part):
            r = tl.load(q_idx + lay.to(tl.int64) * PW + j)
            tile_id = tl.load(mask_ids + lay.to(tl.int64) * PW + j)
            for t in tl.static_range(BM // TM):
                dk, dv = _dkdv_tile(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptr, delta_ptr, r * BM + t * TM,
                                    offs_m0, offs_n, n_ok, d_ok, dv_ok, b, h, r * BM, k_lo, mask_tab, tile_id,
                                    bufs, buf_meta, qk_scale, q_len, q_start, stride_qm, stride_dom,
                                    sm_scale, sbuf, smeta, mbufs, mbuf_meta,
                                    BM, BN, True, OPAQUE, DOT_PREC, SCORE_MOD)

    dk = dk * sm_scale
    # DK/DV are contiguous copies shaped like K/V.
    dk_off = (b * Hkv + kh).to(tl.int64) * kv_len * head_dim
    tl.store(DK + dk_off + offs_n[:, None] * head_dim + offs_d[None, :], dk.to(DK.dtype.element_ty),
             mask=n_ok[:, None] & d_ok[None, :])
    dv_off = (b * Hkv + kh).to(tl.int64) * kv_len * v_dim
    tl.store(DV + dv_off + offs_n[:, None] * v_dim + offs_dv[None, :], dv.to(DV.dtype.element_ty),
             mask=n_ok[:, None] & dv_ok[None, :])


@triton.jit
def _dq_tile(dq, q, do, lse2, delta, k_ptrs, v_ptrs, start_n, pos_m, offs_n0, m_ok, d_ok, dv_ok,
             b, h, q_lo, k_lo, mask_tab, tile_id, bufs, buf_meta, qk_scale, kv_len,
             stride_kn, stride_vn, sm_scale, sbuf, smeta, mbufs, mbuf_meta,
             BM: tl.constexpr, BN: tl.constexpr, MASKED: tl.constexpr, OPAQUE: tl.constexpr,
             DOT_PREC: tl.constexpr, SCORE_MOD: tl.constexpr):
    offs_n = start_n + offs_n0  # [TN]
    n_ok = offs_n < kv_len
    k = tl.load(k_ptrs + offs_n[:, None] * stride_kn, mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # [TN, D]
    v = tl.load(v_ptrs + offs_n[:, None] * stride_vn, mask=n_ok[:, None] & dv_ok[None, :], other=0.0)  # [TN, DV]
    if SCORE_MOD:
        raw = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * sm_scale
        s = _score_mod(raw, b, h, pos_m[:, None], offs_n[None, :], sbuf, smeta, mbufs, mbuf_meta) * LOG2E
        dmod = _score_mod_grad(raw, b, h, pos_m[:, None], offs_n[None, :], sbuf, smeta, mbufs, mbuf_meta)
    else:
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # [TM, TN]
    ok = m_ok[:, None] & n_ok[None, :]
    if MASKED:
        ok = ok & _allowed(b, h, pos_m[:, None], offs_n[None, :], q_lo, k_lo, mask_tab, tile_id,
                           bufs, buf_meta, BM, BN, OPAQUE)
    p = tl.where(ok, tl.exp2(s - lse2[:, None]), 0.0)  # [TM, TN]
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)  # [TM, TN]
    ds = p * (dp - delta[:, None])
    if SCORE_MOD:
        ds = tl.where(ok, ds * dmod, 0.0)
    dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
    return dq


@triton.jit
def _attn_bwd_dq(
    Q, K, V, DO, DQ, Lse, Delta,
    kv_num, kv_idx, full_nr, full_rng, mask_ids,  # partial [Bm, Hm, NQB(, PW)], ranges [.., RW, 2] int32
    mask_tab, bufs, buf_meta,
    sbuf, smeta, mbufs, mbuf_meta,
    sm_scale,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    H, G, Bm, Hm, NQB, PW, RW, q_len, kv_len, head_dim, v_dim,
    q_start,  # absolute position of query row 0: runtime, not constexpr
    BM: tl.constexpr, BN: tl.constexpr, TM: tl.constexpr, TN: tl.constexpr,
    D_PAD: tl.constexpr, DV_PAD: tl.constexpr, OPAQUE: tl.constexpr, DOT_PREC: tl.constexpr,
    SCORE_MOD: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    kh = h // G
    row = pid_m * TM // BM
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

    q = tl.load(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
                + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)  # [TM, D]
    do = tl.load(DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
                 + offs_m[:, None] * stride_dom + offs_dv[None, :] * stride_dod,
                 mask=m_ok[:, None] & dv_ok[None, :], other=0.0)  # [TM, DV]
    lse = tl.load(Lse + pid_bh.to(tl.int64) * q_len + offs_m, mask=m_ok, other=0.0)
    delta = tl.load(Delta + pid_bh.to(tl.int64) * q_len + offs_m, mask=m_ok, other=0.0)
    lse2 = tl.where(lse == float("-inf"), 0.0, lse * LOG2E)
    k_ptrs = K + b.to(tl.int64) * stride_kb + kh.to(tl.int64) * stride_kh + offs_d[None, :] * stride_kd
    v_ptrs = V + b.to(tl.int64) * stride_vb + kh.to(tl.int64) * stride_vh + offs_dv[None, :] * stride_vd
    qk_scale = sm_scale * LOG2E
    dq = tl.zeros([TM, D_PAD], dtype=tl.float32)

    n_rng = tl.load(full_nr + lay)
    for j in range(0, n_rng):
        r_at = full_rng + (lay.to(tl.int64) * RW + j) * 2
        c0 = tl.load(r_at)
        c1 = tl.load(r_at + 1)
        for start_n in range(c0 * BN, c1 * BN, TN):
            dq = _dq_tile(dq, q, do, lse2, delta, k_ptrs, v_ptrs, start_n, pos_m, offs_n0, m_ok,
                          d_ok, dv_ok, b, h, q_start + q_lo, start_n, mask_tab, 0, bufs, buf_meta, qk_scale, kv_len,
                          stride_kn, stride_vn, sm_scale, sbuf, smeta, mbufs, mbuf_meta,
                          BM, BN, False, OPAQUE, DOT_PREC, SCORE_MOD)
    n_part = tl.load(kv_num + lay)
    for j in range(0, n_part):
        c = tl.load(kv_idx + lay.to(tl.int64) * PW + j)
        tile_id = tl.load(mask_ids + lay.to(tl.int64) * PW + j)
        for t in tl.static_range(BN // TN):
            dq = _dq_tile(dq, q, do, lse2, delta, k_ptrs, v_ptrs, c * BN + t * TN, pos_m, offs_n0, m_ok,
                          d_ok, dv_ok, b, h, q_start + q_lo, c * BN, mask_tab, tile_id, bufs, buf_meta, qk_scale,
                          kv_len, stride_kn, stride_vn, sm_scale, sbuf, smeta, mbufs, mbuf_meta,
                          BM, BN, True, OPAQUE, DOT_PREC, SCORE_MOD)

    dq = dq * sm_scale
    dq_off = pid_bh.to(tl.int64) * q_len * head_dim
    tl.store(DQ + dq_off + offs_m[:, None] * head_dim + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])
