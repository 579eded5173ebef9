"""Pre-norm transformer blocks and stacks of them, with cross-layer attention reuse."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..errors import InputError, PatternError, UnsupportedError
from ..dsl.pattern import Pattern
from ..families.reuse.plan import (HeadSource, ReusePatternMode, ReusePlan, ReuseSchedule, merge_heads,
                                  resolve_sources, select_heads, stored_heads)
from ..families.reuse.similarity import LayerAttention
from ..program.schedule import Schedule
from .attention import MultiheadAttention, reject_keywords






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
        reject_keywords(self, unexpected)
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
        from ..codegen.pytorch.probs import apply_probs

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
        reject_keywords(self, unexpected)
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
        from ..codegen.pytorch.probs import ProbsWorkspace

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








