"""Template: helpers shared by the generated attention kernels.

Valid Triton as it stands. The renderer keeps everything after the ``template body`` marker
and replaces the ``_predicate`` stub between the ``predicate`` markers with the helper rendered
from the pattern's index expression.
"""

import triton
import triton.language as tl

# --- template body ---
# Compiled kernels may read only constexpr globals.
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _floordiv_pos(a, b):
    # Python floor division by b > 0 from C's truncating // and % (Triton's, on GPU and in the
    # interpreter): one step down where the remainder is negative. No intermediate leaves the
    # range of the operands, so int32 operands never overflow.
    r = a % b
    return tl.where(r < 0, a // b - 1, a // b)


@triton.jit
def _mod_pos(a, b):
    # Python modulo by b > 0: the result lies in [0, b).
    r = a % b
    return tl.where(r < 0, r + b, r)


@triton.jit
def _floordiv(a, b):
    # Python floor division by a runtime divisor of either sign: truncation, then one step down
    # where the remainder and the divisor differ in sign.
    r = a % b
    return tl.where((r != 0) & ((r < 0) != (b < 0)), a // b - 1, a // b)


@triton.jit
def _mod(a, b):
    # Python modulo: the result takes the sign of the divisor.
    r = a % b
    return tl.where((r != 0) & ((r < 0) != (b < 0)), r + b, r)


@triton.jit
def _load_buf(bufs, buf_meta, I: tl.constexpr, idx, fill):
    # buffer I of the pattern (a runtime int64 table; buf_meta holds its offset and length),
    # reading `fill` outside the table, as Load does in the expression IR.
    off = tl.load(buf_meta + 2 * I)
    n = tl.load(buf_meta + 2 * I + 1)
    inside = (idx >= 0) & (idx < n)
    val = tl.load(bufs + off + tl.where(inside, idx, 0), mask=inside, other=fill)
    return tl.where(inside, val, fill)


@triton.jit
def _sload(sbuf, smeta, I: tl.constexpr, idx):
    # captured float tensor I of the score_mod, flattened (smeta holds offset, length, strides);
    # reads outside it give 0 (padding rows and keys only: the host checks the index bounds).
    off = tl.load(smeta + 6 * I)
    n = tl.load(smeta + 6 * I + 1)
    inside = (idx >= 0) & (idx < n)
    return tl.load(sbuf + off + tl.where(inside, idx, 0), mask=inside, other=0.0)


@triton.jit
def _tanh(x):
    # tanh from exp of a non-positive argument: no overflow for large |x| (softcap's logits)
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


# --- score_mod ---
@triton.jit
def _score_mod(s, b, h, q_idx, kv_idx, sbuf, smeta, bufs, buf_meta):
    # Stub replaced by the rendered score_mod (natural-log units, applied before the mask).
    return s


@triton.jit
def _score_mod_grad(s, b, h, q_idx, kv_idx, sbuf, smeta, bufs, buf_meta):
    # Stub replaced by d score_mod / d score.
    return s * 0.0 + 1.0
# --- end score_mod ---


# --- predicate ---
@triton.jit
def _predicate(b, h, q_idx, kv_idx, bufs, buf_meta):
    # Stub replaced by the rendered pattern predicate: q_idx [TM, 1], kv_idx [1, TN].
    return q_idx >= kv_idx
# --- end predicate ---


@triton.jit
def _allowed(b, h, q_idx, kv_idx, q_lo, k_lo, mask_tab, tile_id, bufs, buf_meta,
             BM: tl.constexpr, BN: tl.constexpr, OPAQUE: tl.constexpr):
    # Which (q, kv) pairs of a partial block are visible: the rendered predicate, or for
    # opaque mask_mods the block's byte mask computed when the layout was built.
    if OPAQUE:
        tab = mask_tab + tile_id.to(tl.int64) * (BM * BN)
        bits = tl.load(tab + (q_idx - q_lo) * BN + (kv_idx - k_lo))
        return bits != 0
    else:
        return _predicate(b, h, q_idx, kv_idx, bufs, buf_meta)
