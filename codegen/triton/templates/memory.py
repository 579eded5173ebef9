"""Template: ABC memory-slot kernels (SlotWrite chunked prefix scan, SlotRead, backward).

Valid Triton as it stands; the renderer keeps everything after the ``template body`` marker.
Nothing here depends on the pattern or the sequence length: chunk size, head dims and slot
count are ``tl.constexpr``. Tensors (all contiguous, prepared by ``triton_memory``):

* ``K [BHkv, Lk, D]``, ``V [BHkv, Lk, DV]``, ``W [BHkv, Lk, NS]`` (control logits, or raw
  weights when not NORMALIZED), ``Q``/``Out``/``DO`` ``[BH, Lq, *]``.
* Per chunk c of C tokens: ``Mc [BHkv, N, NS]`` the chunk's own logit max, ``R [BHkv, N, NS]``
  the running max up to and including chunk c (the chunk's reference), ``Loc``/``State``
  ``[BHkv, N, NS, F]`` with ``F = D + DV + 1`` columns ``[keys | values | normalizer Z]``:
  the chunk's own sums relative to ``Mc`` and the memory entering the chunk relative to ``R``.
* ``Final [BHkv, NS, F]``: the memory after every token, relative to ``R[:, N - 1]``.

Write weights relative to a reference are ``e = exp(w - R) <= 1``; they are recomputed from
``W`` and ``R`` wherever needed instead of being stored.
"""

import triton
import triton.language as tl

# --- template body ---


@triton.jit
def _mem_weights(W, R, bh, c, N, pos, key_ok, ss,
                 NS: tl.constexpr, NORMALIZED: tl.constexpr):
    # e [BC, BN]: a chunk's write weights relative to its reference R_c (0 for padding).
    slot_ok = ss < NS
    m = key_ok[:, None] & slot_ok[None, :]
    ptr = W + pos[:, None].to(tl.int64) * NS + ss[None, :]  # W: this kv head's [Lk, NS] rows
    if NORMALIZED:
        w = tl.load(ptr, mask=m, other=float("-inf")).to(tl.float32)
        r = tl.load(R + (bh * N + c).to(tl.int64) * NS + ss, mask=slot_ok, other=0.0)
        r = tl.where(r == float("-inf"), 0.0, r)  # a slot with nothing written yet: every w is -inf
        return tl.exp(w - r[None, :])
    else:
        return tl.load(ptr, mask=m, other=0.0).to(tl.float32)


@triton.jit
def _mem_chunk_sums(K, V, W, Loc, Mc, Lk, N,
                    C: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, NS: tl.constexpr,
                    BC: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, BN: tl.constexpr,
                    NORMALIZED: tl.constexpr, DOT_PREC: tl.constexpr):
    # SlotWrite, parallel part: one program per (chunk, batch * kv head) sums its chunk,
    # e^T [k | v | 1] relative to the chunk's own max (so every e <= 1).
    c = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    F: tl.constexpr = D + DV + 1
    rows = tl.arange(0, BC)
    dd = tl.arange(0, BD)
    dv = tl.arange(0, BDV)
    ss = tl.arange(0, BN)
    pos = c * C + rows
    ok = (rows < C) & (pos < Lk)
    slot_ok = ss < NS
    k = tl.load(K + bh * Lk * D + pos[:, None] * D + dd[None, :], mask=ok[:, None] & (dd[None, :] < D),
                other=0.0).to(tl.float32)  # [BC, BD]
    v = tl.load(V + bh * Lk * DV + pos[:, None] * DV + dv[None, :], mask=ok[:, None] & (dv[None, :] < DV),
                other=0.0).to(tl.float32)  # [BC, BDV]
    wp = W + bh * Lk * NS + pos[:, None] * NS + ss[None, :]
    wm = ok[:, None] & slot_ok[None, :]
    cb = (bh * N + c) * NS
    if NORMALIZED:
        w = tl.load(wp, mask=wm, other=float("-inf")).to(tl.float32)  # [BC, BN]
        m = tl.max(w, axis=0)  # [BN]; -inf: no token of this chunk goes to the slot
        e = tl.exp(w - tl.where(m == float("-inf"), 0.0, m)[None, :])
        tl.store(Mc + cb + ss, m, mask=slot_ok)
    else:
        e = tl.load(wp, mask=wm, other=0.0).to(tl.float32)
    et = tl.trans(e)  # [BN, BC]
    lk = tl.dot(et, k, input_precision=DOT_PREC)  # [BN, BD]
    lv = tl.dot(et, v, input_precision=DOT_PREC)  # [BN, BDV]
    lz = tl.sum(e, axis=0)  # [BN]
    base = Loc + cb * F + ss[:, None] * F
    tl.store(base + dd[None, :], lk, mask=slot_ok[:, None] & (dd[None, :] < D))
    tl.store(base + D + dv[None, :], lv, mask=slot_ok[:, None] & (dv[None, :] < DV))
    tl.store(Loc + cb * F + ss * F + (F - 1), lz, mask=slot_ok)


@triton.jit
def _mem_scan(Loc, Mc, State, R, Final, N,
              F: tl.constexpr, NS: tl.constexpr, BN: tl.constexpr, BF: tl.constexpr,
              NORMALIZED: tl.constexpr, STORE_STATE: tl.constexpr):
    # SlotWrite, sequential part: one program per (batch * kv head, column tile) carries the
    # [NS, BF] state across chunks with running log-sum-exp rescaling (factors <= 1).
    bh = tl.program_id(0).to(tl.int64)
    ft = tl.program_id(1)
    ss = tl.arange(0, BN)
    ff = ft * BF + tl.arange(0, BF)
    slot_ok = ss < NS
    msk = slot_ok[:, None] & (ff[None, :] < F)
    acc = tl.zeros([BN, BF], dtype=tl.float32)
    r = tl.full([BN], float("-inf"), tl.float32)
    for c in range(N):
        cb = (bh * N + c) * NS
        loc = tl.load(Loc + cb * F + ss[:, None] * F + ff[None, :], mask=msk, other=0.0)
        if NORMALIZED:
            mc = tl.load(Mc + cb + ss, mask=slot_ok, other=float("-inf"))
            rn = tl.maximum(r, mc)
            rs = tl.where(rn == float("-inf"), 0.0, rn)
            acc = acc * tl.exp(r - rs)[:, None]  # rescale to the new reference (0 while empty)
            tl.store(R + cb + ss, rn, mask=slot_ok & ((ss * 0 + ft) == 0))  # one column tile writes R
            if STORE_STATE:
                tl.store(State + cb * F + ss[:, None] * F + ff[None, :], acc, mask=msk)
            acc = acc + loc * tl.exp(mc - rs)[:, None]
            r = rn
        else:
            if STORE_STATE:
                tl.store(State + cb * F + ss[:, None] * F + ff[None, :], acc, mask=msk)
            acc = acc + loc
    tl.store(Final + bh * NS * F + ss[:, None] * F + ff[None, :], acc, mask=msk)


@triton.jit
def _mem_slot_softmax(u, z, slot_ok, NORMALIZED: tl.constexpr, MAY_BE_EMPTY: tl.constexpr):
    # Softmax over slots of u / Z (empty slots, Z == 0, left out) -> (s, p, P = p / Z, zs, lse, ok).
    ok = slot_ok
    if NORMALIZED:
        if MAY_BE_EMPTY:
            ok = ok & (z > 0)
        zs = tl.where(z > 0, z, 1.0)
        s = u / zs
    else:
        zs = tl.zeros_like(u) + 1.0
        s = u
    s = tl.where(ok, s, float("-inf"))
    m = tl.max(s, axis=1)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    p = tl.exp(s - m_safe[:, None])
    l = tl.sum(p, axis=1)
    l_safe = tl.where(l > 0, l, 1.0)
    p = p / l_safe[:, None]
    lse = tl.where(l > 0, m_safe + tl.log(l_safe), float("-inf"))
    return tl.where(ok, s, 0.0), p, p / zs, zs, lse, ok


@triton.jit
def _mem_read_causal(Q, K, V, W, R, State, Out, Lse, scale, Lr, Lk, N, H, G,
                     C: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, NS: tl.constexpr,
                     BC: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, BN: tl.constexpr,
                     NORMALIZED: tl.constexpr, MAY_BE_EMPTY: tl.constexpr, DOT_PREC: tl.constexpr):
    # Causal SlotRead of one chunk for one query head: query i reads the memory entering the
    # chunk plus the chunk's tokens j <= i: (q S^T + tril(q k^T) e) / Z, a softmax over slots,
    # then (p / Z) S_v + tril((p / Z) e^T) v.
    c = tl.program_id(0)
    bq = tl.program_id(1)
    bk = ((bq // H) * (H // G) + (bq % H) // G).to(tl.int64)
    bq = bq.to(tl.int64)
    F: tl.constexpr = D + DV + 1
    rows = tl.arange(0, BC)
    dd = tl.arange(0, BD)
    dv = tl.arange(0, BDV)
    ss = tl.arange(0, BN)
    pos = c * C + rows
    row_ok = (rows < C) & (pos < Lr)
    key_ok = (rows < C) & (pos < Lk)
    slot_ok = ss < NS
    q = tl.load(Q + bq * Lr * D + pos[:, None] * D + dd[None, :], mask=row_ok[:, None] & (dd[None, :] < D),
                other=0.0).to(tl.float32) * scale  # [BC, BD]
    k = tl.load(K + bk * Lk * D + pos[:, None] * D + dd[None, :], mask=key_ok[:, None] & (dd[None, :] < D),
                other=0.0).to(tl.float32)
    v = tl.load(V + bk * Lk * DV + pos[:, None] * DV + dv[None, :], mask=key_ok[:, None] & (dv[None, :] < DV),
                other=0.0).to(tl.float32)
    e = _mem_weights(W + bk * Lk * NS, R, bk, c, N, pos, key_ok, ss, NS, NORMALIZED)  # [BC, BN]
    stb = State + (bk * N + c) * NS * F
    sk = tl.load(stb + ss[:, None] * F + dd[None, :], mask=slot_ok[:, None] & (dd[None, :] < D), other=0.0)
    sv = tl.load(stb + ss[:, None] * F + D + dv[None, :], mask=slot_ok[:, None] & (dv[None, :] < DV), other=0.0)
    zin = tl.load(stb + ss * F + (F - 1), mask=slot_ok, other=0.0)  # [BN]
    causal = rows[:, None] >= rows[None, :]
    a = tl.where(causal, tl.dot(q, tl.trans(k), input_precision=DOT_PREC), 0.0)  # [BC, BC]
    u = tl.dot(q, tl.trans(sk), input_precision=DOT_PREC) + tl.dot(a, e, input_precision=DOT_PREC)  # [BC, BN]
    z = zin[None, :] + tl.cumsum(e, axis=0)  # [BC, BN] each row's normalizers
    _s, _p, pz, _zs, lse, _ok = _mem_slot_softmax(u, z, slot_ok[None, :], NORMALIZED, MAY_BE_EMPTY)
    b = tl.where(causal, tl.dot(pz, tl.trans(e), input_precision=DOT_PREC), 0.0)  # [BC, BC]
    out = tl.dot(pz, sv, input_precision=DOT_PREC) + tl.dot(b, v, input_precision=DOT_PREC)  # [BC, BDV]
    tl.store(Out + bq * Lr * DV + pos[:, None] * DV + dv[None, :], out, mask=row_ok[:, None] & (dv[None, :] < DV))
    tl.store(Lse + bq * Lr + pos, lse, mask=row_ok)


@triton.jit
def _mem_read_full(Q, Final, Out, Lse, scale, Lq, H, G,
                   D: tl.constexpr, DV: tl.constexpr, NS: tl.constexpr,
                   BM: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, BN: tl.constexpr,
                   NORMALIZED: tl.constexpr, MAY_BE_EMPTY: tl.constexpr, DOT_PREC: tl.constexpr):
    # SlotRead of one complete memory (bidirectional, or causal queries past the last key).
    t = tl.program_id(0)
    bq = tl.program_id(1)
    bk = ((bq // H) * (H // G) + (bq % H) // G).to(tl.int64)
    bq = bq.to(tl.int64)
    F: tl.constexpr = D + DV + 1
    rows = t * BM + tl.arange(0, BM)
    dd = tl.arange(0, BD)
    dv = tl.arange(0, BDV)
    ss = tl.arange(0, BN)
    row_ok = rows < Lq
    slot_ok = ss < NS
    q = tl.load(Q + bq * Lq * D + rows[:, None] * D + dd[None, :], mask=row_ok[:, None] & (dd[None, :] < D),
                other=0.0).to(tl.float32) * scale
    fb = Final + bk * NS * F
    sk = tl.load(fb + ss[:, None] * F + dd[None, :], mask=slot_ok[:, None] & (dd[None, :] < D), other=0.0)
    sv = tl.load(fb + ss[:, None] * F + D + dv[None, :], mask=slot_ok[:, None] & (dv[None, :] < DV), other=0.0)
    z = tl.load(fb + ss * F + (F - 1), mask=slot_ok, other=0.0)
    u = tl.dot(q, tl.trans(sk), input_precision=DOT_PREC)  # [BM, BN]
    _s, _p, pz, _zs, lse, _ok = _mem_slot_softmax(u, z[None, :], slot_ok[None, :], NORMALIZED, MAY_BE_EMPTY)
    out = tl.dot(pz, sv, input_precision=DOT_PREC)
    tl.store(Out + bq * Lq * DV + rows[:, None] * DV + dv[None, :], out, mask=row_ok[:, None] & (dv[None, :] < DV))
    tl.store(Lse + bq * Lq + rows, lse, mask=row_ok)


@triton.jit
def _mem_softmax_bwd(dpz, s, p, pz, zs, ok, NORMALIZED: tl.constexpr):
    # Gradients through P = softmax(u / Z) / Z: -> (dU, dZ) given dP.
    if NORMALIZED:
        dp = dpz / zs
        ds = p * (dp - tl.sum(p * dp, axis=1)[:, None])
        du = ds / zs
        dz = tl.where(ok, -(dpz * pz + ds * s) / zs, 0.0)
    else:
        du = p * (dpz - tl.sum(p * dpz, axis=1)[:, None])
        dz = tl.zeros_like(du)
    return du, dz


@triton.jit
def _mem_read_causal_bwd(Q, K, V, W, R, State, DO, DQ, DK, DV_, DW, DState, scale, Lr, Lk, N, H, G,
                         C: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, NS: tl.constexpr,
                         BC: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, BN: tl.constexpr,
                         NORMALIZED: tl.constexpr, MAY_BE_EMPTY: tl.constexpr, DOT_PREC: tl.constexpr):
    # Backward of the causal read for one chunk and one kv head; its G query heads are summed
    # in the loop, so dk, dv, dw and d(state) need no atomics. Recomputes the forward.
    c = tl.program_id(0)
    bk_i = tl.program_id(1)
    bk = bk_i.to(tl.int64)
    Hkv = H // G
    F: tl.constexpr = D + DV + 1
    rows = tl.arange(0, BC)
    dd = tl.arange(0, BD)
    dv = tl.arange(0, BDV)
    ss = tl.arange(0, BN)
    pos = c * C + rows
    row_ok = (rows < C) & (pos < Lr)
    key_ok = (rows < C) & (pos < Lk)
    slot_ok = ss < NS
    qm = row_ok[:, None] & (dd[None, :] < D)
    km = key_ok[:, None] & (dd[None, :] < D)
    vm = key_ok[:, None] & (dv[None, :] < DV)
    k = tl.load(K + bk * Lk * D + pos[:, None] * D + dd[None, :], mask=km, other=0.0).to(tl.float32)
    v = tl.load(V + bk * Lk * DV + pos[:, None] * DV + dv[None, :], mask=vm, other=0.0).to(tl.float32)
    e = _mem_weights(W + bk * Lk * NS, R, bk, c, N, pos, key_ok, ss, NS, NORMALIZED)  # [BC, BN]
    stb = State + (bk * N + c) * NS * F
    sk = tl.load(stb + ss[:, None] * F + dd[None, :], mask=slot_ok[:, None] & (dd[None, :] < D), other=0.0)
    sv = tl.load(stb + ss[:, None] * F + D + dv[None, :], mask=slot_ok[:, None] & (dv[None, :] < DV), other=0.0)
    zin = tl.load(stb + ss * F + (F - 1), mask=slot_ok, other=0.0)
    z = zin[None, :] + tl.cumsum(e, axis=0)
    causal = rows[:, None] >= rows[None, :]
    dk = tl.zeros([BC, BD], dtype=tl.float32)
    dvv = tl.zeros([BC, BDV], dtype=tl.float32)
    de = tl.zeros([BC, BN], dtype=tl.float32)
    dsk = tl.zeros([BN, BD], dtype=tl.float32)
    dsv = tl.zeros([BN, BDV], dtype=tl.float32)
    dzin = tl.zeros([BN], dtype=tl.float32)
    b0 = bk_i // Hkv
    h0 = (bk_i % Hkv) * G
    for g in range(G):
        bq = (b0 * H + h0 + g).to(tl.int64)
        q = tl.load(Q + bq * Lr * D + pos[:, None] * D + dd[None, :], mask=qm, other=0.0).to(tl.float32) * scale
        do = tl.load(DO + bq * Lr * DV + pos[:, None] * DV + dv[None, :], mask=row_ok[:, None] & (dv[None, :] < DV),
                     other=0.0).to(tl.float32)
        a = tl.where(causal, tl.dot(q, tl.trans(k), input_precision=DOT_PREC), 0.0)  # [BC, BC]
        u = tl.dot(q, tl.trans(sk), input_precision=DOT_PREC) + tl.dot(a, e, input_precision=DOT_PREC)
        s, p, pz, zs, _lse, ok = _mem_slot_softmax(u, z, slot_ok[None, :], NORMALIZED, MAY_BE_EMPTY)
        dov = tl.where(causal, tl.dot(do, tl.trans(v), input_precision=DOT_PREC), 0.0)  # [BC, BC] do_i . v_j
        dpz = tl.dot(do, tl.trans(sv), input_precision=DOT_PREC) + tl.dot(dov, e, input_precision=DOT_PREC)
        du, dz = _mem_softmax_bwd(dpz, s, p, pz, zs, ok, NORMALIZED)
        bmat = tl.where(causal, tl.dot(pz, tl.trans(e), input_precision=DOT_PREC), 0.0)  # [BC, BC]
        dvv += tl.dot(tl.trans(bmat), do, input_precision=DOT_PREC)
        de += tl.dot(tl.trans(dov), pz, input_precision=DOT_PREC) + tl.dot(tl.trans(a), du, input_precision=DOT_PREC)
        if NORMALIZED:
            dz = tl.where(row_ok[:, None], dz, 0.0)
            de += tl.cumsum(dz, axis=0, reverse=True)  # Z_i sums e_j over j <= i
            dzin += tl.sum(dz, axis=0)
        dsv += tl.dot(tl.trans(pz), do, input_precision=DOT_PREC)
        dsk += tl.dot(tl.trans(du), q, input_precision=DOT_PREC)
        da = tl.where(causal, tl.dot(du, tl.trans(e), input_precision=DOT_PREC), 0.0)  # [BC, BC]
        dq = tl.dot(du, sk, input_precision=DOT_PREC) + tl.dot(da, k, input_precision=DOT_PREC)
        tl.store(DQ + bq * Lr * D + pos[:, None] * D + dd[None, :], dq * scale, mask=qm)
        dk += tl.dot(tl.trans(da), q, input_precision=DOT_PREC)
    if NORMALIZED:
        de = de * e  # e = exp(w - R) with R held constant
    tl.store(DK + bk * Lk * D + pos[:, None] * D + dd[None, :], dk, mask=km)
    tl.store(DV_ + bk * Lk * DV + pos[:, None] * DV + dv[None, :], dvv, mask=vm)
    tl.store(DW + bk * Lk * NS + pos[:, None] * NS + ss[None, :], de, mask=key_ok[:, None] & slot_ok[None, :])
    db = DState + (bk * N + c) * NS * F
    tl.store(db + ss[:, None] * F + dd[None, :], dsk, mask=slot_ok[:, None] & (dd[None, :] < D))
    tl.store(db + ss[:, None] * F + D + dv[None, :], dsv, mask=slot_ok[:, None] & (dv[None, :] < DV))
    tl.store(db + ss * F + (F - 1), dzin, mask=slot_ok)


@triton.jit
def _mem_read_full_bwd(Q, Final, DO, DQ, DFinal, scale, Lq, H, G, NBK,
                       D: tl.constexpr, DV: tl.constexpr, NS: tl.constexpr,
                       BM: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, BN: tl.constexpr,
                       NORMALIZED: tl.constexpr, MAY_BE_EMPTY: tl.constexpr, DOT_PREC: tl.constexpr):
    # Backward of a read of one complete memory for a tile of queries of one kv head's G query
    # heads: dq, and this tile's partial d(final) [NS, F] (summed over tiles by the caller).
    t = tl.program_id(0)
    bk_i = tl.program_id(1)
    bk = bk_i.to(tl.int64)
    Hkv = H // G
    F: tl.constexpr = D + DV + 1
    rows = t * BM + tl.arange(0, BM)
    dd = tl.arange(0, BD)
    dv = tl.arange(0, BDV)
    ss = tl.arange(0, BN)
    row_ok = rows < Lq
    slot_ok = ss < NS
    qm = row_ok[:, None] & (dd[None, :] < D)
    fb = Final + bk * NS * F
    sk = tl.load(fb + ss[:, None] * F + dd[None, :], mask=slot_ok[:, None] & (dd[None, :] < D), other=0.0)
    sv = tl.load(fb + ss[:, None] * F + D + dv[None, :], mask=slot_ok[:, None] & (dv[None, :] < DV), other=0.0)
    z = tl.load(fb + ss * F + (F - 1), mask=slot_ok, other=0.0)
    dsk = tl.zeros([BN, BD], dtype=tl.float32)
    dsv = tl.zeros([BN, BDV], dtype=tl.float32)
    dzin = tl.zeros([BN], dtype=tl.float32)
    b0 = bk_i // Hkv
    h0 = (bk_i % Hkv) * G
    for g in range(G):
        bq = (b0 * H + h0 + g).to(tl.int64)
        q = tl.load(Q + bq * Lq * D + rows[:, None] * D + dd[None, :], mask=qm, other=0.0).to(tl.float32) * scale
        do = tl.load(DO + bq * Lq * DV + rows[:, None] * DV + dv[None, :], mask=row_ok[:, None] & (dv[None, :] < DV),
                     other=0.0).to(tl.float32)
        u = tl.dot(q, tl.trans(sk), input_precision=DOT_PREC)
        s, p, pz, zs, _lse, ok = _mem_slot_softmax(u, z[None, :], slot_ok[None, :], NORMALIZED, MAY_BE_EMPTY)
        dpz = tl.dot(do, tl.trans(sv), input_precision=DOT_PREC)
        du, dz = _mem_softmax_bwd(dpz, s, p, pz, zs, ok, NORMALIZED)
        dsv += tl.dot(tl.trans(pz), do, input_precision=DOT_PREC)
        dsk += tl.dot(tl.trans(du), q, input_precision=DOT_PREC)
        if NORMALIZED:
            dzin += tl.sum(tl.where(row_ok[:, None], dz, 0.0), axis=0)
        dq = tl.dot(du, sk, input_precision=DOT_PREC)
        tl.store(DQ + bq * Lq * D + rows[:, None] * D + dd[None, :], dq * scale, mask=qm)
    db = DFinal + (t.to(tl.int64) * NBK + bk) * NS * F  # DFinal [tiles, BHkv, NS, F]
    tl.store(db + ss[:, None] * F + dd[None, :], dsk, mask=slot_ok[:, None] & (dd[None, :] < D))
    tl.store(db + ss[:, None] * F + D + dv[None, :], dsv, mask=slot_ok[:, None] & (dv[None, :] < DV))
    tl.store(db + ss * F + (F - 1), dzin, mask=slot_ok)


@triton.jit
def _mem_scan_bwd(GState, GFinal, R, GLoc, N,
                  F: tl.constexpr, NS: tl.constexpr, BN: tl.constexpr, BF: tl.constexpr,
                  NORMALIZED: tl.constexpr, HAS_GSTATE: tl.constexpr):
    # SlotWrite backward, sequential part: the reverse chunk scan. GLoc[c] is the gradient of
    # chunk c's sums relative to its reference R_c; state_c = (state_{c-1} + loc_{c-1}) d_{c-1}.
    bh = tl.program_id(0).to(tl.int64)
    ft = tl.program_id(1)
    ss = tl.arange(0, BN)
    ff = ft * BF + tl.arange(0, BF)
    slot_ok = ss < NS
    msk = slot_ok[:, None] & (ff[None, :] < F)
    ga = tl.load(GFinal + bh * NS * F + ss[:, None] * F + ff[None, :], mask=msk, other=0.0)
    for i in range(N):
        c = N - 1 - i
        cb = (bh * N + c) * NS
        tl.store(GLoc + cb * F + ss[:, None] * F + ff[None, :], ga, mask=msk)
        if HAS_GSTATE:
            ga += tl.load(GState + cb * F + ss[:, None] * F + ff[None, :], mask=msk, other=0.0)
        if NORMALIZED:
            r = tl.load(R + cb + ss, mask=slot_ok, other=0.0)
            rp = tl.load(R + cb - NS + ss, mask=slot_ok & ((ss * 0 + c) > 0), other=float("-inf"))
            rs = tl.where(r == float("-inf"), 0.0, r)
            ga = ga * tl.exp(rp - rs)[:, None]  # d_{c-1} = exp(R_{c-1} - R_c); 0 before anything
    # (after c = 0 the carried gradient belongs to the empty initial state and is dropped)


@triton.jit
def _mem_write_bwd(K, V, W, R, GLoc, DK, DV_, DW, Lk, N,
                   C: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, NS: tl.constexpr,
                   BC: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, BN: tl.constexpr,
                   NORMALIZED: tl.constexpr, DOT_PREC: tl.constexpr):
    # SlotWrite backward, parallel part: chunk sums e^T [k | v | 1] -> dk, dv, dw per chunk.
    c = tl.program_id(0)
    bk = tl.program_id(1).to(tl.int64)
    F: tl.constexpr = D + DV + 1
    rows = tl.arange(0, BC)
    dd = tl.arange(0, BD)
    dv = tl.arange(0, BDV)
    ss = tl.arange(0, BN)
    pos = c * C + rows
    key_ok = (rows < C) & (pos < Lk)
    slot_ok = ss < NS
    km = key_ok[:, None] & (dd[None, :] < D)
    vm = key_ok[:, None] & (dv[None, :] < DV)
    k = tl.load(K + bk * Lk * D + pos[:, None] * D + dd[None, :], mask=km, other=0.0).to(tl.float32)
    v = tl.load(V + bk * Lk * DV + pos[:, None] * DV + dv[None, :], mask=vm, other=0.0).to(tl.float32)
    e = _mem_weights(W + bk * Lk * NS, R, bk, c, N, pos, key_ok, ss, NS, NORMALIZED)
    gb = GLoc + (bk * N + c) * NS * F
    gk = tl.load(gb + ss[:, None] * F + dd[None, :], mask=slot_ok[:, None] & (dd[None, :] < D), other=0.0)
    gv = tl.load(gb + ss[:, None] * F + D + dv[None, :], mask=slot_ok[:, None] & (dv[None, :] < DV), other=0.0)
    gz = tl.load(gb + ss * F + (F - 1), mask=slot_ok, other=0.0)
    de = (tl.dot(k, tl.trans(gk), input_precision=DOT_PREC) + tl.dot(v, tl.trans(gv), input_precision=DOT_PREC)
          + gz[None, :])  # [BC, BN]
    if NORMALIZED:
        de = de * e
    tl.store(DK + bk * Lk * D + pos[:, None] * D + dd[None, :], tl.dot(e, gk, input_precision=DOT_PREC), mask=km)
    tl.store(DV_ + bk * Lk * DV + pos[:, None] * DV + dv[None, :], tl.dot(e, gv, input_precision=DOT_PREC), mask=vm)
    tl.store(DW + bk * Lk * NS + pos[:, None] * NS + ss[None, :], de, mask=key_ok[:, None] & slot_ok[None, :])
