"""The peers a benchmark compares against: PyTorch SDPA with a dense mask and FlexAttention.

Also the pattern helpers they need: the exact count of allowed (q, k) pairs (for useful
GFLOP/s) and a FlexAttention ``mask_mod`` made from a pattern.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..dsl.pattern import Family, Pattern, PerHead

CREATE_BLOCK_MASK_BYTES_PER_PAIR = 24  # measured peak of create_block_mask on CPU, per (q, k) pair


def allowed_pairs(pattern: Pattern, q_len: int, kv_len: int, *, batch: int = 1, heads: int = 1,
                  block: int = 64) -> int | None:
    """Allowed (q, k) pairs summed over all ``batch * heads`` entries (exact), or None when the
    pattern is not a mask (its work is not a set of pairs)."""
    if pattern.family != Family.MASK:
        return None
    lay = pattern.layout(q_len, kv_len, block, batch=batch, heads=heads)
    gi = lay.group_index.reshape(-1)
    per_entry = sum(lay.groups[i].allowed_pairs() for i in gi)
    return per_entry * (batch * heads) // len(gi)  # group_index broadcasts over unvaried dims


def flex_mask_mod(pattern: Pattern, q_len: int, kv_len: int, device="cpu") -> tuple[Callable, str]:
    """A FlexAttention ``mask_mod`` for a mask pattern and a note on how it was made.

    Traced patterns use :func:`attncompiler.ir.transform.to_mask_mod` (plain torch ops, compiles
    cleanly); per-head patterns select their parts with ``torch.where`` on ``h``; opaque ones
    call ``pattern.evaluate``.
    """
    from ..ir.transform import to_mask_mod

    from ..ir.expr import Const

    e = pattern.predicate(q_len, kv_len)
    if isinstance(e, Const):  # full() / ~full(): a tensor, since FlexAttention vmaps the mask_mod
        keep = bool(e.value)
        return (lambda b, h, q_idx, kv_idx: ((q_idx >= 0) & (kv_idx >= 0)) == keep), f"constant {keep}"
    if e is not None:
        return to_mask_mod(e, device), "traced predicate (expr.to_mask_mod)"
    if isinstance(pattern, PerHead) and all(p.predicate(q_len, kv_len) is not None for p in pattern.patterns):
        mods = [to_mask_mod(p.predicate(q_len, kv_len), device) for p in pattern.patterns]
        n = len(mods)

        def per_head_mod(b, h, q_idx, kv_idx):
            out = mods[0](b, h, q_idx, kv_idx)
            for i in range(1, n):
                out = torch.where(h % n == i, mods[i](b, h, q_idx, kv_idx), out)
            return out

        return per_head_mod, "per-head traced predicates selected by h"
    return (lambda b, h, q_idx, kv_idx: pattern.evaluate(b, h, q_idx, kv_idx, q_len, kv_len),
            "pattern.evaluate (opaque mask_mod)")


def setup_sdpa(pattern, q, k, v, cap, calls, skipped, progress) -> None:
    """Put an SDPA call for ``pattern`` in ``calls`` (a dense bool mask unless causal or full), or the
    reason in ``skipped`` when that mask would exceed ``cap`` bytes."""
    from ..dsl.pattern import Causal
    from ..dsl.primitives import Full
    from ..program.reference import dense_masks

    if isinstance(pattern, (Causal, Full)):  # SDPA's own (flash) path: no mask tensor
        is_causal = isinstance(pattern, Causal)
        calls["sdpa"] = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
        return
    B, H, L, _ = q.shape
    Bm = B if pattern.batch_dependent else 1
    Hm = 1 if pattern.head_period == 1 else H
    need = Bm * Hm * L * L  # bool bytes of the dense mask
    if need > cap:
        skipped["sdpa"] = (f"dense mask would take {need / 2**30:.2f} GiB > cap {cap / 2**30:.2f} GiB "
                           "(raise it with --mask-cap-gb)")
        return
    progress("building the dense mask for SDPA")
    mask = dense_masks(pattern, B, H, L, L, q.device)  # [Bm, Hm, L, L]
    sdpa = torch.nn.functional.scaled_dot_product_attention
    calls["sdpa"] = lambda: sdpa(q, k, v, attn_mask=mask)


def setup_flex(pattern, q, k, v, block, how, cap, calls, skipped, progress) -> str:
    """Put a compiled FlexAttention call with a ``block``-token BlockMask in ``calls``, or the reason in
    ``skipped``; returns a note on how the BlockMask was built, for the description."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as e:
        skipped["flex"] = f"FlexAttention is not available in torch {torch.__version__}: {e}"
        return ""
    B, H, L, _ = q.shape
    Bm = B if pattern.batch_dependent else 1
    Hm = 1 if pattern.head_period == 1 else H
    if how == "create" and Bm * Hm * L * L * CREATE_BLOCK_MASK_BYTES_PER_PAIR > cap:
        how = "layout"
        note = (f" (create_block_mask would need about {Bm * Hm * L * L * CREATE_BLOCK_MASK_BYTES_PER_PAIR / 2**30:.1f}"
                f" GiB > block mask cap {cap / 2**30:g} GiB)")
    else:
        note = ""
    progress(f"building FlexAttention's BlockMask ({how})")
    try:
        if how == "create":
            mod, how_mod = flex_mask_mod(pattern, L, L, q.device)
            bm = create_block_mask(mod, Bm if Bm > 1 else None, Hm if Hm > 1 else None, L, L, device=q.device,
                                   BLOCK_SIZE=block)
            note = f"; BlockMask from create_block_mask, mask_mod = {how_mod}" + note
        else:
            bm = pattern.layout(L, L, block, batch=B, heads=H).to_block_mask()
            if q.device.type != "cpu":
                bm = bm.to(q.device)
            note = "; BlockMask from our layout.to_block_mask()" + note
    except Exception as e:
        skipped["flex"] = f"BlockMask construction failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        return note
    flex = torch.compile(flex_attention)
    calls["flex"] = lambda: flex(q, k, v, block_mask=bm)
    return note
