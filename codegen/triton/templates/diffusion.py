"""Template: the stored-P kernels of attention diffusion (Diffuser) over a BCSR layout.

P is stored per layout block: ``P[bh, blk]`` is a ``[BM, BN]`` tile, ``blk`` the block's position
in the layout's CSR order. The layout arrays are one group's (every (batch, head) in ``bh_ids``
shares them): ``row_ptr [NQB + 1]``, ``cols [NNZ]``, ``part [NNZ]`` (partial-block id, -1 for
a full block) and the transposed lists ``col_ptr [NKB + 1]``, ``t_rows [NNZ]``, ``t_blk [NNZ]``.
All kernels compute in float32 on ``[BH, L, X]`` operands; layout blocks are the kernel tiles.

* ``_diff_probs``: P = row-softmax of ``scale q k^T`` (two passes over the row: max and sum,
  then the normalized tile is written), masked by the rendered predicate on partial blocks.
* ``_diff_hop``: ``out = beta * P z + gamma * v`` (block-sparse SpMM, axpby fused in the epilogue).
* ``_diff_hop_dz``: ``dz = beta P^T g`` per key block, over the transposed lists.
* ``_diff_hop_dp``: ``dP = beta g z^T`` on the layout's blocks only.
* ``_diff_probs_dq``: ``dS = P * (dP - rowsum(P * dP))`` (written over dP) and ``dq = scale dS k``.
* ``_diff_probs_dk``: ``dk = scale dS^T q`` per key block, over the transposed lists.
"""

import triton
import triton.language as tl

from common import LOG2E, _allowed  # noqa: F401  (the generated file holds both parts)

# --- template body ---


@triton.jit
def _diff_block_ptrs(P, bh_slot, blk, NNZ, BM: tl.constexpr, BN: tl.constexpr):
    # [BM, BN] pointers of stored block `blk` of the (batch, head) in slot `bh_slot`.
    rm = tl.arange(0, BM)
    rn = tl.arange(0, BN)
    base = (bh_slot.to(tl.int64) * NNZ + blk) * (BM * BN)
    return P + base + rm[:, None] * BN + rn[None, :]


@triton.jit
def _diff_scores(q, K, bh, n, pid_m, tile, b, h, stride_kh, stride_kn, offs_m, offs_d, L, head_dim, qk_scale,
                 mask_tab, bufs, buf_meta,
                 BM: tl.constexpr, BN: tl.constexpr, OPAQUE: tl.constexpr, DOT_PREC: tl.constexpr):
    # Scores of one block in log2 units, -inf off the pattern (and past the sequence end).
    offs_n = n * BN + tl.arange(0, BN)
    n_ok = offs_n < L
    k = tl.load(K + bh.to(tl.int64) * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :],
                mask=n_ok[:, None] & (offs_d[None, :] < head_dim), other=0.0)  # [BN, D]
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # [BM, BN]
    ok = _allowed(b, h, offs_m[:, None], offs_n[None, :], pid_m * BM, n * BN, mask_tab, tl.maximum(tile, 0),
                  bufs, buf_meta, BM, BN, OPAQUE)
    ok = (ok | (tile < 0)) & n_ok[None, :]
    return tl.where(ok, s, float("-inf"))


@triton.jit
def _diff_probs(Q, K, P, bh_ids, row_ptr, cols, part, mask_tab, bufs, buf_meta, sm_scale,
                stride_qh, stride_qm, stride_kh, stride_kn, H, NNZ, L, head_dim,
                BM: tl.constexpr, BN: tl.constexpr, D_PAD: tl.constexpr,
                OPAQUE: tl.constexpr, DOT_PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    slot = tl.program_id(1)
    bh = tl.load(bh_ids + slot)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, D_PAD)
    q = tl.load(Q + bh.to(tl.int64) * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=(offs_m[:, None] < L) & (offs_d[None, :] < head_dim), other=0.0)  # [BM, D]
    qk_scale = sm_scale * LOG2E
    start = tl.load(row_ptr + pid_m)
    end = tl.load(row_ptr + pid_m + 1)
    m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    for blk in range(start, end):  # pass 1: row max and sum
        s = _diff_scores(q, K, bh, tl.load(cols + blk), pid_m, tl.load(part + blk), b, h, stride_kh, stride_kn,
                         offs_m, offs_d, L, head_dim, qk_scale, mask_tab, bufs, buf_meta, BM, BN, OPAQUE, DOT_PREC)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet: exp2 gives 0
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
        m_i = m_new
    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    inv_l = tl.where(l_i > 0, 1.0 / tl.where(l_i > 0, l_i, 1.0), 0.0)  # rows with no key: a zero row of P
    for blk in range(start, end):  # pass 2: the normalized tiles
        s = _diff_scores(q, K, bh, tl.load(cols + blk), pid_m, tl.load(part + blk), b, h, stride_kh, stride_kn,
                         offs_m, offs_d, L, head_dim, qk_scale, mask_tab, bufs, buf_meta, BM, BN, OPAQUE, DOT_PREC)
        p = tl.exp2(s - m_safe[:, None]) * inv_l[:, None]
        tl.store(_diff_block_ptrs(P, slot, blk, NNZ, BM, BN), p)


@triton.jit
def _diff_hop(P, Z, V, Out, bh_ids, row_ptr, cols, beta, gamma,
              stride_zh, stride_zm, stride_vh, stride_vm, stride_oh, stride_om, NNZ, L, v_dim,
              BM: tl.constexpr, BN: tl.constexpr, DV_PAD: tl.constexpr, DOT_PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    slot = tl.program_id(1)
    bh = tl.load(bh_ids + slot).to(tl.int64)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_v = tl.arange(0, DV_PAD)
    v_ok = offs_v < v_dim
    acc = tl.zeros([BM, DV_PAD], dtype=tl.float32)
    for blk in range(tl.load(row_ptr + pid_m), tl.load(row_ptr + pid_m + 1)):
        offs_n = tl.load(cols + blk) * BN + tl.arange(0, BN)
        p = tl.load(_diff_block_ptrs(P, slot, blk, NNZ, BM, BN))  # [BM, BN]
        z = tl.load(Z + bh * stride_zh + offs_n[:, None] * stride_zm + offs_v[None, :],
                    mask=(offs_n[:, None] < L) & v_ok[None, :], other=0.0)  # [BN, DV]
        acc += tl.dot(p, z, input_precision=DOT_PREC)
    row_ok = (offs_m[:, None] < L) & v_ok[None, :]
    v = tl.load(V + bh * stride_vh + offs_m[:, None] * stride_vm + offs_v[None, :], mask=row_ok, other=0.0)
    tl.store(Out + bh * stride_oh + offs_m[:, None] * stride_om + offs_v[None, :], beta * acc + gamma * v, mask=row_ok)


@triton.jit
def _diff_hop_dz(P, G, dZ, bh_ids, col_ptr, t_rows, t_blk, beta,
                 stride_gh, stride_gm, stride_dh, stride_dm, NNZ, L, v_dim,
                 BM: tl.constexpr, BN: tl.constexpr, DV_PAD: tl.constexpr, DOT_PREC: tl.constexpr):
    pid_n = tl.program_id(0)
    slot = tl.program_id(1)
    bh = tl.load(bh_ids + slot).to(tl.int64)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_v = tl.arange(0, DV_PAD)
    v_ok = offs_v < v_dim
    acc = tl.zeros([BN, DV_PAD], dtype=tl.float32)
    for j in range(tl.load(col_ptr + pid_n), tl.load(col_ptr + pid_n + 1)):
        offs_m = tl.load(t_rows + j) * BM + tl.arange(0, BM)
        p = tl.load(_diff_block_ptrs(P, slot, tl.load(t_blk + j), NNZ, BM, BN))  # [BM, BN]
        g = tl.load(G + bh * stride_gh + offs_m[:, None] * stride_gm + offs_v[None, :],
                    mask=(offs_m[:, None] < L) & v_ok[None, :], other=0.0)  # [BM, DV]
        acc += tl.dot(tl.trans(p), g, input_precision=DOT_PREC)
    tl.store(dZ + bh * stride_dh + offs_n[:, None] * stride_dm + offs_v[None, :], beta * acc,
             mask=(offs_n[:, None] < L) & v_ok[None, :])


@triton.jit
def _diff_hop_dp(G, Z, dP, bh_ids, row_ptr, cols, beta,
                 stride_gh, stride_gm, stride_zh, stride_zm, NNZ, L, v_dim,
                 BM: tl.constexpr, BN: tl.constexpr, DV_PAD: tl.constexpr, DOT_PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    slot = tl.program_id(1)
    bh = tl.load(bh_ids + slot).to(tl.int64)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_v = tl.arange(0, DV_PAD)
    v_ok = offs_v < v_dim
    g = tl.load(G + bh * stride_gh + offs_m[:, None] * stride_gm + offs_v[None, :],
                mask=(offs_m[:, None] < L) & v_ok[None, :], other=0.0)  # [BM, DV]
    for blk in range(tl.load(row_ptr + pid_m), tl.load(row_ptr + pid_m + 1)):
        offs_n = tl.load(cols + blk) * BN + tl.arange(0, BN)
        z = tl.load(Z + bh * stride_zh + offs_n[:, None] * stride_zm + offs_v[None, :],
                    mask=(offs_n[:, None] < L) & v_ok[None, :], other=0.0)  # [BN, DV]
        dp = tl.dot(g, tl.trans(z), input_precision=DOT_PREC) * beta  # [BM, BN]
        tl.store(_diff_block_ptrs(dP, slot, blk, NNZ, BM, BN), dp)


@triton.jit
def _diff_probs_dq(P, dP, K, dQ, bh_ids, row_ptr, cols, sm_scale,
                   stride_kh, stride_kn, stride_dh, stride_dm, NNZ, L, head_dim,
                   BM: tl.constexpr, BN: tl.constexpr, D_PAD: tl.constexpr, DOT_PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    slot = tl.program_id(1)
    bh = tl.load(bh_ids + slot).to(tl.int64)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < head_dim
    start = tl.load(row_ptr + pid_m)
    end = tl.load(row_ptr + pid_m + 1)
    delta = tl.zeros([BM], dtype=tl.float32)
    for blk in range(start, end):  # rowsum(P * dP) over the whole row
        delta += tl.sum(tl.load(_diff_block_ptrs(P, slot, blk, NNZ, BM, BN))
                        * tl.load(_diff_block_ptrs(dP, slot, blk, NNZ, BM, BN)), 1)
    acc = tl.zeros([BM, D_PAD], dtype=tl.float32)
    for blk in range(start, end):
        ptrs = _diff_block_ptrs(dP, slot, blk, NNZ, BM, BN)
        p = tl.load(_diff_block_ptrs(P, slot, blk, NNZ, BM, BN))
        ds = p * (tl.load(ptrs) - delta[:, None])  # [BM, BN] softmax backward
        tl.store(ptrs, ds)  # dS replaces dP: the dk kernel reads it
        offs_n = tl.load(cols + blk) * BN + tl.arange(0, BN)
        k = tl.load(K + bh * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :],
                    mask=(offs_n[:, None] < L) & d_ok[None, :], other=0.0)  # [BN, D]
        acc += tl.dot(ds, k, input_precision=DOT_PREC)
    tl.store(dQ + bh * stride_dh + offs_m[:, None] * stride_dm + offs_d[None, :], acc * sm_scale,
             mask=(offs_m[:, None] < L) & d_ok[None, :])


@triton.jit
def _diff_probs_dk(dS, Q, dK, bh_ids, col_ptr, t_rows, t_blk, sm_scale,
                   stride_qh, stride_qm, stride_dh, stride_dm, NNZ, L, head_dim,
                   BM: tl.constexpr, BN: tl.constexpr, D_PAD: tl.constexpr, DOT_PREC: tl.constexpr):
    pid_n = tl.program_id(0)
    slot = tl.program_id(1)
    bh = tl.load(bh_ids + slot).to(tl.int64)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < head_dim
    acc = tl.zeros([BN, D_PAD], dtype=tl.float32)
    for j in range(tl.load(col_ptr + pid_n), tl.load(col_ptr + pid_n + 1)):
        offs_m = tl.load(t_rows + j) * BM + tl.arange(0, BM)
        ds = tl.load(_diff_block_ptrs(dS, slot, tl.load(t_blk + j), NNZ, BM, BN))  # [BM, BN]
        q = tl.load(Q + bh * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                    mask=(offs_m[:, None] < L) & d_ok[None, :], other=0.0)  # [BM, D]
        acc += tl.dot(tl.trans(ds), q, input_precision=DOT_PREC)
    tl.store(dK + bh * stride_dh + offs_n[:, None] * stride_dm + offs_d[None, :], acc * sm_scale,
             mask=(offs_n[:, None] < L) & d_ok[None, :])
