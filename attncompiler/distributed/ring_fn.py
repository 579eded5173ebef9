"""The ring schedule: double-buffered key/value exchange, lse merge, reverse-ring gradients.

Forward, at ring step ``s`` rank ``r`` holds the buffers that arrived at step ``s - 1`` (its own
shard at step 0). It first posts, in one ``batch_isend_irecv``, the sends that forward those
buffers one hop on (forward and backward direction) and the receives of the next ones, then
computes on what it holds while the messages are in flight, merging partial results by their
log-sum-exp. What a buffer carries (a few row pieces of its shard, packed), and how far it
goes, is the plan's route; a rank whose queries do not need a buffer it relays skips the
compute. The plan's dense query rows (global query tokens) take the dense-row exchange of
:mod:`~attncompiler.distributed.dense` instead, overlapped with the ring.

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

from ..program.autograd_guard import single_backward
from ..program.schedule import Schedule
from .comm import global_rank, post
from .dense import DenseRows
from .edges import partial_backward, partial_forward, shift_mod, sink_forward, sink_grad
from .local import merge_partials, shifted_pattern
from .pieces import add_packed, length, merge, offset, pack, subtract
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
    score_mod: object = None    # applied at global positions (shift_mod per sub-problem)
    captured: list = field(default_factory=list)  # [(id, tensor)] the score_mod reads
    _subs: dict = field(default_factory=dict)
    _k: torch.Tensor | None = None  # templates for receive buffers (device and dtype follow the inputs)
    _v: torch.Tensor | None = None

    def peer(self, d: int, ahead: bool) -> int:
        """Global rank one hop ahead of (or behind) this one in direction ``d``."""
        P = self.plan.world_size
        return global_rank(self.group, (self.rank + (SIGN[d] if ahead else -SIGN[d])) % P)

    def query_intervals(self):
        """``(global_lo, global_hi, local_lo)`` of this rank's queries served by the ring (not dense rows)."""
        dense = merge((a, b) for a, b, _ in self.plan.dense_rows[self.rank]) if self.plan.dense_rows else ()
        return [(a, b, lq0 + a - gq0) for gq0, gq1, lq0 in self.plan.sharding.segments(self.rank)
                for a, b in subtract(((gq0, gq1),), dense)]

    def peer_of(self, rank: int) -> int:
        """Global rank of group rank ``rank``."""
        return global_rank(self.group, rank)

    def subproblems(self, o: int, batch: int, heads: int):
        """``(q_lo, q_hi, k_lo, k_hi, layout, schedule, mod)`` of ring queries against rank ``o``'s needed rows.

        Key rows index the packed ``key_pieces[rank][o]``; each query interval meets each piece
        of each key chunk with the pattern (and the score_mod, ``mod``) shifted to their global
        offsets, empty pairs dropped.
        """
        if o in self._subs:
            return self._subs[o]
        sh, L = self.plan.sharding, self.plan.seq_len
        want = self.plan.key_pieces[self.rank][o]
        subs = []
        for gq0, gq1, lq0 in self.query_intervals():
            for lo, hi in want:
                for gk0, gk1, lk0 in sh.segments(o):
                    a, b = max(lk0, lo), min(lk0 + gk1 - gk0, hi)
                    if a >= b:
                        continue
                    nq, nk, at = gq1 - gq0, b - a, offset(want, a, b)
                    sched = self.schedule or Schedule(block_m=min(64, nq), block_n=min(64, nk))
                    sub = shifted_pattern(self.pattern, gq0, gk0 + a - lk0, L)
                    layout = sub.layout(nq, nk, sched.block_m, sched.block_n, batch=batch, heads=heads)
                    if layout.num_blocks:
                        mod = shift_mod(self.score_mod, gq0, gk0 + a - lk0)
                        subs.append((lq0, lq0 + nq, at, at + nk, layout, sched, mod))
        self._subs[o] = subs
        return subs

    def exchange(self, step: int, cur: dict):
        """Post step ``step``: forward the buffers in ``cur`` one hop, receive the next; returns a waiter."""
        spec, got = [], {}
        for d in (FWD, BWD):
            snd = self.comm.send(self.rank, step, d)
            if snd is not None:
                kb, vb, have = cur[d]
                spec += [("send", pack(kb, have, snd[1]).contiguous(), self.peer(d, True), 2 * d),
                         ("send", pack(vb, have, snd[1]).contiguous(), self.peer(d, True), 2 * d + 1)]
            rcv = self.comm.recv(self.rank, step, d)
            if rcv is not None:
                o, pieces = rcv
                n = length(pieces)
                kr = self._k.new_empty(self._k.shape[:2] + (n, self._k.shape[3]))  # [B, Hkv, n, Dk]
                vr = self._v.new_empty(self._v.shape[:2] + (n, self._v.shape[3]))  # [B, Hkv, n, Dv]
                got[d] = (o, kr, vr, pieces)
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
    def forward(ctx, q, k, v, ring: Ring, sinks, *captured):
        r, plan = ring.rank, ring.plan
        ring._k, ring._v = k, v
        B, H, n = q.shape[0], q.shape[1], k.shape[2]
        acc: dict = {}
        used: dict = {}
        dense = DenseRows(ring, q, k, v)

        def compute(o, kb, vb, have):
            if not plan.need[r, o]:
                return  # only relaying this shard
            want = plan.key_pieces[r][o]
            ks, vs = pack(kb, have, want), pack(vb, have, want)  # [B, Hkv, n', D]: the rows used, packed
            used[o] = (ks, vs)
            t0 = time.perf_counter()
            for qa, qb, ka, kb_, layout, sched, mod in ring.subproblems(o, B, H):
                out, lse = partial_forward(q[:, :, qa:qb], ks[:, :, ka:kb_], vs[:, :, ka:kb_], layout, sched,
                                           ring.scale, mod)
                acc[qa, qb] = _merge(acc.get((qa, qb)), out, lse)
            ring._tally("compute_s", time.perf_counter() - t0)

        whole = ((0, n),)
        wait_q = dense.post_queries()  # dense query rows out to the key owners first (same order everywhere)
        steps = ring.comm.steps
        wait = ring.exchange(1, {FWD: (k, v, whole), BWD: (k, v, whole)}) if steps else (lambda: {})
        compute(r, k, v, whole)  # own shard while step 1 is in flight
        wait_p = dense.forward(wait_q)  # others' dense rows on local keys; partials posted back
        for s in range(1, steps + 1):
            got = wait()
            if s < steps:  # double buffering: post step s+1 before computing on step s
                wait = ring.exchange(s + 1, {d: (kb, vb, ps) for d, (_, kb, vb, ps) in got.items()})
            for _, (o, kb, vb, ps) in sorted(got.items()):
                compute(o, kb, vb, ps)
        acc.update(dense.merge(wait_p))
        out, lse = _assemble(q, v, acc)
        if sinks is not None:  # once, after the merge; the backward runs with out' and lse'
            out, lse = sink_forward(out, lse, sinks)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.ring, ctx.used, ctx.dense, ctx.sinks = ring, used, dense, sinks
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @single_backward("sequence-parallel ring attention")
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        ring, used, dense = ctx.ring, ctx.used, ctx.dense
        r, plan, comm, P = ring.rank, ring.plan, ring.comm, ring.plan.world_size
        dout = dout.contiguous()
        dq = torch.zeros_like(q)
        grads: dict = {}  # captured tensors' gradients from the edges this rank computes
        B, H, n = q.shape[0], q.shape[1], k.shape[2]
        whole = ((0, n),)

        def partial(o):
            """dk, dv of the rows of shard o this rank used, packed as key_pieces[r][o] (None: used none)."""
            if o not in used:
                return None
            ks, vs = used[o]
            dks, dvs = torch.zeros_like(ks), torch.zeros_like(vs)
            t0 = time.perf_counter()
            for qa, qb, ka, kb, layout, sched, mod in ring.subproblems(o, B, H):
                dqi, dki, dvi = partial_backward(
                    q[:, :, qa:qb], ks[:, :, ka:kb], vs[:, :, ka:kb], out[:, :, qa:qb], lse[:, :, qa:qb],
                    dout[:, :, qa:qb], layout, sched, ring.scale, mod, ring.captured, grads)
                dq[:, :, qa:qb] += dqi
                dks[:, :, ka:kb] += dki
                dvs[:, :, ka:kb] += dvi
            ring._tally("compute_s", time.perf_counter() - t0)
            return dks, dvs

        def add(dst, dst_pieces, src, src_pieces):
            if src is not None:
                add_packed(dst[0], dst_pieces, src[0], src_pieces)
                add_packed(dst[1], dst_pieces, src[1], src_pieces)

        wait_g = dense.post_grads(out, lse, dout)  # dense rows' out, d(out), lse out to the key owners first
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
                    ps = comm.hop_pieces[o][d][s + 1]
                    g = (k.new_empty(k.shape[:2] + (length(ps), k.shape[3])),
                         v.new_empty(v.shape[:2] + (length(ps), v.shape[3])))
                    inbox[d] = (g, ps)
                    spec += [("recv", g[0], ring.peer(d, True), 4 + 2 * d),
                             ("recv", g[1], ring.peer(d, True), 5 + 2 * d)]
            wait = ring._waiter(ring.post(spec, "backward_bytes_sent"), inbox)
            if s == 0:
                mine = partial(r)
                wait()
                add((dk, dv), whole, mine, plan.key_pieces[r][r])
                for d, (g, ps) in inbox.items():
                    add((dk, dv), whole, g, ps)
                break
            origins = {d: (r - SIGN[d] * s) % P for d in (FWD, BWD)}
            live = [d for d in (FWD, BWD) if comm.hops[origins[d], d] >= s]  # shards received at step s
            parts = {d: partial(origins[d]) for d in live}
            wait()
            outbox = {}
            for d in live:
                o = origins[d]
                ps = comm.hop_pieces[o][d][s]
                g = (k.new_zeros(k.shape[:2] + (length(ps), k.shape[3])),
                     v.new_zeros(v.shape[:2] + (length(ps), v.shape[3])))
                add(g, ps, parts[d], plan.key_pieces[r][o])
                if d in inbox:
                    add(g, ps, *inbox[d])
                outbox[d] = g
        dense.backward(wait_g, dq, dk, dv, grads)
        dsinks = None if ctx.sinks is None or not ctx.needs_input_grad[4] else sink_grad(out, lse, dout, ctx.sinks)
        cg = [None if grads.get(key) is None else grads[key].to(t.dtype) for key, t in ring.captured]
        return dq, dk, dv, None, dsinks, *cg


def _assemble(q, v, acc):
    """This rank's output and lse in local order from partials over disjoint query intervals.

    Rows that saw no key are 0 and -inf.
    """
    outs, lses = [], []
    lse_dtype = next(iter(acc.values()))[1].dtype if acc else (torch.float64 if q.dtype == torch.float64
                                                               else torch.float32)
    at, n = 0, q.shape[2]
    for qa, qb in sorted(acc) + [(n, n)]:
        if qa > at:  # a gap: no key at all
            outs.append(q.new_zeros(q.shape[:2] + (qa - at, v.shape[3])))  # [B, H, gap, Dv]
            lses.append(torch.full(q.shape[:2] + (qa - at,), float("-inf"), dtype=lse_dtype, device=q.device))
        if qb > qa:
            o, l = acc[qa, qb]
            outs.append(o.to(q.dtype))
            lses.append(l.to(lse_dtype))
        at = qb
    return torch.cat(outs, 2), torch.cat(lses, 2)
