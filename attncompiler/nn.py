"""Model-level modules: multi-head attention, pre-norm transformer blocks and stacks.

Attention inside every layer is an ``ac.compile(pattern, backend=...)`` module, so any pattern
family that maps ``[B, H, L, D]`` q/k/v to ``[B, H, L, D]`` works per layer. A stack takes one
pattern per layer and a reuse plan (see :mod:`attncompiler.families.reuse.plan`): reused heads skip their Q/K
projections and apply the map of the head they reuse to the current layer's values, either from
the probabilities that head's layer stored over its block layout (``stored_probs``) or by
recomputing it from that head's kept Q/K (``recompute``).
"""

from __future__ import annotations

import inspect
import pickle
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InputError, PatternError, UnsupportedError
from .program.inputs import check_keywords
from .runtime.compile import compile as compile_attention
from .dsl.pattern import Pattern
from .dsl.primitives import full
from .program.stages import BlockSparseAttention
from .families.reuse.plan import (HeadSource, ReusePatternMode, ReusePlan, ReuseSchedule, merge_heads,
                                  resolve_sources, select_heads, stored_heads)
from .families.reuse.similarity import LayerAttention
from .program.schedule import Schedule


def _reject_keywords(module: nn.Module, unexpected: dict) -> None:
    """Unknown keywords of a module's forward raise, naming them and the ones it takes."""
    if unexpected:
        sig = inspect.signature(type(module).forward)
        known = [n for n, p in sig.parameters.items() if n != "self" and p.kind is not p.VAR_KEYWORD]
        check_keywords(f"{type(module).__name__}.forward", unexpected, known)


class MultiheadAttention(nn.Module):
    """Multi-head attention with a compiled pattern; batch-first drop-in for the common uses of
    ``torch.nn.MultiheadAttention`` (same parameter names, so ``load_state_dict`` of a torch
    module's state works; ``ac.full()`` reproduces it).

    Args:
        embed_dim: model width E.
        num_heads: H; E must be divisible by H.
        pattern: attention pattern (any family). Default ``ac.full()``.
        bias: projection biases, as in torch.
        batch_first: inputs are ``[B, L, E]`` (default) or ``[L, B, E]``.
        backend, schedule: passed to :func:`attncompiler.compile`.
    """

    def __init__(self, embed_dim: int, num_heads: int, pattern: Pattern | None = None, *, bias: bool = True,
                 batch_first: bool = True, backend: str = "auto", schedule: Schedule | None = None,
                 dropout: float = 0.0, device=None, dtype=None):
        super().__init__()
        for name, v in (("embed_dim", embed_dim), ("num_heads", num_heads)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise InputError(f"{name}={v!r} must be a positive integer")
        if embed_dim % num_heads:
            raise InputError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
        if dropout:
            raise UnsupportedError(f"dropout={dropout}: attention dropout is not supported by compiled attention; "
                                   "apply dropout to the output instead")
        kw = dict(device=device, dtype=dtype)
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.batch_first = batch_first
        self.pattern = full() if pattern is None else pattern
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **kw))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **kw)) if bias else None
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **kw)
        self.attention = compile_attention(self.pattern, backend, schedule=schedule)
        self._rows: dict[tuple[int, ...], torch.Tensor] = {}
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """torch's initialization (Xavier-uniform in-projection, zero biases)."""
        nn.init.xavier_uniform_(self.in_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.zeros_(self.in_proj_bias)
            nn.init.zeros_(self.out_proj.bias)

    # -- projections -----------------------------------------------------------------------
    def _split(self, t: torch.Tensor, heads: int) -> torch.Tensor:
        B, L, _ = t.shape
        return t.view(B, L, heads, self.head_dim).transpose(1, 2)  # [B, heads, L, D]

    def _weight_rows(self, kept: tuple[int, ...]) -> torch.Tensor:
        """In-projection rows for the Q and K of ``kept`` heads and all of V."""
        rows = self._rows.get(kept)
        if rows is None:
            E, D = self.embed_dim, self.head_dim
            qk = [part * E + h * D + i for part in (0, 1) for h in kept for i in range(D)]
            rows = self._rows[kept] = torch.tensor(qk + list(range(2 * E, 3 * E)))
        return rows.to(self.in_proj_weight.device)

    def project(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kept: tuple[int, ...] | None = None):
        """Q and K of the ``kept`` heads (all by default) and V of all heads, each ``[B, h, L, D]``."""
        E, H = self.embed_dim, self.num_heads
        w, b = self.in_proj_weight, self.in_proj_bias
        if kept is not None and not kept:  # every head reused: only V (a view of the weight, no copy)
            v = F.linear(value, w[2 * E:], None if b is None else b[2 * E:])
            return None, None, self._split(v, H)
        if query is key and key is value and kept is not None and len(kept) < H:
            # Self-attention with reused heads: one matmul over the rows still needed.
            rows = self._weight_rows(kept)
            x = F.linear(query, w.index_select(0, rows), None if b is None else b.index_select(0, rows))
            n = len(kept) * self.head_dim
            q, k, v = x.split([n, n, E], dim=-1)
            return self._split(q, len(kept)), self._split(k, len(kept)), self._split(v, H)
        if query is key and key is value:
            q, k, v = F.linear(query, w, b).chunk(3, dim=-1)  # [B, L, E] each
        else:
            wq, wk, wv = w.chunk(3)
            bq, bk, bv = (None, None, None) if b is None else b.chunk(3)
            q, k, v = F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)
        q, k, v = self._split(q, H), self._split(k, H), self._split(v, H)
        if kept is not None and len(kept) < H:
            q, k = (select_heads(q, kept), select_heads(k, kept)) if kept else (None, None)
        return q, k, v

    def merge(self, out: torch.Tensor) -> torch.Tensor:
        """``[B, H, L, D]`` attention output -> output projection ``[B, L, E]``."""
        B, H, L, D = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(B, L, H * D))

    # -- stored probabilities (cross-layer reuse) -------------------------------------------
    def supports_probs(self, device: torch.device | None = None) -> bool:
        """Whether :meth:`attend_with_probs` can run here: the torch backend on ``device`` and a
        mask pattern lowered to one block-sparse stage whose layout is the same for every batch
        and head (the Triton backend keeps the recompute path)."""
        from .runtime.module import resolve_backend

        stages = self.attention.program.stages
        p = self.pattern
        return (resolve_backend(self.attention.backend, device) == "torch" and len(stages) == 1
                and isinstance(stages[0], BlockSparseAttention) and p.family == "mask"
                and p.head_period == 1 and not p.batch_dependent)

    def attend_with_probs(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, workspace=None):
        """``(out [B, h, L, D], StoredProbs)``: this module's attention that also keeps its
        probabilities over the block layout (see :mod:`attncompiler.codegen.pytorch.probs`)."""
        from .codegen.pytorch.probs import attention_with_probs

        stage = self.attention.program.stages[0]
        sch = stage.schedule
        layout = stage.pattern.layout(q.shape[2], k.shape[2], sch.block_m, sch.block_n, batch=q.shape[0],
                                      heads=q.shape[1])
        return attention_with_probs(q, k, v, layout, sch, self.head_dim ** -0.5, workspace=workspace)

    # -- forward ---------------------------------------------------------------------------
    def forward(self, query: torch.Tensor, key: torch.Tensor | None = None, value: torch.Tensor | None = None,
                key_padding_mask=None, need_weights: bool = False, attn_mask=None,
                average_attn_weights: bool = True, is_causal: bool = False, **unexpected):
        """``(output [B, L, E], None)`` like ``torch.nn.MultiheadAttention`` with ``need_weights=False``.

        Masks are part of the pattern: ``attn_mask``/``key_padding_mask`` are not accepted (use
        ``ac.causal()``, ``ac.document(...)`` or ``ac.mask(fn)``), nor are attention weights
        (they would be an L x L matrix; use ``ac.reference`` or ``ac.attention_similarity``).
        """
        _reject_keywords(self, unexpected)
        key = query if key is None else key
        value = key if value is None else value
        if need_weights:
            raise UnsupportedError("need_weights=True would materialize L x L attention weights; pass "
                                   "need_weights=False (use ac.reference(pattern, q, k, v) to inspect maps)")
        if attn_mask is not None or key_padding_mask is not None:
            raise UnsupportedError("attn_mask/key_padding_mask are not accepted: declare the mask as the "
                                   "module's pattern (ac.causal(), ac.document(lengths), ac.mask(fn))")
        if is_causal and self.pattern.family != "mask":
            raise UnsupportedError(f"is_causal=True needs a mask pattern, not {self.pattern!r}; declare causality in the pattern")
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, torch.Tensor) or t.dim() != 3 or t.shape[-1] != self.embed_dim:
                raise InputError(f"{name} must be a 3-D tensor with last dimension {self.embed_dim}, "
                                 f"got {getattr(t, 'shape', type(t).__name__)}")
        if not self.batch_first:  # keep object identity: it selects the fused self-attention path
            q_in = query.transpose(0, 1)
            k_in = q_in if key is query else key.transpose(0, 1)
            value = k_in if value is key else (q_in if value is query else value.transpose(0, 1))
            query, key = q_in, k_in
        q, k, v = self.project(query, key, value)
        attention = self.attention
        if is_causal:
            attention = compile_attention(self.pattern.causal(), self.attention.backend)
        out = self.merge(attention(q, k, v))
        return (out if self.batch_first else out.transpose(0, 1)), None

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, pattern={self.pattern!r}"


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln1(x))`` then ``x + mlp(ln2(x))``.

    Args:
        d_model, num_heads: width and heads.
        pattern: this layer's attention pattern.
        mlp_ratio: MLP hidden width / d_model; 0 gives an attention-only block.
        backend, schedule: passed to :func:`attncompiler.compile`.
    """

    def __init__(self, d_model: int, num_heads: int, pattern: Pattern, *, mlp_ratio: float = 4.0,
                 backend: str = "auto", schedule: Schedule | None = None, bias: bool = True):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = MultiheadAttention(d_model, num_heads, pattern, bias=bias, backend=backend, schedule=schedule)
        hidden = int(round(d_model * mlp_ratio))
        self.mlp_hidden = hidden
        if hidden:
            self.ln2 = nn.LayerNorm(d_model)
            self.mlp = nn.Sequential(nn.Linear(d_model, hidden, bias=bias), nn.GELU(),
                                     nn.Linear(hidden, d_model, bias=bias))

    def forward(self, x: torch.Tensor, **unexpected) -> torch.Tensor:
        """``[B, L, E] -> [B, L, E]`` without reuse."""
        _reject_keywords(self, unexpected)
        y, _ = self.attend(x, {}, None, ())
        return y

    def attend(self, x: torch.Tensor, sources: Mapping[int, int], prev_qk, groups):
        """One block with reused heads.

        Args:
            x: ``[B, L, E]``.
            sources: ``{head: source head}`` reused from the previous layer's effective Q/K.
            prev_qk: the previous layer's effective ``(q, k)`` ``[B, H, L, D]`` each.
            groups: ``(attention module, heads)`` for heads computed by another layer's module.

        Returns:
            ``(x [B, L, E], (q, k))``: the block output and this layer's effective Q/K.
        """
        a = self.attn
        H = a.num_heads
        h_in = self.ln1(x)
        kept = tuple(h for h in range(H) if h not in sources)
        q_own, k_own, v = a.project(h_in, h_in, h_in, kept if sources else None)
        if sources:
            src = [sources[h] for h in sorted(sources)]
            parts_q = [(kept, q_own)] if kept else []
            parts_k = [(kept, k_own)] if kept else []
            q = merge_heads(parts_q + [(sorted(sources), select_heads(prev_qk[0], src))], H)  # [B, H, L, D]
            k = merge_heads(parts_k + [(sorted(sources), select_heads(prev_qk[1], src))], H)
        else:
            q, k = q_own, k_own
        if not groups:
            out = a.attention(q, k, v)  # [B, H, L, D]
        else:
            parts = []
            for module, heads in groups:
                if module.pattern.family == "mask" and module.pattern.head_period == 1:
                    o = module(select_heads(q, heads), select_heads(k, heads), select_heads(v, heads))
                else:  # head-dependent pattern: keep head numbering, run all heads, keep some
                    o = select_heads(module(q, k, v), heads)
                parts.append((heads, o))
            out = merge_heads(parts, H)
        x = x + a.merge(out)
        if self.mlp_hidden:
            x = x + self.mlp(self.ln2(x))
        return x, (q, k)


    def attend_stored(self, x: torch.Tensor, reused, store: tuple[int, ...], workspace=None):
        """One block under the ``stored_probs`` reuse schedule.

        Args:
            x: ``[B, L, E]``.
            reused: ``(heads, StoredProbs)`` pairs: these heads apply stored probabilities
                (one map per head, in order) to this layer's values.
            store: own heads whose probabilities later layers reuse (kept and returned).
            workspace: a :class:`~attncompiler.codegen.pytorch.probs.ProbsWorkspace` (inference).

        Returns:
            ``(x [B, L, E], StoredProbs of the `store` heads or None)``.
        """
        from .codegen.pytorch.probs import apply_probs

        a = self.attn
        H = a.num_heads
        h_in = self.ln1(x)
        taken = {h for heads, _ in reused for h in heads}
        kept = tuple(h for h in range(H) if h not in taken)
        q, k, v = a.project(h_in, h_in, h_in, kept if taken else None)  # q, k: kept heads only
        parts, probs = [], None
        keep_pos = [i for i, h in enumerate(kept) if h in store]
        plain_pos = [i for i, h in enumerate(kept) if h not in store]
        if keep_pos:
            heads = [kept[i] for i in keep_pos]
            o, probs = a.attend_with_probs(select_heads(q, keep_pos), select_heads(k, keep_pos),
                                           select_heads(v, heads), workspace)
            parts.append((heads, o))
        if plain_pos:
            heads = [kept[i] for i in plain_pos]
            parts.append((heads, a.attention(select_heads(q, plain_pos), select_heads(k, plain_pos),
                                             select_heads(v, heads))))
        for heads, p in reused:
            parts.append((heads, apply_probs(p, select_heads(v, heads))))  # P @ V_l only
        x = x + a.merge(merge_heads(parts, H))
        if self.mlp_hidden:
            x = x + self.mlp(self.ln2(x))
        return x, probs


class TransformerStack(nn.Module):
    """A stack of pre-norm blocks with one pattern per layer and cross-layer attention reuse.

    Args:
        d_model, num_heads: width and heads of every layer.
        patterns: one pattern per layer, or a single pattern for all ``num_layers`` layers.
        num_layers: required when ``patterns`` is a single pattern.
        reuse: ``{layer: heads}`` (see :class:`attncompiler.families.reuse.plan.ReusePlan`), e.g. ``{1: "all"}``.
        reuse_pattern: ``"same"`` (default) makes reuse across different patterns an error;
            ``"previous"`` lets reused heads keep the reused layer's pattern.
        reuse_schedule: how reused heads get their map (:class:`~attncompiler.families.reuse.plan.ReuseSchedule`):
            ``"stored_probs"`` (source layers keep P over their layout; reused heads compute only
            P @ V), ``"recompute"`` (scores recomputed from the kept Q/K) or ``"auto"`` (default:
            stored_probs where every source layer runs the torch backend with a batch- and
            head-independent mask pattern, else recompute; the Triton backend recomputes).
        mlp_ratio: MLP width / d_model (0: attention-only blocks).
        final_norm: end with a LayerNorm.
        backend, schedule: passed to :func:`attncompiler.compile` for every layer.
    """

    def __init__(self, d_model: int, num_heads: int, patterns: Pattern | Sequence[Pattern], *,
                 num_layers: int | None = None, reuse: Mapping[int, Any] | ReusePlan | None = None,
                 reuse_pattern: str = ReusePatternMode.SAME, reuse_schedule: str = ReuseSchedule.AUTO,
                 mlp_ratio: float = 4.0, final_norm: bool = True, backend: str = "auto",
                 schedule: Schedule | None = None):
        super().__init__()
        if isinstance(patterns, Pattern):
            if num_layers is None:
                raise PatternError("a single pattern needs num_layers=; or pass one pattern per layer")
            patterns = [patterns] * num_layers
        patterns = list(patterns)
        if num_layers is not None and num_layers != len(patterns):
            raise PatternError(f"num_layers={num_layers} but {len(patterns)} patterns were given")
        if not patterns or not all(isinstance(p, Pattern) for p in patterns):
            raise PatternError(f"patterns must be a non-empty list of attention patterns, got {patterns!r}")
        self.d_model, self.num_heads, self.patterns = d_model, num_heads, tuple(patterns)
        self.mlp_ratio, self.backend, self.reuse_pattern = mlp_ratio, backend, reuse_pattern
        self.reuse_schedule = reuse_schedule
        self._workspace = None  # ProbsWorkspace for inference under stored_probs (made on first use)
        self.layers = nn.ModuleList(TransformerBlock(d_model, num_heads, p, mlp_ratio=mlp_ratio, backend=backend,
                                                     schedule=schedule) for p in patterns)
        self.mlp_hidden = self.layers[0].mlp_hidden
        self.norm = nn.LayerNorm(d_model) if final_norm else None
        self.set_reuse(reuse, reuse_pattern, reuse_schedule)

    def set_reuse(self, reuse: Mapping[int, Any] | ReusePlan | None, reuse_pattern: str | None = None,
                  reuse_schedule: str | None = None) -> None:
        """Replace the reuse plan (and optionally the reuse pattern mode and schedule); weights
        are unchanged; validated like the constructor's arguments."""
        mode = self.reuse_pattern if reuse_pattern is None else reuse_pattern
        sched = self.reuse_schedule if reuse_schedule is None else reuse_schedule
        if sched not in ReuseSchedule.ALL:
            raise InputError(f"reuse_schedule={sched!r} must be one of {ReuseSchedule.ALL}")
        plan = ReusePlan.build(reuse, len(self.patterns), self.num_heads)
        sources = resolve_sources(plan, self.patterns, mode)
        store = stored_heads(sources)
        if sched == ReuseSchedule.STORED_PROBS:
            bad = [l for l, (heads, _) in enumerate(store) if heads and not self._probs_capable(l)]
            if bad:
                raise UnsupportedError(
                    f"reuse_schedule='stored_probs' needs the torch backend and a mask pattern with one layout "
                    f"for every batch and head in the reused layers; layer {bad[0]} has "
                    f"{self.patterns[bad[0]]!r} on backend {self.backend!r}. Use reuse_schedule='recompute' or 'auto'")
        self._sources, self._store = sources, store
        self.plan, self.reuse_pattern, self.reuse_schedule = plan, mode, sched

    def _probs_capable(self, layer: int, device: torch.device | None = None) -> bool:
        return self.layers[layer].attn.supports_probs(device)

    def resolved_reuse_schedule(self, device: torch.device | None = None) -> str:
        """The schedule a forward pass on ``device`` (default CPU) uses: ``"stored_probs"`` or
        ``"recompute"``."""
        if self.reuse_schedule == ReuseSchedule.RECOMPUTE:
            return ReuseSchedule.RECOMPUTE
        ok = all(self._probs_capable(l, device) for l, (heads, _) in enumerate(self._store) if heads)
        if not ok and self.reuse_schedule == ReuseSchedule.STORED_PROBS:
            raise UnsupportedError(f"reuse_schedule='stored_probs' cannot run on {device}: the Triton backend "
                                   "keeps the recompute path; use reuse_schedule='auto' or 'recompute'")
        return ReuseSchedule.STORED_PROBS if ok else ReuseSchedule.RECOMPUTE

    def _groups(self, layer: int):
        """``(module, heads)`` per attention module computing this layer's maps; ``()`` when the
        layer's own module computes every head."""
        own = self.layers[layer].attn.attention
        by_module: dict[int, tuple[Any, list[int]]] = {}
        for h, s in enumerate(self._sources[layer]):
            m = self._module_for(s, own)
            by_module.setdefault(id(m), (m, []))[1].append(h)
        if len(by_module) == 1 and next(iter(by_module.values()))[0] is own:
            return ()
        return tuple((m, tuple(hs)) for m, hs in by_module.values())

    def _module_for(self, s: HeadSource, own):
        m = self.layers[s.layer].attn.attention
        # Parameter-free modules with the same program are interchangeable: keep one call.
        if m is own or (not any(True for _ in m.parameters()) and m.pattern == own.pattern
                        and m.backend == own.backend and m.program == own.program):
            return own
        return m

    def forward(self, x: torch.Tensor, *, record: list | None = None, **unexpected) -> torch.Tensor:
        """``[B, L, d_model] -> [B, L, d_model]``. ``record`` (a list) receives one
        :class:`~attncompiler.families.reuse.plan.LayerAttention` per layer."""
        _reject_keywords(self, unexpected)
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.d_model:
            raise InputError(f"input must be [batch, seq, {self.d_model}], got {getattr(x, 'shape', type(x).__name__)}")
        if record is None and self.plan.layers and \
                self.resolved_reuse_schedule(x.device) == ReuseSchedule.STORED_PROBS:
            x = self._forward_stored(x)
            return self.norm(x) if self.norm is not None else x
        qk = None
        for l, block in enumerate(self.layers):
            x, qk = block.attend(x, self.plan.sources(l), qk, self._groups(l))
            if record is not None:
                heads = tuple((self.patterns[s.layer], s.head) for s in self._sources[l])
                record.append(LayerAttention(qk[0], qk[1], self.layers[l].attn.head_dim ** -0.5, heads))
        return self.norm(x) if self.norm is not None else x

    def _forward_stored(self, x: torch.Tensor) -> torch.Tensor:
        """The blocks under ``stored_probs``: each layer's probabilities that later layers reuse
        are kept until their last reader, then dropped (or, without autograd, recycled)."""
        from .codegen.pytorch.probs import ProbsWorkspace

        grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())
        grad = grad or (torch.is_grad_enabled() and x.requires_grad)
        if not grad and self._workspace is None:
            self._workspace = ProbsWorkspace()
        ws = None if grad else self._workspace
        maps: dict[int, Any] = {}  # layer -> StoredProbs of its stored heads
        for l, block in enumerate(self.layers):
            by_src: dict[int, list[tuple[int, int]]] = {}
            for h in sorted(self.plan.sources(l)):
                s = self._sources[l][h]
                by_src.setdefault(s.layer, []).append((h, s.head))
            reused = [(tuple(h for h, _ in pairs),
                       maps[sl].select_heads([self._store[sl][0].index(sh) for _, sh in pairs]))
                      for sl, pairs in by_src.items()]
            x, probs = block.attend_stored(x, reused, self._store[l][0], ws)
            if probs is not None:
                maps[l] = probs
            for sl in [sl for sl in maps if self._store[sl][1] == l]:
                dead = maps.pop(sl)
                if ws is not None:
                    ws.release(dead)
        return x

    def attention_inputs(self, x: torch.Tensor) -> list[LayerAttention]:
        """Every layer's effective Q/K and masks on input ``x`` (for the similarity analysis)."""
        rec: list[LayerAttention] = []
        self.forward(x, record=rec)
        return rec

    # -- checkpoints -----------------------------------------------------------------------
    def config(self) -> dict:
        """Constructor arguments as plain values (patterns as their code, which ``repr`` gives)."""
        return dict(d_model=self.d_model, num_heads=self.num_heads, patterns=[repr(p) for p in self.patterns],
                    reuse={str(k): {str(h): s for h, s in v.items()} for k, v in self.plan.to_spec().items()},
                    reuse_pattern=self.reuse_pattern, reuse_schedule=self.reuse_schedule, mlp_ratio=self.mlp_ratio,
                    final_norm=self.norm is not None)

    def extra_repr(self) -> str:
        return f"{self.plan}"


CHECKPOINT_FORMAT = "attncompiler.nn.TransformerStack/1"


def parse_pattern(code: str) -> Pattern:
    """Rebuild a checkpoint's pattern from its ``repr`` with the safe DSL parser (never ``eval``:
    a checkpoint is untrusted input). See :func:`attncompiler.patterns.text.parse_pattern`."""
    from .patterns.text import parse_pattern as parse

    try:
        return parse(code)
    except InputError as e:
        raise InputError(f"cannot rebuild the pattern {str(code)[:200]!r} from its code: {e}") from None


def save_checkpoint(stack: TransformerStack, path, **extra) -> None:
    """Write ``stack``'s config and weights (loadable with ``torch.load(weights_only=True)``).

    Patterns are stored as their ``repr`` and read back by the safe DSL parser, so every layer's
    pattern is checked to rebuild from its text before anything is written.

    Raises:
        InputError: a layer whose pattern has no text form (an opaque ``ac.mask(fn)``, a traced
            mask reading a tensor) or whose text does not rebuild it.
    """
    cfg = stack.config()
    for layer, (p, code) in enumerate(zip(stack.patterns, cfg["patterns"])):
        try:
            back = parse_pattern(code)
        except InputError as e:
            raise InputError(f"layer {layer}'s pattern {p!r} cannot be saved: it cannot be stored as text ({e}); "
                             "use a traceable mask_mod or a DSL/catalogue pattern") from None
        if back != p:
            raise InputError(f"layer {layer}'s pattern {p!r} cannot be saved: its code rebuilds {back!r}, "
                             "a different pattern")
    torch.save({"format": CHECKPOINT_FORMAT, "config": cfg, "state_dict": stack.state_dict(), "extra": extra}, path)


def load_checkpoint(path, *, backend: str = "auto") -> TransformerStack:
    """Rebuild a :class:`TransformerStack` written by :func:`save_checkpoint`.

    Safe on untrusted files: the file is read with ``torch.load(weights_only=True)`` (tensors and
    plain containers only) and patterns are parsed as DSL text, never evaluated.

    Raises:
        InputError: the file is not a readable checkpoint, or its config or patterns are malformed.
    """
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as e:
        raise InputError(f"cannot read checkpoint {str(path)!r}: {e}") from e
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"{str(path)!r} is not an attncompiler.nn checkpoint (expected format {CHECKPOINT_FORMAT!r}); "
                         "write one with attncompiler.nn.save_checkpoint(stack, path)")
    cfg = ck.get("config")
    codes = cfg.get("patterns") if isinstance(cfg, dict) else None
    if not isinstance(codes, list) or not all(isinstance(c, str) for c in codes) or not isinstance(
            ck.get("state_dict"), Mapping):
        raise InputError(f"checkpoint {str(path)!r} is malformed: it needs a config with a list of pattern strings "
                         "and a state_dict; write it with attncompiler.nn.save_checkpoint(stack, path)")
    cfg = dict(cfg)
    patterns = [parse_pattern(c) for c in cfg.pop("patterns")]
    try:
        reuse = {int(k): {int(h): int(s) for h, s in v.items()} for k, v in cfg.pop("reuse").items()}
        stack = TransformerStack(cfg.pop("d_model"), cfg.pop("num_heads"), patterns, reuse=reuse, backend=backend,
                                 **cfg)
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise InputError(f"checkpoint {str(path)!r} has a malformed config ({type(e).__name__}: {e}); "
                         "write it with attncompiler.nn.save_checkpoint(stack, path)") from None
    try:
        stack.load_state_dict(ck["state_dict"])
    except (RuntimeError, TypeError) as e:
        raise InputError(f"checkpoint {str(path)!r}: weights do not fit its config: {e}") from None
    return stack
