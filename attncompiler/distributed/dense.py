"""The dense-row exchange: a few query rows that attend to (almost) every key, e.g. global tokens.

Sending every key shard to the rank that holds such rows would cost a dense ring; instead the
owner ``o`` of dense rows sends those rows' queries to every rank ``j`` whose keys they attend
to (the plan's ``dense_need[o, j]``). Rank ``j`` computes a partial ``(out, lse)`` of the rows
against its local keys and sends it back; the owner merges the partials (its own included) by
their log-sum-exp. Backward: the owner sends the merged out, d(out) and lse of the rows; each
rank adds its key/value gradients locally and sends back its partial dq, which the owner sums.
All messages are point-to-point through ``batch_isend_irecv``, posted in the same order on
every rank, and counted in the same stats as the ring.
"""

from __future__ import annotations

import time

import torch

from ..program.schedule import Schedule
from .edges import partial_backward, partial_forward, shift_mod
from .local import merge_partials, shifted_pattern

_TAG = 8  # ring tags are 0-7


class DenseRows:
    """One rank's side of the dense-row exchange for one ring call (``ring``: its :class:`Ring`)."""

    def __init__(self, ring, q, k, v):
        plan, r = ring.plan, ring.rank
        self.ring, self.q, self.k, self.v = ring, q, k, v
        rows = plan.dense_rows if plan.dense_rows else ((),) * plan.world_size
        need = plan.dense_need
        self.rows = rows
        P = plan.world_size
        self.peers = [j for j in range(P) if j != r and need is not None and need[r, j]]   # get my rows
        self.owners = [o for o in range(P) if o != r and need is not None and need[o, r]]  # send me theirs
        self.local = need is not None and bool(need[r, r]) and bool(rows[r])  # my rows on my keys
        self.lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        self.q_from: dict = {}
        self._subs: dict = {}

    def _mine(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's dense rows of ``x`` (sequence on dim 2), packed and contiguous."""
        return torch.cat([x[:, :, l0:l0 + g1 - g0] for g0, g1, l0 in self.rows[self.ring.rank]], 2).contiguous()

    def _n(self, o: int) -> int:
        return sum(g1 - g0 for g0, g1, _ in self.rows[o])

    def _new(self, o: int, width: int | None, dtype) -> torch.Tensor:
        B, H = self.q.shape[:2]
        shape = (B, H, self._n(o)) + ((width,) if width is not None else ())
        return torch.empty(shape, dtype=dtype, device=self.q.device)

    def _post(self, sends, recvs, key: str):
        """Post ``sends`` [(tensor, rank, tag)] and ``recvs`` at once; returns a waiter."""
        ring = self.ring
        spec = [("send", t, ring.peer_of(j), tag) for t, j, tag in sends]
        spec += [("recv", t, ring.peer_of(j), tag) for t, j, tag in recvs]
        return ring._waiter(ring.post(spec, key), None)

    def subproblems(self, o: int):
        """``(q_lo, q_hi, k_lo, k_hi, layout, schedule, mod)``: rank ``o``'s dense rows (packed) on local keys."""
        if o in self._subs:
            return self._subs[o]
        ring, plan = self.ring, self.ring.plan
        B, H = self.q.shape[:2]
        subs, at = [], 0
        for g0, g1, _ in self.rows[o]:
            for gk0, gk1, lk0 in plan.sharding.segments(ring.rank):
                nq, nk = g1 - g0, gk1 - gk0
                sched = ring.schedule or Schedule(block_m=min(64, nq), block_n=min(64, nk))
                layout = shifted_pattern(ring.pattern, g0, gk0, plan.seq_len).layout(
                    nq, nk, sched.block_m, sched.block_n, batch=B, heads=H)
                if layout.num_blocks:
                    subs.append((at, at + nq, lk0, lk0 + nk, layout, sched, shift_mod(ring.score_mod, g0, gk0)))
            at += g1 - g0
        self._subs[o] = subs
        return subs

    def post_queries(self):
        """Forward, first: send my dense rows' queries to the key owners, receive theirs."""
        q = self.q
        mine = self._mine(q) if self.peers else None
        for o in self.owners:
            self.q_from[o] = self._new(o, q.shape[3], q.dtype)
        return self._post([(mine, j, _TAG) for j in self.peers],
                          [(self.q_from[o], o, _TAG) for o in self.owners], "forward_bytes_sent")

    def _partial(self, o: int, qo: torch.Tensor):
        """``(out, lse)`` of rank ``o``'s dense rows ``qo`` (packed) on this rank's keys."""
        out = qo.new_zeros(qo.shape[:3] + (self.v.shape[3],))  # [B, H, n, Dv]
        lse = torch.full(qo.shape[:3], float("-inf"), dtype=self.lse_dtype, device=qo.device)
        t0 = time.perf_counter()
        for qa, qb, ka, kb, layout, sched, mod in self.subproblems(o):
            po, pl = partial_forward(qo[:, :, qa:qb], self.k[:, :, ka:kb], self.v[:, :, ka:kb], layout, sched,
                                     self.ring.scale, mod)
            mo, ml = merge_partials([out[:, :, qa:qb], po], [lse[:, :, qa:qb], pl])
            out[:, :, qa:qb], lse[:, :, qa:qb] = mo.to(out.dtype), ml.to(lse.dtype)
        self.ring._tally("compute_s", time.perf_counter() - t0)
        return out, lse

    def forward(self, wait_q):
        """Compute the owners' rows on local keys, post the partials back (and my receives); returns a waiter."""
        wait_q()
        sends = []
        for o in self.owners:
            out, lse = self._partial(o, self.q_from[o])
            sends += [(out, o, _TAG + 1), (lse, o, _TAG + 2)]
        r = self.ring.rank
        self.parts = [(self._new(r, self.v.shape[3], self.q.dtype), self._new(r, None, self.lse_dtype))
                      for _ in self.peers]
        recvs = [(t, j, _TAG + 1 + i) for j, pair in zip(self.peers, self.parts) for i, t in enumerate(pair)]
        wait = self._post(sends, recvs, "forward_bytes_sent")
        if self.local:
            self.parts.append(self._partial(self.ring.rank, self._mine(self.q)))
        return wait

    def merge(self, wait_p) -> dict:
        """Wait for the partials of my dense rows; ``{(local_lo, local_hi): (out, lse)}`` merged."""
        wait_p()
        if not self.parts:
            return {}
        out, lse = merge_partials([p[0] for p in self.parts], [p[1] for p in self.parts])
        res, at = {}, 0
        for g0, g1, l0 in self.rows[self.ring.rank]:
            n = g1 - g0
            res[l0, l0 + n] = (out[:, :, at:at + n], lse[:, :, at:at + n])
            at += n
        return res

    def post_grads(self, out, lse, dout):
        """Backward, first: send my dense rows' out, d(out) and lse to the key owners, receive theirs."""
        mine = (self._mine(out), self._mine(dout), self._mine(lse)) if self.peers or self.local else None
        self.grads_mine = mine
        self.grads_from = {o: (self._new(o, self.v.shape[3], out.dtype), self._new(o, self.v.shape[3], dout.dtype),
                               self._new(o, None, lse.dtype)) for o in self.owners}
        sends = [(t, j, _TAG + 3 + i) for j in self.peers for i, t in enumerate(mine)]
        recvs = [(t, o, _TAG + 3 + i) for o in self.owners for i, t in enumerate(self.grads_from[o])]
        return self._post(sends, recvs, "backward_bytes_sent")

    def _grad(self, o, qo, grads, dk, dv, captured_grads):
        """Partial dq of rank ``o``'s dense rows; dk, dv of the local keys and the captured tensors'
        gradients (of these edges) accumulated in place."""
        out, dout, lse = grads
        dq = torch.zeros_like(qo)
        t0 = time.perf_counter()
        for qa, qb, ka, kb, layout, sched, mod in self.subproblems(o):
            dqi, dki, dvi = partial_backward(
                qo[:, :, qa:qb], self.k[:, :, ka:kb], self.v[:, :, ka:kb], out[:, :, qa:qb], lse[:, :, qa:qb],
                dout[:, :, qa:qb], layout, sched, self.ring.scale, mod, self.ring.captured, captured_grads)
            dq[:, :, qa:qb] += dqi
            dk[:, :, ka:kb] += dki
            dv[:, :, ka:kb] += dvi
        self.ring._tally("compute_s", time.perf_counter() - t0)
        return dq

    def backward(self, wait_g, dq, dk, dv, captured_grads: dict) -> None:
        """Add the dense rows' gradients: dk, dv of local keys (and the captured tensors' gradients of
        these edges, on the rank that computed them); dq of my rows (summed from every rank)."""
        wait_g()
        sends = [(self._grad(o, self.q_from[o], self.grads_from[o], dk, dv, captured_grads), o, _TAG + 6)
                 for o in self.owners]
        back = [self._new(self.ring.rank, self.q.shape[3], self.q.dtype) for _ in self.peers]
        wait = self._post(sends, [(t, j, _TAG + 6) for t, j in zip(back, self.peers)], "backward_bytes_sent")
        if self.local:
            back.append(self._grad(self.ring.rank, self._mine(self.q), self.grads_mine, dk, dv, captured_grads))
        wait()
        at = 0
        for g0, g1, l0 in self.rows[self.ring.rank]:
            n = g1 - g0
            for t in back:
                dq[:, :, l0:l0 + n] += t[:, :, at:at + n]
            at += n
