"""Context parallelism for transformers models: each rank holds a shard of the sequence.

>>> cp = ac_hf.enable_context_parallel(model, group=None, sharding="auto")   # under torchrun
>>> batch = cp.shard_inputs(input_ids, labels=input_ids)   # this rank's tokens, positions, labels
>>> out = model(**batch)                                    # every layer runs ring_attention
>>> out.loss.backward(); cp.all_reduce_gradients(model)     # the full sequence's gradients
>>> logits = cp.gather(out.logits)                          # [B, L, V], natural order, every rank

Every rank runs the whole model on its tokens; only attention crosses ranks. The attention
function (``attn_implementation="attncompiler"``) hands each layer's pattern (the model's
causality and sliding window, or the :func:`set_patterns` pattern) to
:func:`~attncompiler.distributed.ring_attention` with the rank's local q/k/v. One sharding
(contiguous, zigzag or striped chunks) is chosen per sequence length for the whole model, since
the hidden states are cut once. Rotary embeddings need each token's global position: pass the
``position_ids`` :meth:`ContextParallel.shard_inputs` returns. Labels are shifted globally there
(``shift_labels``) and the loss is normalized by the global token count (``num_items_in_batch``),
so the ranks' losses sum to the single-process loss.

Packed sequences (``position_ids`` restarting at each document) add a document mask to every
layer when every row packs the same lengths. Scope: prefill and training forward/backward.
Gemma 2's logit softcap and gpt-oss attention sinks run on the ring; the sinks' gradient (like
every parameter's) is this rank's part until :meth:`ContextParallel.all_reduce_gradients`.
Padding masks, rows packed differently and KV caches (decoding) raise :class:`UnsupportedError`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist

from ..dsl.pattern import Pattern
from ..dsl.primitives import document
from ..dsl.score_mod import softcap as make_softcap
from ..errors import InputError, UnsupportedError
from ..distributed.plan import AUTO_GAIN, SHARDINGS, plan_attention
from ..distributed.ring import ring_attention
from ..distributed.sharding import Sharding, make_sharding
from .hf_masks import HFLayout

CP_ATTR = "attncompiler_context_parallel"  # set on attention modules by enable_context_parallel
IGNORE = -100  # transformers' ignore_index of the loss


@dataclass
class ContextParallel:
    """One model's context-parallel state: process group, sharding, and the ring plans per layer kind.

    ``layer_patterns()`` gives the model's current patterns by layer (used to choose ``"auto"``
    shardings); ``heads`` is the model's query head count (per-head patterns are planned per head).
    """

    group: object
    kind: str
    layer_patterns: Callable[[], dict]
    heads: int
    sharding: Sharding | None = None
    documents: tuple[int, ...] | None = None  # packed document lengths of the current batch
    plans: dict = field(default_factory=dict)
    _kinds: dict = field(default_factory=dict)  # seq_len -> chosen kind

    @property
    def rank(self) -> int:
        """This process's rank in the group."""
        return dist.get_rank(self.group)

    @property
    def world_size(self) -> int:
        """Number of ranks sharing the sequence."""
        return dist.get_world_size(self.group)

    def choose(self, seq_len: int) -> Sharding:
        """The sharding of ``seq_len`` tokens: the requested kind, or for ``"auto"`` the kind whose busiest
        rank computes the fewest blocks summed over the model's layers (contiguous unless another kind
        gains at least ``1 - AUTO_GAIN``; the same rule as ``plan_attention``). Same on every rank."""
        kind = self._kinds.get(seq_len)
        if kind is None:
            kind = self.kind
            if kind == "auto":
                kind = self.auto_kind(seq_len)
            self._kinds[seq_len] = kind
        sh = make_sharding(kind, seq_len, self.world_size)
        if self.sharding != sh:
            self.sharding, self.plans = sh, {}
        return sh

    def auto_kind(self, seq_len: int) -> str:
        """The ``"auto"`` choice for the model's layer patterns at ``seq_len``."""
        worst: dict[str, int] = {}
        nbytes: dict[str, int] = {}
        for p in self.layer_patterns().values():
            plan = plan_attention(p, seq_len, self.world_size, "ring", heads=self.heads, sharding="auto")
            for s in plan.alternatives:
                worst[s.kind] = worst.get(s.kind, 0) + max(s.blocks)
                nbytes[s.kind] = nbytes.get(s.kind, 0) + s.total_bytes
        better = [k for k in worst if k != "contiguous" and worst[k] < AUTO_GAIN * worst["contiguous"]]
        return min(better, key=lambda k: (worst[k], nbytes[k])) if better else "contiguous"

    def shard_inputs(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                     labels: torch.Tensor | None = None, *, shift_labels: bool = True) -> dict:
        """This rank's part of a batch, as keyword arguments of the model's forward.

        Args:
            input_ids: ``[B, L]`` token ids of the full sequence (the same on every rank).
            position_ids: ``[B or 1, L]`` positions (default ``0..L-1``). Packed sequences (positions
                restarting) become a document mask on every layer; every row must pack the same
                document lengths.
            labels: ``[B, L]`` labels, or None. With ``shift_labels`` (causal LMs) token ``t`` is
                scored against ``labels[t + 1]`` globally before the cut, so no target is lost at a
                shard boundary; the result carries ``shift_labels`` for transformers' loss.

        Returns:
            ``{"input_ids", "position_ids"}`` cut to this rank's tokens (global positions, for rotary
            embeddings); with labels also ``"labels"``, ``"shift_labels"`` (causal) and
            ``"num_items_in_batch"`` (the global count of scored tokens: the ranks' losses sum to
            the full sequence's mean loss).

        Raises:
            UnsupportedError: rows packed with different document lengths.
            InputError: shapes that disagree.
        """
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise InputError(f"input_ids must be a [batch, length] tensor, got "
                             f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
        B, L = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(L, device=input_ids.device).unsqueeze(0)
        if position_ids.dim() != 2 or position_ids.shape[1] != L or position_ids.shape[0] not in (1, B):
            raise InputError(f"position_ids {list(position_ids.shape)} must be [{B} or 1, {L}] like input_ids")
        self.documents = packed_documents(position_ids.expand(B, L))
        sh, r = self.choose(L), self.rank
        out = {"input_ids": sh.shard(input_ids, r, dim=1).contiguous(),
               "position_ids": sh.shard(position_ids, r, dim=1).contiguous()}
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise InputError(f"labels {list(labels.shape)} must have the shape of input_ids {[B, L]}")
            target = torch.cat([labels[:, 1:], labels.new_full((B, 1), IGNORE)], 1) if shift_labels else labels
            mine = sh.shard(target, r, dim=1).contiguous()  # the loss views it flat
            out["labels"] = mine
            if shift_labels:
                out["shift_labels"] = mine
            out["num_items_in_batch"] = (target != IGNORE).sum()
        return out

    def gather(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """The full-sequence tensor from every rank's part (sequence along ``dim``), in natural order.

        Collective (every rank calls it); the result is detached (for logits and checks, not training).
        """
        sh = self.require_sharding()
        n_max = max(sh.local_len(r) for r in range(self.world_size))
        x = x.detach().contiguous()
        pad = list(x.shape)
        pad[dim] = n_max - x.shape[dim]
        padded = torch.cat([x, x.new_zeros(pad)], dim).contiguous()  # all_gather needs equal sizes
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded, group=self.group)
        return sh.unshard([p.narrow(dim, 0, sh.local_len(r)) for r, p in enumerate(parts)], dim)

    def all_reduce_gradients(self, model: torch.nn.Module) -> None:
        """Sum every parameter's gradient over the group (the full sequence's gradient on every rank).

        Under DistributedDataParallel, which averages, multiply the loss by the world size instead.
        """
        for p in model.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad, group=self.group)

    def require_sharding(self) -> Sharding:
        """The current sharding, or an error saying to call :meth:`shard_inputs` first."""
        if self.sharding is None:
            raise InputError("context parallelism has no sharding yet; cut the batch with cp.shard_inputs(input_ids, "
                             "...) and feed the model what it returns")
        return self.sharding

    def attention(self, pattern: Pattern, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None,
                  layout: HFLayout | None, *, softcap: float | None = None,
                  sinks: torch.Tensor | None = None) -> torch.Tensor:
        """``out [B, H, Lr, Dv]`` of one layer on this rank's shard by :func:`ring_attention`.

        ``softcap`` (Gemma 2) becomes ``ac.softcap(cap)`` on the scaled scores at their global positions;
        ``sinks [H]`` (gpt-oss ``s_aux``) join every row's denominator. The gradient ``sinks`` receives
        is this rank's rows' part: :meth:`all_reduce_gradients` sums it with the other parameters'.
        """
        if layout is not None and (layout.q_offset or layout.kv_offset or layout.q_length != layout.kv_length):
            raise UnsupportedError(f"context parallelism got a KV cache (queries at {layout.q_offset}, keys at "
                                   f"{layout.kv_offset}, {layout.q_length} queries on {layout.kv_length} keys): "
                                   "decoding is not supported; run generation without context parallelism "
                                   "(disable_context_parallel) and pass use_cache=False here")
        if q.shape[2] != k.shape[2]:
            raise UnsupportedError(f"context parallelism got {q.shape[2]} queries on {k.shape[2]} keys (a KV cache): "
                                   "decoding is not supported; pass use_cache=False")
        if layout is not None and layout.starts is not None:
            raise UnsupportedError("context parallelism got a padding mask with zeros: padding is not supported; "
                                   "pass no attention_mask (one full-length sequence per row)")
        sh = self.require_sharding()
        if self.documents is not None:
            pattern = pattern & document(list(self.documents))
        r = self.rank
        if q.shape[2] != sh.local_len(r):
            raise InputError(f"rank {r} got {q.shape[2]} tokens, but shard_inputs cut seq_len={sh.seq_len} into "
                             f"{sh.local_len(r)} for this rank ({sh.kind}); feed the model what shard_inputs returned")
        key = (pattern, sh, q.shape[0], q.shape[1], k.shape[1], q.shape[3], v.shape[3], k.element_size())
        plan = self.plans.get(key)
        if plan is None:
            plan = plan_attention(pattern, sh.seq_len, self.world_size, "ring", batch=q.shape[0], heads=q.shape[1],
                                  kv_heads=k.shape[1], head_dim=q.shape[3], value_dim=v.shape[3],
                                  elem_bytes=k.element_size(), sharding=sh.kind)
            self.plans[key] = plan
        out, _ = ring_attention(pattern, q, k, v, seq_len=sh.seq_len, group=self.group, scale=scale, plan=plan,
                                score_mod=None if softcap is None else make_softcap(softcap), sinks=sinks)
        return out


def packed_documents(position_ids: torch.Tensor) -> tuple[int, ...] | None:
    """Document lengths of packed rows (a new document wherever positions do not step by one), the same in
    every row; None for one document per row.

    Raises:
        UnsupportedError: rows packed with different document lengths.
    """
    cuts = torch.diff(position_ids, dim=1) != 1  # [B, L-1]
    if not bool(cuts.any()):
        return None
    rows = set()
    for row in cuts:
        at = [0] + [int(i) + 1 for i in row.nonzero().flatten()] + [position_ids.shape[1]]
        rows.add(tuple(b - a for a, b in zip(at, at[1:])))
    if len(rows) > 1:
        raise UnsupportedError(f"packed rows with different document lengths {sorted(rows)[:2]}: context "
                               "parallelism takes one document mask for the batch; pack the same lengths in every "
                               "row or run one row per batch")
    return rows.pop()


def check_sharding(sharding) -> str:
    """``sharding`` if it is one of ``SHARDINGS``, else an :class:`InputError` naming the choices."""
    if sharding not in SHARDINGS:
        raise InputError(f"sharding={sharding!r} is not one of {SHARDINGS}")
    return sharding
