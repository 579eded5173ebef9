"""One transformers attention call run with compiled modules: padding, packing and cache offsets.

Compiled modules are cached by pattern (and score modification), so a model holds one module per
layer kind and a decode loop never compiles anything after its first step
(:func:`compiled_modules` counts them). Left padding is read as a shift: a row whose first ``s``
keys are padding runs on its keys ``s:`` with its positions moved by ``s``, which leaves every
translation-invariant mask (causal, sliding windows) exactly as transformers builds it.
Structured families (Combiner, Diffuser, ABC memory) run as each layer's own submodule
(:func:`attach_family`, :func:`run_family`) on unpadded sequences.
"""

from __future__ import annotations

import weakref

import numpy as np
import torch

from ..dsl.pattern import Pattern
from ..dsl.primitives import document
from ..dsl.score_mod import softcap as make_softcap
from ..errors import InputError, UnsupportedError
from ..families.combiner.pattern import FAMILY as COMBINER
from ..families.diffusion.pattern import DIFFUSION
from ..families.memory.pattern import MEMORY, memory
from ..runtime.compile import compile as compile_pattern
from ..runtime.memory import MemoryAttention
from ..runtime.module import CompiledAttention
from .hf_masks import HFLayout

# (pattern, backend, softcap) -> module, for layers without sinks: a handful per model.
MODULES: dict[tuple, CompiledAttention] = {}
# Modules of layers with sinks live on the layer (SINK_ATTR): the sinks are that layer's parameter,
# so the module dies with the layer instead of pinning every model ever built in a global cache.
SINK_ATTR = "_attncompiler_sink_modules"
SINK_MODULES: "weakref.WeakSet[CompiledAttention]" = weakref.WeakSet()


def compiled_modules() -> int:
    """How many attention modules the transformers integration holds in this process (the shared
    ones plus the live per-layer ones of layers with attention sinks)."""
    return len(MODULES) + len(SINK_MODULES)


def module_for(pattern: Pattern, backend: str, softcap: float | None, sinks: torch.Tensor | None,
               layer: torch.nn.Module | None = None) -> CompiledAttention:
    """The (cached) compiled module of one layer kind.

    ``softcap`` (Gemma 2's ``attn_logit_softcapping``) becomes ``ac.softcap(cap)``, applied to the
    scaled score before the mask as transformers' eager attention does. ``sinks`` (gpt-oss
    ``s_aux``, a parameter ``[H]``) is held by reference, never copied or keyed by value, so an
    optimizer step on it is seen by the next call; its modules are cached on ``layer`` (one per
    pattern), rebuilt only when the layer hands over a different tensor object.
    """
    key = (pattern, backend, softcap)
    if sinks is not None:
        cache = None if layer is None else layer.__dict__.setdefault(SINK_ATTR, {})
        held = None if cache is None else cache.get(key)
        if held is not None and held[0] is sinks:
            return held[1]
        mod = compile_pattern(pattern, backend, score_mod=None if softcap is None else make_softcap(softcap),
                              sinks=sinks)
        SINK_MODULES.add(mod)
        if cache is not None:
            cache[key] = (sinks, mod)  # replaces a module built for an earlier sinks tensor
        return mod
    mod = MODULES.get(key)
    if mod is None:
        mod = compile_pattern(pattern, backend, score_mod=None if softcap is None else make_softcap(softcap))
        MODULES[key] = mod
    return mod


def run_attention(mod_of, pattern: Pattern, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None,
                  layout: HFLayout | None) -> torch.Tensor:
    """``out [B, H, Lq, D]`` of ``pattern`` on one layer call; ``mod_of(pattern)`` gives the module.

    Without a layout (no mask hook ran) the queries are the last ``Lq`` positions of the keys.
    Query rows that sit on left padding get zeros (transformers never reads them).
    """
    B, _, Lq, _ = q.shape
    Lk = k.shape[2]
    if layout is None:
        return mod_of(pattern)(q, k, v, scale, q_offset=Lk - Lq)
    if (layout.q_length, layout.kv_length) != (Lq, Lk) or layout.batch not in (B, 1):
        raise InputError(f"the attention mask was built for batch {layout.batch}, {layout.q_length} queries and "
                         f"{layout.kv_length} keys, but the layer got q {list(q.shape)} and k {list(k.shape)}; "
                         "build the mask with the same inputs as the attention call")
    qo = layout.q_offset - layout.kv_offset  # key j sits at kv_offset + j
    if qo < 0:
        raise InputError(f"q_offset={layout.q_offset} < kv_offset={layout.kv_offset}: queries before the cached keys")
    no_padding = layout.starts is None and layout.ends is None and layout.documents is None
    groups = [((0, Lk, None), list(range(B)))] if no_padding else row_groups(layout, B, Lk)
    if len(groups) == 1 and groups[0][0] == (0, Lk, None):
        # The common call (no padding, no packing: every decode step): ``forward`` directly, as the
        # cached modules carry no hooks, saving nn.Module's per-call dispatch.
        return mod_of(pattern).forward(q, k, v, scale, q_offset=qo)
    outs, order = [], []
    for (start, end, docs), rows in groups:
        sel = torch.tensor(rows, device=q.device)
        qg, kg, vg = (t.index_select(0, sel) for t in (q, k, v))
        r0 = min(max(start - qo, 0), Lq)  # rows on left padding
        shape = (len(rows), q.shape[1], r0, v.shape[-1])
        pieces = [q.new_zeros(shape)]
        if end > start and r0 < Lq:
            kw = {"q_offset": qo + r0 - start}
            p = pattern
            if docs is not None:
                p = pattern & document()
                kw["cu_seqlens"] = torch.tensor(np.concatenate([[0], np.cumsum(docs)]), dtype=torch.int64)
            pieces.append(mod_of(p)(qg[:, :, r0:], kg[:, :, start:end], vg[:, :, start:end], scale, **kw))
        else:
            pieces.append(q.new_zeros((len(rows), q.shape[1], Lq - r0, v.shape[-1])))
        outs.append(torch.cat(pieces, dim=2))
        order += rows
    out = torch.cat(outs)
    if order != list(range(B)):
        inverse = torch.empty(B, dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(B)
        out = out.index_select(0, inverse.to(q.device))
    return out


def row_groups(layout: HFLayout, batch: int, kv_len: int) -> list[tuple[tuple, list[int]]]:
    """Batch rows with equal ``(start, end, documents)``, in first-seen order."""
    groups: dict[tuple, list[int]] = {}
    for b in range(batch):
        r = b if layout.batch == batch else 0
        start = 0 if layout.starts is None else int(layout.starts[r])
        end = kv_len if layout.ends is None else int(layout.ends[r])
        docs = None if layout.documents is None else layout.documents[r]
        if docs is not None and len(docs) == 1:
            docs = None  # one document: no document mask
        groups.setdefault((start, end, docs), []).append(b)
    return list(groups.items())


# ---------------------------------------------------------------------------------------------
# Structured families (Combiner, Diffuser, ABC memory) as one layer's attention
# ---------------------------------------------------------------------------------------------

FAMILY_ATTR = "attncompiler_family"  # a layer's own compiled family module, registered as its submodule
# Families whose output row i depends on query i alone (plus keys and values): they decode from a
# cache. ABC only: Combiner pools queries into its span summaries, a Diffuser's hops mix every row.
QUERY_LOCAL = frozenset({MEMORY})
# What a causal layer runs for each family: the family's causal variant.
CAUSAL_VARIANTS = {
    COMBINER: lambda p: p.causal(),
    DIFFUSION: lambda p: p.causal(),
    MEMORY: lambda p: memory(p.slots, p.control, causal=True),
}


def family_is_causal(pattern: Pattern) -> bool | None:
    """Whether a family pattern is built causal (None: decided by a mask inside it, as Diffuser's base)."""
    if pattern.family == COMBINER:
        return all(f.autoregressive for f in pattern.factorizations())
    if pattern.family == MEMORY:
        return bool(pattern.is_causal)
    return None


def layer_family_pattern(pattern: Pattern, layer_idx: int, is_causal: bool) -> Pattern:
    """The family pattern a layer with causality ``is_causal`` runs: the causal variant for a causal
    layer; a causal family on a bidirectional layer is refused (it would hide keys the model sees).

    Raises:
        UnsupportedError: a family without a causal variant on a causal layer, or a causal family
            (``causal=True``) on a bidirectional layer.
    """
    if is_causal:
        variant = CAUSAL_VARIANTS.get(pattern.family)
        if variant is None:
            raise UnsupportedError(f"layer {layer_idx} is causal but {pattern.family} pattern {pattern!r} has no "
                                   "causal variant; give this layer a mask pattern or a Combiner, Diffuser or "
                                   "ABC memory pattern")
        return variant(pattern)
    if family_is_causal(pattern):
        raise UnsupportedError(f"layer {layer_idx} is bidirectional (is_causal=False) but {pattern.family} pattern "
                               f"{pattern!r} is causal; use its bidirectional form (without causal=True)")
    return pattern


def attach_family(layer: torch.nn.Module, pattern: Pattern, head_dim: int) -> None:
    """Give ``layer`` its compiled family module as the submodule ``attncompiler_family``, so learned
    parameters (ABC's control) train with the model, are saved in its state_dict and move with
    ``.to()``. A module already holding ``pattern`` is kept (its trained parameters with it)."""
    held = layer._modules.get(FAMILY_ATTR)
    if held is not None and held.pattern == pattern:
        return
    mod = compile_pattern(pattern, "auto")
    ref = next(layer.parameters(), None)
    if isinstance(mod, MemoryAttention):
        mod.materialize(head_dim, None if ref is None else ref.device)  # parameters exist before an optimizer
    if ref is not None and ref.is_floating_point():
        mod.to(ref.dtype)
    setattr(layer, FAMILY_ATTR, mod)


def detach_family(layer: torch.nn.Module) -> None:
    """Remove a layer's family module (it gets a mask pattern or its own attention back)."""
    if FAMILY_ATTR in layer._modules:
        delattr(layer, FAMILY_ATTR)


def run_family(layer: torch.nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None,
               layout: HFLayout | None) -> torch.Tensor:
    """``out [B, H, L, D]`` of the layer's family module on its q/k/v (GQA kv heads as they are).

    ABC memory also decodes from a full KV cache (the new queries are the last rows).

    Raises:
        UnsupportedError: padding, packed sequences, KV-cache decoding of a Combiner or Diffuser
            (their rows depend on every query) or with a sliding cache.
    """
    mod = layer._modules[FAMILY_ATTR]
    idx = getattr(layer, "layer_idx", "?")
    if layout is not None and (layout.starts is not None or layout.ends is not None):
        raise UnsupportedError(f"layer {idx}: a padding mask with the {mod.pattern.family} pattern {mod.pattern!r} "
                               "is not supported (padding would enter its summaries/memory); run unpadded batches "
                               "of equal length (attention_mask=None or all ones)")
    if layout is not None and layout.documents is not None and any(len(d) > 1 for d in layout.documents):
        raise UnsupportedError(f"layer {idx}: packed sequences (position_ids restarting) with the "
                               f"{mod.pattern.family} pattern {mod.pattern!r} are not supported; run one sequence "
                               "per row")
    Lq, Lk = q.shape[2], k.shape[2]
    q_offset = Lk - Lq if layout is None else layout.q_offset - layout.kv_offset
    if q_offset == 0 and Lq == Lk:
        return mod(q, k, v, scale)
    kv_offset = 0 if layout is None else layout.kv_offset
    if mod.pattern.family in QUERY_LOCAL and kv_offset == 0 and q_offset + Lq == Lk:
        # Decoding: row i reads only q_i and keys/values (through the memory slots), so the new
        # queries run as the last rows of the whole sequence, the earlier rows' queries zero.
        # O(Lk) per step, no state to carry and no recompilation.
        past = q.new_zeros(q.shape[0], q.shape[1], q_offset, q.shape[3])
        return mod(torch.cat([past, q], dim=2), k, v, scale)[:, :, q_offset:]
    raise UnsupportedError(f"layer {idx}: KV-cache decoding ({Lq} queries at position {q_offset + kv_offset} "
                           f"after keys from position {kv_offset}) with the {mod.pattern.family} pattern "
                           f"{mod.pattern!r} is not supported (its rows depend on every query: Combiner pools "
                           "queries into span summaries, a Diffuser's hops mix rows; ABC memory decodes); run "
                           "whole sequences with use_cache=False")
