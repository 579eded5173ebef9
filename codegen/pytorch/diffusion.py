"""PyTorch stages of attention diffusion: P once over the block layout, then K SpMM hops.

How P is laid out (per 2-D layout, cached as a :class:`Plan`):

* **Band + others.** Most rows of a local graph read the key blocks ``r + dlo .. r + dlo + nb - 1``
  (the band: sliding and block windows). Those blocks are a strided view of the keys (or of
  ``z`` in a hop), padded with zero blocks at both ends so every row reads the same band: no
  gather. The remaining blocks of a row (random blocks, ...) are gathered, ``wo`` per row
  (rows are bucketed by how many they have; missing slots point at a zero block, masked),
  together with the global columns: the "rest" of the tile row.
* **Global tokens apart** (schedule flag ``split_globals``, :func:`split_global_tokens`): the
  rows ``q in G`` are one dense ``[|G|, L]`` softmax, the columns ``k in G`` ``|G|`` extra columns
  of every tile; only the remaining pairs go through the layout, so global tokens no longer
  drag whole blocks into every row. Each tile row ``[band | other blocks | global keys]`` gets one
  in-place softmax, so P is normalized over all its parts.
* **Masks** only on the rows that need them (edges, partial blocks, padding, global columns a
  row may not see), precomputed.

A hop is per (batch, head) one ``baddbmm_`` on the band view and one on the gathered rest
(other blocks and global keys: one token gather), accumulated into the output rows in place
after ``gamma * v``. On the CPU in float32 both the P stage and the hops run C kernels instead
(:mod:`.cpu_diffusion`) on the same stored layout. Backward (torch ops): a hop gives
``dz = beta P^T g`` (scatter-added per key block and rest row), ``dv = gamma g`` and
``dP = beta g z^T`` on the stored tiles; ``SparseProbs`` turns the summed ``dP`` into
``dS = P * (dP - rowsum(P * dP))`` in place and then into dq and dk.

GQA: keys and values are expanded to the query heads first (P differs per query head).

A score_mod (``ctx.extra["score_mod"]``) is applied to each tile's scaled scores before the mask
(:class:`~.diffusion_plan.TileMod`, positions from :func:`~.diffusion_plan.tile_positions`); P is then
computed here rather than by the C kernels (the hops keep them). Its backward recomputes the tile's
scores and runs the score_mod under autograd: ``dS`` through ``d score_mod / d score`` and the
captured tensors' gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attncompiler.dsl.score_mod import ScoreMod, captured_tensors, check_captured_grads, check_device, check_score_mod
from attncompiler.program.autograd_guard import single_backward
from attncompiler.families.diffusion.program import (Axpby, DiffusionHop, ExpandHeads, GlobalSplit, PassThrough,
                                                     SparseProbs, split_global_tokens)
from attncompiler.families.diffusion.reference import expand_heads
from attncompiler.layout.block_layout import BlockLayout
from attncompiler.program.schedule import Schedule

from ..cpu import diffusion as cpu_diffusion
from ..context import RunContext
from .common import compute_dtype_for
from .diffusion_plan import (Item, TileMod, as_blocks, band_view, chunk_rows, chunk_tile, dense_global_probs,
                             global_parts, items_for, padded_blocks, rest_rows, tile_mod, tile_positions)

# ---------------------------------------------------------------------------------------------
# P = rowsoftmax(scale q k^T)
# ---------------------------------------------------------------------------------------------

def _scores(a: torch.Tensor, b_t: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * a @ b_t`` into a fresh contiguous tensor (the scale rides on the gemm)."""
    out = torch.empty(a.shape[0], a.shape[1], b_t.shape[2], dtype=a.dtype, device=a.device)
    return out.baddbmm_(a, b_t, beta=0.0, alpha=scale)


def _mask_tile(tile: torch.Tensor, c) -> None:
    """Add the chunk's additive mask to the rows that need one (edges, partial blocks, globals)."""
    if c.patch is not None:
        sub = tile[:, c.patch_rows]
        sub += c.patch.to(device=tile.device, dtype=tile.dtype)
        tile[:, c.patch_rows] = sub


def _fill_scores(tile, plan, c, qr, kp, kr, bh: int, scale: float) -> None:
    """``tile [BH, R, BM, W] = scale * q . k`` of chunk ``c``'s band and rest columns."""
    nb = plan.nb
    for i in range(bh):
        # A gemm writing a column slice of the tile would fall back to one small gemm per
        # batch entry: each part gets its own contiguous product, then one cat.
        keys = ([band_view(kp, i, plan, c)] if nb else []) + ([kr[i]] if c.nr else [])
        if not keys:  # no key at all: a zero-width tile
            continue
        if len(keys) == 1:  # the tile is the product: no copy
            tile[i].baddbmm_(qr[i], keys[0].transpose(1, 2), beta=0.0, alpha=scale)
        else:
            torch.cat([_scores(qr[i], x.transpose(1, 2), scale) for x in keys], dim=-1, out=tile[i])


def _probs_forward(it: Item, split, q, k, scale, cdt, mod: TileMod | None = None):
    """``(P flat [bh * size], PG [bh, G, L] or None)`` of one item (the C kernels on CPU float32,
    except with a score_mod ``mod``, applied to the scaled scores before the mask)."""
    plan, bh = it.plan, it.bh
    if mod is None and cpu_diffusion.usable(plan, cdt, q.device):
        return cpu_diffusion.probs_forward(it, split, q.to(cdt), k.to(cdt), scale)
    g = plan.blocks.geom
    bm = g.block_m
    qb = as_blocks(q.to(cdt), g.nqb, bm)  # [BH, nqb, BM, D]
    kp = padded_blocks(k.to(cdt), plan)  # [BH, npad, BN, D]
    P = torch.empty(bh * plan.size, dtype=cdt, device=q.device)
    for c in plan.chunks:
        R, W = len(c.rows), plan.width(c)
        tile, qr = chunk_tile(P, plan, c, bh), chunk_rows(qb, c)  # [BH, R, BM, W], [BH, R, BM, D]
        _fill_scores(tile, plan, c, qr, kp, rest_rows(kp, c) if c.nr else None, bh, scale)
        if mod is not None:
            mod.apply(tile, *tile_positions(plan, c, q.device))
        _mask_tile(tile, c)
        torch.ops.aten._softmax.out(tile, -1, False, out=tile)
        if c.empty_tokens is not None:  # rows with no visible key: zeros, not softmax's NaN
            tile.view(bh, R * bm, W)[:, c.empty_tokens.to(q.device)] = 0.0
    return P, dense_global_probs(split, q.to(cdt), k.to(cdt), scale, bh, g.q_len, g.nqb, bm, mod)


def _probs_backward(it: Item, split, q, k, P, dP, PG, dPG, scale, cdt, mod: TileMod | None = None):
    """dq, dk of one item from ``dP`` (overwritten with dS); with a score_mod ``mod``, dS goes
    through it (scores recomputed) and its captured tensors' gradients accumulate in ``mod``."""
    plan, bh = it.plan, it.bh
    g = plan.blocks.geom
    bm, bn, nb, ng = g.block_m, g.block_n, plan.nb, plan.ng
    Bi, Hi, L, D = q.shape
    qs = q.to(cdt) * scale
    qb = as_blocks(qs, g.nqb, bm)
    kp = padded_blocks(k.to(cdt), plan)
    q_raw = as_blocks(q.to(cdt), g.nqb, bm) if mod is not None else None
    dq = torch.zeros(bh, g.nqb, bm, D, dtype=cdt, device=q.device)
    dkp = torch.zeros(bh * plan.npad, bn, D, dtype=cdt, device=q.device)
    dk_tok = dkp.view(-1, D)
    for c in plan.chunks:
        R = len(c.rows)
        p, ds = chunk_tile(P, plan, c, bh), chunk_tile(dP, plan, c, bh)
        ds.sub_((p * ds).sum(dim=-1, keepdim=True)).mul_(p)  # softmax backward, in place
        qr = chunk_rows(qb, c)
        kr = rest_rows(kp, c) if c.nr else None
        if mod is not None:  # d/d score through the score_mod, on the recomputed scores
            s = torch.empty_like(ds)
            _fill_scores(s, plan, c, chunk_rows(q_raw, c), kp, kr, bh, scale)
            ds.copy_(mod.vjp(s, ds, *tile_positions(plan, c, q.device)))
        acc = torch.zeros(bh, R, bm, D, dtype=cdt, device=q.device)
        for i in range(bh):
            d, a = ds[i], acc[i]
            if nb:
                a.baddbmm_(d[:, :, :nb * bn], band_view(kp, i, plan, c))
                t = torch.bmm(d[:, :, :nb * bn].transpose(1, 2), qr[i])  # [R, nb*BN, D]
                dkp.index_add_(0, i * plan.npad + c.band_index.to(q.device), t.reshape(-1, bn, D))
            if c.nr:
                a.baddbmm_(d[:, :, nb * bn:], kr[i])
                t = torch.bmm(d[:, :, nb * bn:].transpose(1, 2), qr[i])  # [R, nr, D]
                dk_tok.index_add_(0, i * plan.npad * bn + c.rest_index.to(q.device), t.reshape(-1, D))
        if c.q_slice is not None:
            dq[:, c.q_slice[0]:c.q_slice[1]] += acc
        else:
            dq.index_add_(1, c.q_index.to(q.device), acc)
    dk = dkp.view(bh, plan.npad, bn, D)[:, plan.pad_lo:plan.pad_lo + g.nkb].reshape(bh, -1, D)[:, :L].clone()
    dq = dq.view(bh, -1, D)[:, :L]
    if ng:
        G = global_parts(split, L, g.nqb, bm, str(q.device))[0]
        kf = k.to(cdt).reshape(bh, L, D)
        dsG = dPG.sub_((PG * dPG).sum(dim=-1, keepdim=True)).mul_(PG)  # [BH, G, L]
        if mod is not None:
            sG = torch.bmm(q.to(cdt).reshape(bh, L, D)[:, G], kf.transpose(1, 2)).mul_(scale)
            dsG = mod.vjp(sG, dsG, G.view(1, -1, 1), torch.arange(L, device=q.device).view(1, 1, -1))
        dq[:, G] += torch.bmm(dsG, kf)
        dk += torch.bmm(dsG.transpose(1, 2), qs.reshape(bh, L, D)[:, G])
    return (dq * scale).view(Bi, Hi, L, D), dk.view(Bi, Hi, L, D)  # q rows were already scaled


class _ProbsFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, items, split, scale, fn, q, k, *captured):
        cdt = compute_dtype_for(q.dtype)
        H = q.shape[1]
        outs = [t for it in items for t in _probs_forward(it, split, q[it.b, it.h], k[it.b, it.h], scale, cdt,
                                                          tile_mod(fn, it, H, q.device))]
        outs = [t if t is not None else q.new_zeros(0, dtype=cdt) for t in outs]
        ctx.items, ctx.split, ctx.scale, ctx.fn = items, split, scale, fn
        ctx.n_outs = len(outs)
        ctx.save_for_backward(q, k, *outs, *captured)
        return tuple(outs)

    @staticmethod
    @single_backward("Diffuser SparseProbs (torch backend)")
    def backward(ctx, *grads):
        q, k, *rest = ctx.saved_tensors
        outs, captured = rest[:ctx.n_outs], rest[ctx.n_outs:]
        cdt = compute_dtype_for(q.dtype)
        dq = torch.zeros(q.shape, dtype=cdt, device=q.device)
        dk = torch.zeros(k.shape, dtype=cdt, device=q.device)
        cgrads: dict[int, torch.Tensor] = {}
        for j, it in enumerate(ctx.items):
            P, PG = outs[2 * j], outs[2 * j + 1]
            dP, dPG = grads[2 * j], grads[2 * j + 1]
            if dP is None:
                continue
            if it.plan.ng and dPG is None:
                dPG = torch.zeros_like(PG)
            mod = tile_mod(ctx.fn, it, q.shape[1], q.device, captured, cgrads)
            a, b = _probs_backward(it, ctx.split, q[it.b, it.h], k[it.b, it.h], P, dP.contiguous(), PG,
                                   dPG.contiguous() if it.plan.ng else None, ctx.scale, cdt, mod)
            dq[it.b, it.h] = a
            dk[it.b, it.h] = b
        cg = [None if id(t) not in cgrads else cgrads[id(t)].to(t.dtype) for t in captured]
        return (None, None, None, None, dq.to(q.dtype), dk.to(k.dtype), *cg)


@dataclass(frozen=True, eq=False)
class BlockProbs:
    """The stored P: per item a flat buffer of its chunks' tiles and the dense global rows."""

    items: tuple[Item, ...]
    split: GlobalSplit | None
    tensors: tuple[torch.Tensor, ...]  # P_0, PG_0, P_1, PG_1, ... (PG empty without globals)
    scale: float


def sparse_probs(q, k, layout: BlockLayout, schedule: Schedule, scale: float, split: GlobalSplit | None = None,
                 score_mod=None) -> BlockProbs:
    """P of ``q [B,H,L,D]``, ``k [B,Hkv,L,D]`` over ``layout`` (of ``split.light`` when given),
    stored block-sparse (differentiable, also in the tensors ``score_mod`` captures): the
    row-softmax of ``score_mod(scale q k^T, b, h, i, j)`` plus the mask."""
    B, H, L = q.shape[:3]
    items = items_for(layout, schedule, B, H, split)
    k = expand_heads(k, H)
    captured = ()
    if score_mod is not None:
        captured = captured_tensors(check_score_mod(score_mod))
        check_device(captured, q.device, score_mod)
        if isinstance(score_mod, ScoreMod):
            score_mod.check(B, H, L, k.shape[2])
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, *captured)):
        if score_mod is not None:
            check_captured_grads(score_mod, captured, compute_dtype_for(q.dtype), q.device)
        tensors = _ProbsFn.apply(items, split, scale, score_mod, q, k, *captured)
    else:
        cdt = compute_dtype_for(q.dtype)
        tensors = [t for it in items for t in _probs_forward(it, split, q[it.b, it.h], k[it.b, it.h], scale, cdt,
                                                             tile_mod(score_mod, it, H, q.device))]
        tensors = tuple(t if t is not None else q.new_zeros(0, dtype=cdt) for t in tensors)
    return BlockProbs(items, split, tuple(tensors), scale)


# ---------------------------------------------------------------------------------------------
# Hops: z_out = beta P z + gamma v
# ---------------------------------------------------------------------------------------------

def _hop_forward(it: Item, split, P, PG, z, v, beta, gamma):
    """``beta P z + gamma v`` of one item (the C kernels on CPU float32)."""
    plan, bh = it.plan, it.bh
    if cpu_diffusion.usable(plan, z.dtype, z.device, z.shape[-1]):
        return cpu_diffusion.hop_forward(it, split, P, PG, z, v, beta, gamma)
    g = plan.blocks.geom
    bm, bn, nb, ng = g.block_m, g.block_n, plan.nb, plan.ng
    Bi, Hi, L, Dv = z.shape
    zp = padded_blocks(z, plan)  # [BH, npad, BN, Dv]
    vb = as_blocks(v, g.nqb, bm)  # [BH, nqb, BM, Dv]
    if nb:  # written as padded key blocks: the next hop reads it without a copy
        buf = torch.empty(bh, plan.npad, bm, Dv, dtype=z.dtype, device=z.device)
        buf[:, :plan.pad_lo].zero_()
        buf[:, plan.pad_lo + g.nqb:].zero_()
        out = buf[:, plan.pad_lo:plan.pad_lo + g.nqb]
    else:
        out = torch.empty(bh, g.nqb, bm, Dv, dtype=z.dtype, device=z.device)
    for c in plan.chunks:
        R = len(c.rows)
        tile = chunk_tile(P, plan, c, bh)
        dst = out[:, c.q_slice[0]:c.q_slice[1]] if c.q_slice is not None else torch.empty(
            bh, R, bm, Dv, dtype=z.dtype, device=z.device)
        zr = rest_rows(zp, c) if c.nr else None
        torch.mul(chunk_rows(vb, c), gamma, out=dst)  # then beta * P z accumulates in place (fused in the gemms)
        for i in range(bh):
            t, o = tile[i], dst[i]  # [R, BM, W], [R, BM, Dv]
            if nb:
                o.baddbmm_(t[:, :, :nb * bn], band_view(zp, i, plan, c), alpha=beta)
            if c.nr:
                o.baddbmm_(t[:, :, nb * bn:], zr[i], alpha=beta)
        if c.q_slice is None:
            out.index_copy_(1, c.q_index.to(z.device), dst)
    flat = out.view(bh, -1, Dv)
    if ng:  # the dense global rows (their tile rows are empty: gamma * v so far)
        G = global_parts(split, L, g.nqb, bm, str(z.device))[0]
        flat[:, G] += beta * torch.bmm(PG, z.reshape(bh, L, Dv))
    res = flat[:, :L].view(Bi, Hi, L, Dv)
    if nb:
        res._attnc_padded = (plan, buf)
    return res


def _hop_backward(it: Item, split, P, PG, z, gz, beta, need_dp: bool):
    """``dz = beta P^T gz`` and (``need_dp``) ``dP = beta gz z^T`` on the stored tiles."""
    plan, bh = it.plan, it.bh
    g = plan.blocks.geom
    bm, bn, nb, ng = g.block_m, g.block_n, plan.nb, plan.ng
    Bi, Hi, L, Dv = z.shape
    zp = padded_blocks(z, plan)
    gb = as_blocks(gz, g.nqb, bm)  # [BH, nqb, BM, Dv]
    dzp = torch.zeros(bh * plan.npad, bn, Dv, dtype=z.dtype, device=z.device)
    dz_tok = dzp.view(-1, Dv)
    dP = torch.empty_like(P) if need_dp else None
    for c in plan.chunks:
        tile, gr = chunk_tile(P, plan, c, bh), chunk_rows(gb, c)
        dtile = chunk_tile(dP, plan, c, bh) if need_dp else None
        zr = rest_rows(zp, c) if c.nr else None
        for i in range(bh):
            t, gi = tile[i], gr[i]  # [R, BM, W], [R, BM, Dv]
            parts = []
            if nb:
                dzp.index_add_(0, i * plan.npad + c.band_index.to(z.device),
                               torch.bmm(t[:, :, :nb * bn].transpose(1, 2), gi).view(-1, bn, Dv))
                if need_dp:
                    parts.append(torch.bmm(gi, band_view(zp, i, plan, c).transpose(1, 2)))
            if c.nr:
                dz_tok.index_add_(0, i * plan.npad * bn + c.rest_index.to(z.device),
                                  torch.bmm(t[:, :, nb * bn:].transpose(1, 2), gi).view(-1, Dv))
                if need_dp:
                    parts.append(torch.bmm(gi, zr[i].transpose(1, 2)))
            if need_dp:
                torch.cat(parts, dim=-1, out=dtile[i])  # contiguous products, one copy (see the forward)
    if need_dp:
        dP.mul_(beta)
    dz = dzp.view(bh, plan.npad, bn, Dv)[:, plan.pad_lo:plan.pad_lo + g.nkb].reshape(bh, -1, Dv)[:, :L].clone()
    dPG = None
    if ng:
        G = global_parts(split, L, g.nqb, bm, str(z.device))[0]
        gG = gz.reshape(bh, L, Dv)[:, G]  # [BH, G, Dv]
        dz += torch.bmm(PG.transpose(1, 2), gG)
        if need_dp:
            dPG = torch.bmm(gG, z.reshape(bh, L, Dv).transpose(1, 2)).mul_(beta)
    return dz.mul_(beta).view(Bi, Hi, L, Dv), dP, dPG


class _HopFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, items, split, beta, gamma, z, v, *tensors):
        cdt = compute_dtype_for(z.dtype)
        z, v = z.to(cdt), v.to(cdt)
        ctx.items, ctx.split, ctx.beta, ctx.gamma = items, split, beta, gamma
        ctx.save_for_backward(z, *tensors)
        return _hops(items, split, tensors, z, v, beta, gamma)

    @staticmethod
    @single_backward("the Diffuser hop (torch backend)")
    def backward(ctx, gz):
        z, *tensors = ctx.saved_tensors
        gz = gz.to(z.dtype).contiguous()
        need_dp = any(ctx.needs_input_grad[6:])
        dz = torch.empty_like(z)
        grads = []
        for j, it in enumerate(ctx.items):
            d, dP, dPG = _hop_backward(it, ctx.split, tensors[2 * j], tensors[2 * j + 1], z[it.b, it.h],
                                       gz[it.b, it.h], ctx.beta, need_dp)
            dz[it.b, it.h] = d
            grads += [dP, dPG if dPG is not None else (torch.zeros_like(tensors[2 * j + 1]) if need_dp else None)]
        return (None, None, None, None, dz, gz * ctx.gamma, *grads)


def diffusion_hop(probs: BlockProbs, z: torch.Tensor, v: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """``beta * P z + gamma * v`` with z, v ``[B, H, L, Dv]`` (differentiable in P, z and v)."""
    tensors = probs.tensors
    if torch.is_grad_enabled() and (z.requires_grad or v.requires_grad or any(t.requires_grad for t in tensors)):
        return _HopFn.apply(probs.items, probs.split, beta, gamma, z, v, *tensors)
    cdt = compute_dtype_for(z.dtype)
    return _hops(probs.items, probs.split, tensors, z.to(cdt), v.to(cdt), beta, gamma)


def _hops(items, split, tensors, z, v, beta, gamma):
    """One hop over every item (a single item covering every head runs on the whole tensors)."""
    if len(items) == 1 and items[0].b == slice(None):
        return _hop_forward(items[0], split, tensors[0], tensors[1], z, v, beta, gamma)
    out = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    for j, it in enumerate(items):
        out[it.b, it.h] = _hop_forward(it, split, tensors[2 * j], tensors[2 * j + 1], z[it.b, it.h], v[it.b, it.h],
                                       beta, gamma)
    return out


# ---------------------------------------------------------------------------------------------
# Stage registrations
# ---------------------------------------------------------------------------------------------

def run_sparse_probs(stage: SparseProbs, env: dict, ctx: RunContext) -> dict:
    """P of the stage's base layout (of its light part when global tokens are split apart), with
    the call's score_mod (``ctx.extra["score_mod"]``) applied to the scaled scores."""
    q, k = (env[n] for n in stage.inputs)
    s = stage.schedule
    split = split_global_tokens(stage.pattern) if stage.split_globals else None
    if split is not None:
        stage.pattern.validate(q.shape[2], k.shape[2])
    base = split.light if split is not None else stage.pattern
    layout = base.layout(q.shape[2], k.shape[2], s.block_m, s.block_n, batch=ctx.batch, heads=ctx.heads)
    return {stage.outputs[0]: sparse_probs(q, k, layout, s, ctx.scale, split, ctx.extra.get("score_mod"))}


def run_diffusion_hop(stage: DiffusionHop, env: dict, ctx: RunContext) -> dict:
    """``beta P z + gamma v`` with the stored P."""
    probs, z, v = (env[n] for n in stage.inputs)
    out = diffusion_hop(probs, expand_heads(z, ctx.heads), expand_heads(v, ctx.heads), stage.beta, stage.gamma)
    return {stage.outputs[0]: out}


def run_expand_heads(stage: ExpandHeads, env: dict, ctx: RunContext) -> dict:
    """Key/value heads repeated to the query heads (GQA)."""
    return {o: expand_heads(env[i], ctx.heads) for i, o in zip(stage.inputs, stage.outputs)}


def run_axpby(stage: Axpby, env: dict, ctx: RunContext) -> dict:
    """``beta x + gamma y``."""
    x, y = (env[n] for n in stage.inputs)
    return {stage.outputs[0]: torch.add(x.to(y.dtype) * stage.beta, y, alpha=stage.gamma)}


def run_pass_through(stage: PassThrough, env: dict, ctx: RunContext) -> dict:
    """``v`` with heads expanded (zero hops)."""
    return {stage.outputs[0]: expand_heads(env[stage.inputs[1]], ctx.heads)}


# These three are plain tensor algebra and run on any device: the triton backend uses them too
# (its recompute-schedule hops are BlockSparseAttention kernels joined by Axpby).
SHARED_STAGES = {ExpandHeads: run_expand_heads, Axpby: run_axpby, PassThrough: run_pass_through}
STAGES = {SparseProbs: run_sparse_probs, DiffusionHop: run_diffusion_hop, **SHARED_STAGES}
