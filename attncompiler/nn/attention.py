"""The drop-in multi-head attention module: projections around a compiled attention pattern."""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn

from ..dsl.pattern import Pattern
from ..dsl.primitives import full
from ..errors import InputError, UnsupportedError
from ..families.reuse.plan import select_heads
from ..program.inputs import check_keywords
from ..program.schedule import Schedule
from ..program.stages import BlockSparseAttention
from ..runtime.compile import compile as compile_attention


def reject_keywords(module: nn.Module, unexpected: dict) -> None:
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
        # is_causal's module, built here so that a traced forward only looks it up (a plain dict:
        # not a submodule, so the state dict is unchanged).
        self._causal = ({"attention": compile_attention(self.pattern.causal(), backend, schedule=schedule)}
                        if self.pattern.family == "mask" else {})
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
        from ..runtime.module import resolve_backend

        stages = self.attention.program.stages
        p = self.pattern
        return (resolve_backend(self.attention.backend, device) == "torch" and len(stages) == 1
                and isinstance(stages[0], BlockSparseAttention) and p.family == "mask"
                and p.head_period == 1 and not p.batch_dependent)

    def attend_with_probs(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, workspace=None):
        """``(out [B, h, L, D], StoredProbs)``: this module's attention that also keeps its
        probabilities over the block layout (see :mod:`attncompiler.codegen.pytorch.probs`)."""
        from ..codegen.pytorch.probs import attention_with_probs

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
        reject_keywords(self, unexpected)
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
            attention = self._causal["attention"]
        out = self.merge(attention(q, k, v))
        return (out if self.batch_first else out.transpose(0, 1)), None

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, pattern={self.pattern!r}"
