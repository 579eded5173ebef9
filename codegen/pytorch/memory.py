"""PyTorch implementation of the ABC memory stages (SlotControl, SlotWrite, SlotRead) and decoding.

Causal memories are computed chunk-parallel, never materializing the per-token memory
``[T, n, D]``. With chunks of C tokens and, per slot m, a chunk reference ``R_c`` (the running
max of the logits up to chunk c, so every ``exp(s - R_c) <= 1``):

* **write** (SlotWrite): ``e = exp(s - R_c)`` ``[N, C, n]``; chunk sums ``e^T [k, v, 1]``
  ``[N, n, D + Dv + 1]`` (the last column is the normalizer Z); a scan over the N chunks
  carries the state entering each chunk, rescaled by ``exp(R_{c-1} - R_c) <= 1`` (running
  log-sum-exp normalization).
* **read** (SlotRead), all chunks at once: for query i in chunk c,
  ``q_i . K~_i[m] = (q_i . S_c[m] + sum_{j<=i in c} (q_i . k_j) e_jm) / Z_i[m]``, i.e.
  ``(q S_c^T + tril(q k^T) e) / Z`` ``[C, n]``, then a softmax over slots ``p``, and
  ``o = (p / Z) S^v_c + tril((p / Z) e^T) v``. Cost ``O(T (C D + C n + n D))``.

Causal tensors are stored chunk-major (``[N, B, Hkv, C, *]``), so a run of chunks is one
contiguous block and the batched matmuls of a read group need no copies. Within one chunk a
single reference per slot serves every row; if the logits of a chunk span
more than ``SPREAD_LIMIT`` (where ``exp`` of the gap could underflow float32), the call is
computed in float64 instead, which is exact for any spread below ~700.

Backward goes through autograd, which stays bounded: the saved tensors are ``[T, C]``,
``[T, n]`` and ``[T / C, n, D]`` sized (never ``[T, n, D]``), and the chunk references are
detached (the result does not depend on them), so no gradient flows through the max
bookkeeping. (Checkpointing each read group was tried and raised the measured peak.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attncompiler.errors import InputError
from attncompiler.families.memory.pattern import LinformerControl, Memory, WindowControl
from attncompiler.families.memory.program import SlotControl, SlotRead, SlotWrite, control_weights

from ..context import RunContext

NEG_INF = float("-inf")
SPREAD_LIMIT = 50.0  # float32 exp(-50) ~ 2e-22: normalizers and 1/Z stay well inside range


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(eq=False)
class SlotMemory:
    """What SlotWrite hands to SlotRead (and decoding).

    Attributes:
        kv1: ``[N, B, Hkv, C, D + Dv + 1]`` keys, values and a ones column, padded to whole
            chunks, chunk-major so that a run of chunks is one contiguous block (causal), or
            ``[B, Hkv, Lk, D + Dv + 1]`` (bidirectional).
        e: write weights relative to each chunk's reference, shaped like ``kv1`` with n last.
        state: ``[N, B, Hkv, n, D + Dv + 1]`` memory entering each chunk (causal) or None.
        final: ``[B, Hkv, n, D + Dv + 1]`` the memory after every token.
        ref: ``[B, Hkv, n]`` the reference of ``final`` (normalized controls), for decoding.
        may_be_empty: some logit is -inf (clustering), so a slot can hold nothing when read.
    """

    causal: bool
    normalized: bool
    dtype: torch.dtype
    kv_len: int
    head_dim: int
    kv1: torch.Tensor
    e: torch.Tensor
    state: torch.Tensor | None
    final: torch.Tensor
    ref: torch.Tensor | None
    may_be_empty: bool = False


def _pad(t: torch.Tensor, length: int, value: float) -> torch.Tensor:
    """Pad dim 2 of ``t`` to ``length`` with ``value``."""
    extra = length - t.shape[2]
    if extra == 0:
        return t
    fill = t.new_full((*t.shape[:2], extra, *t.shape[3:]), value)
    return torch.cat([t, fill], 2)


def _safe(ref: torch.Tensor) -> torch.Tensor:
    """References of slots that hold nothing yet (-inf) replaced by 0; their weights are 0 anyway."""
    return torch.where(torch.isfinite(ref), ref, torch.zeros_like(ref))


def logit_spread(w: torch.Tensor, chunk: int, may_be_empty: bool = True) -> float:
    """An upper bound, over rows and slots, of ``R_c - lse_i``: how far below its chunk
    reference a row's normalizer can fall, for logits ``w [B, Hkv, L, n]``.

    A row of chunk c that holds anything has ``lse_i >= R_{c-1}`` and ``lse_i >= w_j`` for some
    finite ``w_j`` of the chunk, so ``max(R_{c-1}, min finite w)`` bounds it from below (one
    ``amin``); only when that coarse bound is too large is the exact running max used.
    """
    with torch.no_grad():
        N = -(-w.shape[2] // chunk)
        wc = _pad(w, N * chunk, NEG_INF).unflatten(2, (N, chunk))  # [B, Hkv, N, C, n]
        ref = torch.cummax(wc.amax(3), 2).values  # [B, Hkv, N, n]
        prev = torch.cat([torch.full_like(ref[:, :, :1], NEG_INF), ref[:, :, :-1]], 2)
        finite = wc.masked_fill(torch.isinf(wc), float("inf")) if may_be_empty or N * chunk > w.shape[2] else wc
        low = torch.maximum(prev, finite.amin(3))  # [B, Hkv, N, n]
        gap = (ref - low).masked_fill(~torch.isfinite(low), 0)
        if gap.numel() == 0 or float(gap.max()) <= SPREAD_LIMIT:
            return float(gap.max()) if gap.numel() else 0.0
        lower = torch.maximum(torch.cummax(wc, 3).values, prev[:, :, :, None])  # lse_i >= this
        gap = (ref[:, :, :, None] - lower).masked_fill(~torch.isfinite(lower), 0)
        return float(gap.max())


def _chunk_major(t: torch.Tensor, N: int, C: int, value: float) -> torch.Tensor:
    """``[B, Hkv, L, X]`` -> contiguous ``[N, B, Hkv, C, X]`` (padded with ``value``)."""
    return _pad(t, N * C, value).unflatten(2, (N, C)).permute(2, 0, 1, 3, 4).contiguous()


def write_memory(k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, causal: bool, normalized: bool,
                 chunk: int) -> SlotMemory:
    """SlotWrite: ``k [B,Hkv,Lk,D]``, ``v [B,Hkv,Lk,Dv]``, ``w [B,Hkv,Lk,n]`` -> :class:`SlotMemory`."""
    cdt = _compute_dtype(k.dtype)
    empty = normalized and bool(w.detach().amin() == NEG_INF)  # clustering: some slots may hold nothing
    if normalized and causal and cdt == torch.float32 and logit_spread(w, chunk, empty) > SPREAD_LIMIT:
        cdt = torch.float64  # a chunk's logits span too far for one float32 reference
    B, Hkv, Lk, D = k.shape
    w = w.to(cdt)
    if not causal:
        kv1 = torch.cat([k.to(cdt), v.to(cdt), k.new_ones((B, Hkv, Lk, 1), dtype=cdt)], -1)  # [B,Hkv,Lk,F]
        ref = _safe(w.detach().amax(2)) if normalized else None  # [B, Hkv, n]
        e = torch.exp(w - ref[:, :, None]) if normalized else w  # [B, Hkv, Lk, n]
        final = e.transpose(-1, -2) @ kv1  # [B, Hkv, n, F]
        return SlotMemory(False, normalized, cdt, Lk, D, kv1, e, None, final, ref, empty)
    N, C = -(-Lk // chunk), chunk
    ones = k.new_ones((B, Hkv, Lk, 1), dtype=cdt)
    kv1 = _chunk_major(torch.cat([k.to(cdt), v.to(cdt), ones], -1), N, C, 0.0)  # [N, B, Hkv, C, F]
    w = _chunk_major(w, N, C, NEG_INF if normalized else 0.0)  # [N, B, Hkv, C, n]
    if normalized:
        ref = torch.cummax(w.detach().amax(3), 0).values  # [N, B, Hkv, n] running max per chunk
        refs = _safe(ref)
        e = torch.exp(w - refs[:, :, :, None])  # [N, B, Hkv, C, n], <= 1
        decay = torch.where(torch.isfinite(ref[:-1]), torch.exp(refs[:-1] - refs[1:]),
                            torch.zeros_like(refs[1:]))  # [N-1, B, Hkv, n], <= 1
    else:
        ref, e, decay = None, w, None
    local = e.transpose(-1, -2) @ kv1  # [N, B, Hkv, n, F] each chunk's own sums
    state, final = _scan(local, decay)
    return SlotMemory(True, normalized, cdt, Lk, D, kv1, e, state, final, None if ref is None else ref[-1], empty)


def _scan_forward(local: torch.Tensor, decay: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """States entering each chunk, ``s_c = (s_{c-1} + local_{c-1}) decay_{c-1}``, and the final one.

    The only sequential part: N = T / C in-place steps on ``[n, F]`` states.
    """
    N = local.shape[0]
    state = torch.empty_like(local)  # [N, B, Hkv, n, F]
    state[0] = 0
    for c in range(1, N):
        torch.add(state[c - 1], local[c - 1], out=state[c])
        if decay is not None:
            state[c].mul_(decay[c - 1, ..., None])
    return state, state[N - 1] + local[N - 1]


class _ScanFn(torch.autograd.Function):
    """The chunk scan with a reverse-scan backward (the decays are constants: the references
    they come from are detached), so autograd keeps one state buffer, not N small tensors."""

    @staticmethod
    def forward(ctx, local, decay):
        ctx.save_for_backward(decay)
        return _scan_forward(local, decay)

    @staticmethod
    def backward(ctx, g_state, g_final):
        (decay,) = ctx.saved_tensors
        N = g_state.shape[0]
        g_local = torch.empty_like(g_state)  # [N, B, Hkv, n, F]
        g_local[N - 1] = g_final
        adj = g_state[N - 1] + g_final  # total gradient reaching state_{N-1}
        for c in range(N - 1, 0, -1):  # state_c = (state_{c-1} + local_{c-1}) * decay_{c-1}
            u = adj * decay[c - 1, ..., None] if decay is not None else adj
            g_local[c - 1] = u
            adj = g_state[c - 1] + u
        return g_local, None


def _scan(local: torch.Tensor, decay: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_scan_forward`, differentiable in ``local`` when autograd records."""
    if torch.is_grad_enabled() and local.requires_grad:
        return _ScanFn.apply(local, decay)
    return _scan_forward(local, decay)


def _slot_softmax(score: torch.Tensor, z: torch.Tensor | None, may_be_empty: bool, need_lse: bool):
    """Softmax over slots of ``score / z`` (z: normalizers, None for raw weights) -> ``(p / z, lse)``.

    Slots with ``z == 0`` hold nothing and are left out; a row with every slot empty gives 0.
    """
    if z is None:
        return torch.softmax(score, -1), (torch.logsumexp(score, -1) if need_lse else None)
    if not may_be_empty:
        score = score / z
        return torch.softmax(score, -1) / z, (torch.logsumexp(score, -1) if need_lse else None)
    zs = torch.where(z > 0, z, torch.ones_like(z))
    score = (score / zs).masked_fill(z <= 0, NEG_INF)
    lse = torch.logsumexp(score, -1)
    return torch.exp(score - _safe(lse)[..., None]) / zs, lse


def _read_total(qs: torch.Tensor, total: torch.Tensor, D: int, normalized: bool, may_be_empty: bool = True,
                need_lse: bool = True):
    """Read one memory ``total [B, Hkv, n, F]`` with scaled queries ``qs [B, Hkv, G, L, D]``."""
    mk, mv, z = total[..., :D], total[..., D:-1], total[..., -1]  # [B,Hkv,n,D], [B,Hkv,n,Dv], [B,Hkv,n]
    score = qs @ mk.unsqueeze(2).transpose(-1, -2)  # [B, Hkv, G, L, n]
    p, lse = _slot_softmax(score, z[:, :, None, None, :] if normalized else None, may_be_empty, need_lse)
    return p @ mv.unsqueeze(2), lse  # [B, Hkv, G, L, Dv]


def _read_chunks(qc: torch.Tensor, kv1: torch.Tensor, e: torch.Tensor, st: torch.Tensor, normalized: bool,
                 may_be_empty: bool, G: int, D: int, need_lse: bool):
    """Causal read of a run of chunks: ``qc [N', B, Hkv, G*C, D]`` (the G query heads of each
    key/value head as extra rows), ``kv1 [N', B, Hkv, C, F]``, ``e [N', B, Hkv, C, n]``,
    ``st [N', B, Hkv, n, F]``; plain batched matmuls over contiguous chunk runs."""
    kc, vc = kv1[..., :D], kv1[..., D:-1]  # [N', B, Hkv, C, D|Dv]
    a = qc @ kc.transpose(-1, -2)  # [N', B, Hkv, G*C, C] q_i . k_j
    a.unflatten(3, (G, -1)).tril_()  # keep j <= i (per query head)
    score = torch.baddbmm((a @ e).flatten(0, 2), qc.flatten(0, 2), st[..., :D].flatten(0, 2).transpose(-1, -2))
    score = score.view(*a.shape[:3], G, -1, e.shape[-1])  # [N', B, Hkv, G, C, n] (times Z)
    z = (st[..., -1][:, :, :, None, :] + e.cumsum(3)).unsqueeze(3) if normalized else None
    p, lse = _slot_softmax(score, z, may_be_empty, need_lse)  # p / Z: [N', B, Hkv, G, C, n]
    p = p.flatten(3, 4)  # [N', B, Hkv, G*C, n]
    b = p @ e.transpose(-1, -2)  # [N', B, Hkv, G*C, C]
    b.unflatten(3, (G, -1)).tril_()
    out = torch.baddbmm((b @ vc).flatten(0, 2), p.flatten(0, 2), st[..., D:-1].flatten(0, 2))
    return out.view(*b.shape[:4], -1), lse  # [N', B, Hkv, G*C, Dv], [N', B, Hkv, G, C]


def read_memory(q: torch.Tensor, mem: SlotMemory, scale: float, need_lse: bool = True,
                tile_elems: int = 1 << 18):
    """SlotRead: ``q [B, H, Lq, D]`` -> ``out [B, H, Lq, Dv]``, ``lse [B, H, Lq]`` (compute dtype;
    None unless ``need_lse``). Causal reads go through groups of chunks whose tiles hold about
    ``tile_elems`` elements, so the intermediates stay in cache."""
    B, H, Lq, D = q.shape
    G = H // mem.kv1.shape[-3]
    Hkv = H // G
    qs = q.to(mem.dtype).mul(scale).view(B, Hkv, G, Lq, D)
    if not mem.causal:
        out, lse = _read_total(qs, mem.final, D, mem.normalized, mem.may_be_empty, need_lse)
        return out.reshape(B, H, Lq, -1), (lse.reshape(B, H, Lq) if need_lse else None)
    N, C = mem.kv1.shape[0], mem.kv1.shape[3]
    Lr = min(Lq, mem.kv_len)  # queries past the last key read the final memory
    qc = _pad(qs[:, :, :, :Lr].flatten(1, 2), N * C, 0.0).view(B, Hkv, G, N, C, D)
    qc = qc.permute(3, 0, 1, 2, 4, 5).reshape(N, B, Hkv, G * C, D)  # chunk-major, one copy
    n = mem.e.shape[-1]
    per = max(1, tile_elems // (B * H * C * max(C, n, D, mem.kv1.shape[-1])))  # chunks per group: stays in cache
    outs, lses = [], []
    # split (not slice): backward assembles each gradient with one cat, not one zero-padded copy per group
    for parts in zip(*(t.split(per) for t in (qc, mem.kv1, mem.e, mem.state))):
        o, l = _read_chunks(*parts, mem.normalized, mem.may_be_empty, G, D, need_lse)
        outs.append(o)
        lses.append(l)
    out = torch.cat(outs) if len(outs) > 1 else outs[0]  # [N, B, Hkv, G*C, Dv]
    out = out.view(N, B, Hkv, G, C, -1).permute(1, 2, 3, 0, 4, 5).reshape(B, Hkv, G, N * C, -1)[:, :, :, :Lr]
    lse = None
    if need_lse:
        lse = torch.cat(lses) if len(lses) > 1 else lses[0]  # [N, B, Hkv, G, C]
        lse = lse.permute(1, 2, 3, 0, 4).reshape(B, Hkv, G, N * C)[:, :, :, :Lr]
    if Lq > Lr:
        o2, l2 = _read_total(qs[:, :, :, Lr:], mem.final, D, mem.normalized, mem.may_be_empty, need_lse)
        out, lse = torch.cat([out, o2], 3), (torch.cat([lse, l2], 3) if need_lse else None)
    return out.reshape(B, H, Lq, -1), (lse.reshape(B, H, Lq) if need_lse else None)


# ---------------------------------------------------------------------------------------------
# Stage registrations
# ---------------------------------------------------------------------------------------------

def run_slot_control(stage: SlotControl, env: dict, ctx: RunContext) -> dict:
    """Run a SlotControl stage: the slot weights or logits ``[B, Hkv, Lk, n]`` from the keys."""
    k, param = env[stage.inputs[0]], env.get(stage.inputs[1])
    pattern = Memory(stage.slots, stage.control)
    w = control_weights(pattern, k.to(_compute_dtype(k.dtype)), param, env.get("control"))
    return {stage.outputs[0]: w}


def run_slot_write(stage: SlotWrite, env: dict, ctx: RunContext) -> dict:
    """Run a SlotWrite stage: write keys and values into the slots with the control weights."""
    k, v, w = (env[n] for n in stage.inputs)
    return {stage.outputs[0]: write_memory(k, v, w, stage.causal, stage.normalized, stage.schedule.block_m)}


def run_slot_read(stage: SlotRead, env: dict, ctx: RunContext) -> dict:
    """Run a SlotRead stage: attend the queries over the slot memory, giving ``out`` and ``lse``."""
    q, mem = (env[name] for name in stage.inputs)
    out, lse = read_memory(q, mem, ctx.scale, ctx.extra.get("need_lse", True), stage.schedule.tile_elems)
    return dict(zip(stage.outputs, (out, lse)))


# ---------------------------------------------------------------------------------------------
# Decoding: O(n D) state per key/value head
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class DecodeState:
    """The recurrent state of a memory attention after ``t`` tokens.

    ``memory [B, Hkv, n, D + Dv + 1]`` holds the slot sums (a FIFO ring of keys/values and a
    validity column for window controls); ``ref [B, Hkv, n]`` the running max of the logits.
    Both are None before the first step (shapes come from the first token).
    """

    batch: int
    t: int = 0
    memory: torch.Tensor | None = None
    ref: torch.Tensor | None = None

    def nbytes(self) -> int:
        """Bytes held by the state's tensors (constant once the first token is in)."""
        return sum(x.numel() * x.element_size() for x in (self.memory, self.ref) if x is not None)


def decode_step(pattern: Memory, param, q_t, k_t, v_t, state: DecodeState, scale: float,
                control=None) -> tuple[torch.Tensor, DecodeState]:
    """One token: ``q_t [B, H, 1, D]``, ``k_t, v_t [B, Hkv, 1, *]`` -> ``out [B, H, 1, Dv]``, new state."""
    B, H, one, D = q_t.shape
    if one != 1 or k_t.shape[2] != 1 or v_t.shape[2] != 1:
        raise InputError(f"step() takes one token: q_t, k_t, v_t must be [B, H, 1, D], got "
                         f"{tuple(q_t.shape)}, {tuple(k_t.shape)}, {tuple(v_t.shape)}")
    if B != state.batch:
        raise InputError(f"state was made by init_state({state.batch}) but the token has batch {B}")
    cdt = _compute_dtype(q_t.dtype)
    Hkv, n = k_t.shape[1], pattern.slots
    kv1 = torch.cat([k_t.to(cdt), v_t.to(cdt), k_t.new_ones((B, Hkv, 1, 1), dtype=cdt)], -1)[:, :, 0]  # [B,Hkv,F]
    mem = state.memory if state.memory is not None else kv1.new_zeros((B, Hkv, n, kv1.shape[-1]))
    ref = state.ref
    if isinstance(pattern.control, WindowControl):
        mem = mem.clone()
        mem[:, :, state.t % n] = kv1  # the oldest token leaves; the ones column marks valid slots
        qs = q_t.to(cdt).mul(scale).view(B, Hkv, H // Hkv, 1, D)
        score = (qs @ mem[..., :D].unsqueeze(2).transpose(-1, -2)).masked_fill(
            (mem[..., -1] == 0)[:, :, None, None, :], NEG_INF)  # [B, Hkv, G, 1, n]
        out = torch.softmax(score, -1) @ mem[..., D:-1].unsqueeze(2)
        return out.reshape(B, H, 1, -1), DecodeState(B, state.t + 1, mem, None)
    if isinstance(pattern.control, LinformerControl) and state.t >= pattern.control.max_len:
        raise InputError(f"step {state.t} is past the Linformer projection's max_len={pattern.control.max_len}")
    if pattern.control.normalized:
        s = control_weights(pattern, k_t.to(cdt), param, control)[:, :, 0]  # [B, Hkv, n]
        ref = torch.full_like(s, NEG_INF) if ref is None else ref
        new = torch.maximum(ref, s)
        news = _safe(new)
        decay = torch.where(torch.isfinite(ref), torch.exp(ref - news), torch.zeros_like(news))
        mem = mem * decay[..., None] + torch.exp(s - news)[..., None] * kv1[:, :, None]
        ref = new
    else:
        w = param.to(cdt)[:, state.t]  # [n]: phi_t = E[:, t]
        mem = mem + w[:, None] * kv1[:, :, None]
    qs = q_t.to(cdt).mul(scale).view(B, Hkv, H // Hkv, 1, D)
    out, _ = _read_total(qs, mem, D, pattern.control.normalized)
    return out.reshape(B, H, 1, -1), DecodeState(B, state.t + 1, mem, ref)


STAGES = {SlotControl: run_slot_control, SlotWrite: run_slot_write, SlotRead: run_slot_read}
