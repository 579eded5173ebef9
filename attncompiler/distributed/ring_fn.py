"""The ring schedule: double-buffered key/value exchange, lse merge, reverse-ring gradients.

Forward, at ring step ``s`` rank ``r`` holds the buffers that arrived at step ``s - 1`` (its own
shard at step 0). It first posts, in one ``batch_isend_irecv``, the sends that forward those
buffers one hop on (forward and backward direction) and the receives of the next ones, then
computes on what it holds while the messages are in flight, merging partial results by their
log-sum-exp. What a buffer carries, and how far it goes, is the plan's route; a rank whose
queries do not need a buffer it relays skips the compute.

Backward retraces every hop in reverse: the rank at the end of a route computes the key/value
gradient of the rows it used, sends it one hop back, and each rank on the way adds its own
contribution before passing it on (ring attention's backward). Iteration ``s`` posts the
gradients finished at iteration ``s + 1`` and the receive of the next ones, then computes, so
communication again overlaps compute. Bytes mirror the forward pass exactly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..schedule import Schedule
from .comm import global_rank, post
from .local import merge_partials, shifted_pattern
from .plan import DistributedPlan
from .routes import BWD, FWD, SIGN


@dataclass
class Ring:
    """Everything one rank's ring call needs besides the tensors."""

    pattern: object
    plan: DistributedPlan       # what to compute (needs, key ranges)
    comm: DistributedPlan       # how to move it (routes; the plan itself, or its dense baseline)
    rank: int
    group: object
    scale: float
    schedule: Schedule | None
    overlap: bool
    stats: dict | None
    _subs: dict = field(default_factory=dict)
    _k: torch.Tensor | None = None  # templates for receive buffers (device and dtype follow the inputs)
    _v: torch.Tensor | None = None

    def peer(self, d: int, ahead: bool) -> int:
        """Global rank one hop ahead of (or behind) this one in direction ``d``."""
        P = self.plan.world_size
        return global_rank(self.group, (self.rank + (SIGN[d] if ahead else -SIGN[d])) % P)

    def subproblems(self, o: int, batch: int, heads: int):
        """``(q_lo, q_hi, k_lo, k_hi, layout, schedule)`` of local queries against rank ``o``'s needed rows.

        Key rows are relative to ``key_range[rank, o]``; each query chunk meets each key chunk
        with the pattern shifted to their global offsets, empty pairs dropped.
        """
        if o in self._subs:
            return self._subs[o]
        sh, L = self.plan.sharding, self.plan.seq_len
        lo, hi = (int(x) for x in self.plan.key_range[self.rank, o])
        subs = []
        for gq0, gq1, lq0 in sh.segments(self.rank):
            for gk0, gk1, lk0 in sh.segments(o):
                a, b = max(lk0, lo), min(lk0 + gk1 - gk0, hi)
                if a >= b:
                    continue
                nq, nk = gq1 - gq0, b - a
                sched = self.schedule or Schedule(block_m=min(64, nq), block_n=min(64, nk))
                sub = shifted_pattern(self.pattern, gq0, gk0 + a - lk0, L)
                layout = sub.layout(nq, nk, sched.block_m, sched.block_n, batch=batch, heads=heads)
                if layout.num_blocks:
                    subs.append((lq0, lq0 + nq, a - lo, b - lo, layout, sched))
        self._subs[o] = subs
        return subs

    def exchange(self, step: int, cur: dict):
        """Post step ``step``: forward the buffers in ``cur`` one hop, receive the next; returns a waiter."""
        spec, got = [], {}
        for d in (FWD, BWD):
            snd = self.comm.send(self.rank, step, d)
            if snd is not None:
                kb, vb, buf_lo = cur[d]
                a, b = snd[1] - buf_lo, snd[2] - buf_lo
                spec += [("send", kb[:, :, a:b].contiguous(), self.peer(d, True), 2 * d),
                         ("send", vb[:, :, a:b].contiguous(), self.peer(d, True), 2 * d + 1)]
            rcv = self.comm.recv(self.rank, step, d)
            if rcv is not None:
                o, lo, hi = rcv
                kr = self._k.new_empty(self._k.shape[:2] + (hi - lo, self._k.shape[3]))  # [B, Hkv, n, Dk]
                vr = self._v.new_empty(self._v.shape[:2] + (hi - lo, self._v.shape[3]))  # [B, Hkv, n, Dv]
                got[d] = (o, kr, vr, lo)
                spec += [("recv", kr, self.peer(d, False), 2 * d), ("recv", vr, self.peer(d, False), 2 * d + 1)]
        return self._waiter(self.post(spec, "forward_bytes_sent"), got)

    def post(self, spec, key: str):
        """Post one step's ops; without overlap, block on them here (timed as waiting)."""
        t0 = time.perf_counter()
        finish = post(spec, self.group, self.stats, key, wait=not self.overlap)
        if not self.overlap:
            self._tally("wait_s", time.perf_counter() - t0)
        return finish

    def _waiter(self, finish, result):
        def wait():
            t0 = time.perf_counter()
            finish()
            self._tally("wait_s", time.perf_counter() - t0)
            return result
        return wait

    def _tally(self, key: str, value: float) -> None:
        if self.stats is not None:
            self.stats[key] = self.stats.get(key, 0.0) + value


def _merge(acc, out, lse):
    return (out, lse) if acc is None else merge_partials([acc[0], out], [acc[1], lse])


class RingAttentionFn(torch.autograd.Function):
    """Local queries against every needed key shard as it passes around the ring; exact backward.

    The backward of each shard runs the block-sparse backward with the *merged* output and
    log-sum-exp, which is the exact gradient of the merged softmax.
    """

    @staticmethod
    def forward(ctx, q, k, v, ring: Ring):
        from ..codegen.torch_attention import block_sparse_attention

        r, plan = ring.rank, ring.plan
        ring._k, ring._v = k, v
        B, H = q.shape[:2]
        acc: dict = {}
        used: dict = {}

        def compute(o, kb, vb, buf_lo):
            if not plan.need[r, o]:
                return  # only relaying this shard
            lo, hi = (int(x) - buf_lo for x in plan.key_range[r, o])
            ks, vs = kb[:, :, lo:hi], vb[:, :, lo:hi]  # [B, Hkv, n, D]
            used[o] = (ks, vs)
            t0 = time.perf_counter()
            for qa, qb, ka, kb_, layout, sched in ring.subproblems(o, B, H):
                out, lse = block_sparse_attention(q[:, :, qa:qb], ks[:, :, ka:kb_], vs[:, :, ka:kb_], layout, sched,
                                                  ring.scale)
                acc[qa, qb] = _merge(acc.get((qa, qb)), out, lse)
            ring._tally("compute_s", time.perf_counter() - t0)

        steps = ring.comm.steps
        wait = ring.exchange(1, {FWD: (k, v, 0), BWD: (k, v, 0)}) if steps else (lambda: {})
        compute(r, k, v, 0)  # own shard while step 1 is in flight
        for s in range(1, steps + 1):
            got = wait()
            if s < steps:  # double buffering: post step s+1 before computing on step s
                wait = ring.exchange(s + 1, {d: (kb, vb, lo) for d, (_, kb, vb, lo) in got.items()})
            for _, (o, kb, vb, lo) in sorted(got.items()):
                compute(o, kb, vb, lo)
        out, lse = _assemble(q, v, acc, plan.sharding.segments(r))
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.ring, ctx.used = ring, used
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        from ..codegen.torch_attention import block_sparse_attention_backward

        q, k, v, out, lse = ctx.saved_tensors
        ring, used = ctx.ring, ctx.used
        r, plan, comm, P = ring.rank, ring.plan, ring.comm, ring.plan.world_size
        dout = dout.contiguous()
        dq = torch.zeros_like(q)
        B, H = q.shape[:2]

        def partial(o):
            """dk, dv of the rows of shard o this rank used (None if it used none)."""
            if o not in used:
                return None
            ks, vs = used[o]
            dks, dvs = torch.zeros_like(ks), torch.zeros_like(vs)
            t0 = time.perf_counter()
            for qa, qb, ka, kb, layout, sched in ring.subproblems(o, B, H):
                dqi, dki, dvi = block_sparse_attention_backward(
                    q[:, :, qa:qb], ks[:, :, ka:kb], vs[:, :, ka:kb], out[:, :, qa:qb], lse[:, :, qa:qb],
                    dout[:, :, qa:qb], layout, sched, ring.scale)
                dq[:, :, qa:qb] += dqi
                dks[:, :, ka:kb] += dki
                dvs[:, :, ka:kb] += dvi
            ring._tally("compute_s", time.perf_counter() - t0)
            return dks, dvs

        def add_rows(dst, src, at):
            if src is not None:
                dst[0][:, :, at:at + src[0].shape[2]] += src[0]
                dst[1][:, :, at:at + src[1].shape[2]] += src[1]

        outbox: dict = {}  # direction -> gradient finished last iteration, to send one hop back
        dk, dv = torch.zeros_like(k), torch.zeros_like(v)
        for s in range(comm.steps, -1, -1):
            spec, inbox = [], {}
            for d in (FWD, BWD):
                if d in outbox:
                    g = outbox[d]
                    spec += [("send", g[0], ring.peer(d, False), 4 + 2 * d),
                             ("send", g[1], ring.peer(d, False), 5 + 2 * d)]
                o = (r - SIGN[d] * s) % P
                if comm.hops[o, d] >= s + 1:  # the rank one hop ahead sends its accumulated gradient
                    lo, hi = (int(x) for x in comm.hop_range[o, d, s + 1])
                    g = (k.new_empty(k.shape[:2] + (hi - lo, k.shape[3])),
                         v.new_empty(v.shape[:2] + (hi - lo, v.shape[3])))
                    inbox[d] = (g, lo)
                    spec += [("recv", g[0], ring.peer(d, True), 4 + 2 * d),
                             ("recv", g[1], ring.peer(d, True), 5 + 2 * d)]
            wait = ring._waiter(ring.post(spec, "backward_bytes_sent"), inbox)
            if s == 0:
                mine = partial(r)
                wait()
                add_rows((dk, dv), mine, int(plan.key_range[r, r, 0]) if mine is not None else 0)
                for d, (g, lo) in inbox.items():
                    add_rows((dk, dv), g, lo)
                break
            origins = {d: (r - SIGN[d] * s) % P for d in (FWD, BWD)}
            live = [d for d in (FWD, BWD) if comm.hops[origins[d], d] >= s]  # shards received at step s
            parts = {d: partial(origins[d]) for d in live}
            wait()
            outbox = {}
            for d in live:
                o = origins[d]
                lo, hi = (int(x) for x in comm.hop_range[o, d, s])
                g = (k.new_zeros(k.shape[:2] + (hi - lo, k.shape[3])), v.new_zeros(v.shape[:2] + (hi - lo, v.shape[3])))
                if parts[d] is not None:
                    add_rows(g, parts[d], int(plan.key_range[r, o, 0]) - lo)
                if d in inbox:
                    add_rows(g, inbox[d][0], inbox[d][1] - lo)
                outbox[d] = g
        return dq, dk, dv, None


def _assemble(q, v, acc, segments):
    """This rank's output and lse in local order; rows that saw no key are 0 and -inf."""
    outs, lses = [], []
    lse_dtype = next(iter(acc.values()))[1].dtype if acc else (torch.float64 if q.dtype == torch.float64
                                                               else torch.float32)
    bounds = [lq0 for _, _, lq0 in segments] + [q.shape[2]]
    for qa, qb in zip(bounds, bounds[1:]):
        if (qa, qb) in acc:
            o, l = acc[qa, qb]
        else:
            o = q.new_zeros(q.shape[:2] + (qb - qa, v.shape[3]))  # [B, H, n, Dv]
            l = torch.full(q.shape[:2] + (qb - qa,), float("-inf"), dtype=lse_dtype, device=q.device)
        outs.append(o.to(q.dtype))
        lses.append(l)
    return torch.cat(outs, 2), torch.cat(lses, 2)
