"""Hugging Face transformers backend: ``attn_implementation="attncompiler"``.

>>> from attncompiler.integrations import transformers as ac_hf
>>> ac_hf.register()
>>> model = AutoModelForCausalLM.from_config(config, attn_implementation="attncompiler")
>>> ac_hf.set_patterns(model, {"*": ac.sliding_window(512) | ac.global_tokens(range(8))})

By default a model computes its own attention exactly (causal or bidirectional layers, per-layer
sliding windows, GQA, Gemma 2's logit softcap, gpt-oss attention sinks, left/right padding,
packed sequences through ``position_ids``, KV-cache prefill and decoding). The mask hook reads
each forward's mask into one :class:`HFLayout` that every layer uses; :func:`set_patterns` then
gives any layer any mask pattern, with the model's causality and padding applied on top, or a
structured family (Combiner, Diffuser, ABC memory) run on the layer's q/k/v. Under
torch.distributed, :func:`enable_context_parallel` runs every layer's pattern as sequence-parallel
ring attention, each rank holding a shard of the sequence (:mod:`.hf_context_parallel`).
transformers is imported only when these functions run.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from ..analysis.graph import attention_graph, layer_operator
from ..dsl.pattern import Family, Pattern, causal
from ..errors import InputError, UnexpectedArgumentError, UnsupportedError
from .hf_context_parallel import CP_ATTR, ContextParallel, check_sharding
from .hf_masks import HFLayout, build_layout, model_pattern
from .hf_run import (CAUSAL_VARIANTS, attach_family, compiled_modules, detach_family,
                     layer_family_pattern, module_for, run_attention, run_family)

NAME = "attncompiler"
PATTERN_ATTR = "attncompiler_pattern"  # set on attention modules by set_patterns
# Keywords transformers' models hand to every attention function that do not change the result here.
PLUMBING = frozenset({"position_ids", "cache_position", "use_cache", "output_attentions", "output_hidden_states",
                      "return_dict", "layer_idx", "past_key_values", "cache", "position_embeddings",
                      "shift_labels", "num_items_in_batch",
                      "logits_to_keep", "token_type_ids", "deterministic", "target_dtype", "sliding_window", "is_causal", "softcap", "s_aux"})

__all__ = ["register", "attention_forward", "mask_hook", "set_patterns", "layer_patterns", "analyze",
           "StackReport", "compiled_modules", "HFLayout", "enable_context_parallel", "disable_context_parallel",
           "shard_inputs", "ContextParallel"]


def register() -> None:
    """Add ``"attncompiler"`` to transformers' ``AttentionInterface`` and ``AttentionMaskInterface``.

    Both are needed: with only the attention function registered, transformers hands it no mask
    and padding would be ignored.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, mask_hook)


def mask_hook(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0, mask_function=None,
              attention_mask: torch.Tensor | None = None, **kwargs) -> HFLayout:
    """transformers' mask interface: one :class:`HFLayout` per mask kind and forward (no dense mask)."""
    return build_layout(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask)


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask, dropout: float = 0.0, scaling: float | None = None,
                      **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: ``(out [B, Lq, H, D] contiguous, None)``.

    ``query`` is ``[B, H, Lq, D]``, ``key``/``value`` ``[B, Hkv, Lk, D]``. The layer's pattern is the
    one :func:`set_patterns` gave it (with the model's causality on top), else the model's own
    mask from ``attention_mask`` (an :class:`HFLayout` built by :func:`mask_hook`).

    Raises:
        UnsupportedError: attention dropout in training, a prepared 4D tensor mask.
        UnexpectedArgumentError: a keyword this function does not know (it would be ignored).
    """
    unknown = [n for n, v in kwargs.items() if n not in PLUMBING and not n.startswith("output_") and v is not None]
    if unknown:
        hint = (" (FlashAttention packing keywords: pack through position_ids instead)"
                if any(n.startswith(("cu_seq_lens", "max_length")) for n in unknown) else "")
        raise UnexpectedArgumentError(f"attncompiler attention got unexpected keyword argument(s) "
                                      f"{', '.join(map(repr, unknown))}{hint}")
    if dropout and dropout > 0:
        raise UnsupportedError(f"attention dropout={dropout} in training mode is not implemented by attncompiler; "
                               "set config.attention_dropout = 0.0 (or call model.eval())")
    if isinstance(attention_mask, torch.Tensor):
        raise UnsupportedError(f"a prepared {attention_mask.dim()}D tensor attention mask {list(attention_mask.shape)} "
                               "reached attncompiler; pass a 2D padding mask (the mask hook reads it) or use "
                               "set_patterns for custom masks")
    layout = attention_mask if isinstance(attention_mask, HFLayout) else None
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = layout.base == "causal" if layout is not None else getattr(module, "is_causal", True)
    state = getattr(module, "__dict__", {})  # set_patterns / enable_context_parallel store here; a miss
    chosen = state.get(PATTERN_ATTR)  # through nn.Module.__getattr__ costs an exception per call
    if chosen is not None and chosen.family != Family.MASK:
        return attention_family(module, query, key, value, scaling, layout, kwargs, state.get(CP_ATTR))
    if chosen is not None:
        pattern = with_causality(chosen) if is_causal else chosen
        if layout is not None and layout.kv_offset and not is_causal_window_only(chosen):
            raise UnsupportedError(f"layer {getattr(module, 'layer_idx', '?')}: pattern {chosen!r} with a sliding "
                                   f"KV cache (keys start at position {layout.kv_offset}); use a full cache "
                                   "(DynamicCache without sliding layers) with set_patterns")
    elif layout is not None:
        pattern = layout.pattern
    else:
        pattern = model_pattern(bool(is_causal), kwargs.get("sliding_window"), bidirectional_inclusive=False)
    softcap, sinks = kwargs.get("softcap"), kwargs.get("s_aux")
    cp = state.get(CP_ATTR)
    if cp is not None:
        out = cp.attention(pattern, query, key, value, scaling, layout, softcap=softcap, sinks=sinks)
        return out.transpose(1, 2).contiguous(), None
    backend = "auto"
    out = run_attention(lambda p: module_for(p, backend, softcap, sinks, module), pattern, query, key, value, scaling,
                        layout)
    return out.transpose(1, 2).contiguous(), None


def attention_family(module, query, key, value, scaling, layout, kwargs, cp) -> tuple[torch.Tensor, None]:
    """A layer given a structured family by :func:`set_patterns`: its own module on its q/k/v."""
    idx = getattr(module, "layer_idx", "?")
    family = module.__dict__[PATTERN_ATTR].family
    if cp is not None:
        raise UnsupportedError(f"layer {idx}: the {family} pattern under context parallelism is not supported (the "
                               "ring runs mask patterns); disable_context_parallel(model) or give the layer a mask")
    for name, what in (("softcap", "logit softcap"), ("s_aux", "attention sinks (s_aux)")):
        if kwargs.get(name) is not None:
            raise UnsupportedError(f"layer {idx}: the model's {what} cannot be applied to the {family} pattern; "
                                   "give this layer a mask pattern")
    return run_family(module, query, key, value, scaling, layout).transpose(1, 2).contiguous(), None


@functools.lru_cache(maxsize=256)
def with_causality(pattern: Pattern) -> Pattern:
    """``pattern & causal()``, built once per pattern (every layer call of a causal model asks)."""
    return pattern & causal()


def is_causal_window_only(pattern: Pattern) -> bool:
    """Whether a pattern depends on position differences only (then a sliding cache's offset is harmless)."""
    from ..dsl.pattern import Causal, Intersection
    from ..dsl.primitives import Full, SlidingWindow

    if isinstance(pattern, (Causal, SlidingWindow, Full)):
        return True
    return isinstance(pattern, Intersection) and all(is_causal_window_only(p) for p in pattern.parts)


def attention_modules(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """The model's self-attention modules by layer index (modules with ``layer_idx`` and ``is_causal``)."""
    found: dict[int, torch.nn.Module] = {}
    for m in model.modules():
        idx = getattr(m, "layer_idx", None)
        if isinstance(idx, int) and hasattr(m, "is_causal") and idx not in found:
            found[idx] = m
    if not found:
        raise UnsupportedError(f"no attention modules with layer_idx and is_causal in {type(model).__name__}; "
                               "set_patterns needs a transformers model with per-layer attention modules")
    return dict(sorted(found.items()))


def set_patterns(model: torch.nn.Module, patterns: dict) -> torch.nn.Module:
    """Give layers their own patterns: ``{"*": pattern, 3: other, ...}`` (layer index or ``"*"``).

    Mask patterns: the model's causality (``is_causal``) and padding are applied on top; a pattern
    given to a layer replaces the layer's own mask (its sliding window too). Pattern positions are
    token indices counted from each row's first non-padding token.

    Structured families (``ac.combiner_*``, ``ac.diffuse``, ``ac.memory``) replace the layer's
    attention on its q/k/v: a causal layer runs the family's causal variant; the compiled module
    becomes the layer's submodule ``attncompiler_family`` (ABC's learned control parameter trains
    with the model, is saved in its state_dict and moves with ``.to()``). They run unpadded
    sequences: padding, packed sequences, softcap and sinks raise :class:`UnsupportedError` at the
    call; ABC memory decodes from a full KV cache (O(L) per token), Combiner and Diffuser
    layers refuse KV-cache decoding (their rows depend on every query).

    ``None`` restores a layer's own mask. The model is switched to
    ``attn_implementation="attncompiler"`` (registering it if needed).

    Raises:
        InputError: a key that is not ``"*"`` or a layer index, or a value that is not a pattern.
        UnsupportedError: a causal family pattern on a bidirectional layer, or a family without a
            causal variant on a causal layer (the message names the layer).
    """
    mods = attention_modules(model)
    default = patterns.get("*", ...)
    for key, p in patterns.items():
        if key != "*" and (isinstance(key, bool) or not isinstance(key, int) or key not in mods):
            raise InputError(f"set_patterns key {key!r} is not '*' or a layer index of this model "
                             f"(0..{max(mods)})")
        if p is not None and (not isinstance(p, Pattern) or
                              (p.family != Family.MASK and p.family not in CAUSAL_VARIANTS)):
            raise InputError(f"set_patterns[{key!r}] = {p!r} must be a mask pattern (ac.sliding_window(...), "
                             "ac.mask(...), ...), a Combiner, Diffuser or ABC memory pattern, or None")
    chosen = {i: p for i, m in mods.items() if (p := patterns.get(i, default)) is not ...}
    effective = {i: p if p is None or p.family == Family.MASK else layer_family_pattern(p, i, bool(mods[i].is_causal))
                 for i, p in chosen.items()}  # every refusal before any layer changes
    for idx, p in effective.items():
        m = mods[idx]
        if p is not None and p.family != Family.MASK:
            attach_family(m, p, layer_head_dim(model, m))
        else:
            detach_family(m)
        setattr(m, PATTERN_ATTR, p)
    register()
    if getattr(model.config, "_attn_implementation", None) != NAME:
        model.set_attn_implementation(NAME)
    return model


def layer_head_dim(model: torch.nn.Module, layer: torch.nn.Module) -> int:
    """A layer's query/key head dimension (``layer.head_dim``, else from the config)."""
    hd = getattr(layer, "head_dim", None) or getattr(model.config, "head_dim", None)
    return int(hd or model.config.hidden_size // model.config.num_attention_heads)


def enable_context_parallel(model: torch.nn.Module, group=None, sharding: str = "auto") -> ContextParallel:
    """Run the model's attention as sequence-parallel ring attention over ``group`` (default: the world).

    Each rank then feeds the model its shard of the sequence, cut by :meth:`ContextParallel.shard_inputs`
    (which also gives the global ``position_ids`` rotary embeddings need); see
    :mod:`~attncompiler.integrations.hf_context_parallel`. ``sharding`` is ``"contiguous"``,
    ``"zigzag"``, ``"striped"`` or ``"auto"`` (chosen per sequence length from the layers' patterns).
    Layer patterns (:func:`set_patterns`) apply as without context parallelism. The model is switched
    to ``attn_implementation="attncompiler"`` and ``config.use_cache`` to False (no KV cache:
    decoding is not supported; :func:`disable_context_parallel` restores both).

    Raises:
        InputError: torch.distributed is not initialized, or an unknown ``sharding``.
    """
    import torch.distributed as dist

    sharding = check_sharding(sharding)
    if not dist.is_available() or not dist.is_initialized():
        raise InputError("context parallelism needs an initialized process group; run under torchrun (or call "
                         "torch.distributed.init_process_group) before enable_context_parallel")
    mods = attention_modules(model)
    cp = ContextParallel(group, sharding, lambda: layer_patterns(model),
                         int(getattr(model.config, "num_attention_heads", 1) or 1))
    for m in mods.values():
        setattr(m, CP_ATTR, cp)
    if not hasattr(model, "attncompiler_use_cache"):
        model.attncompiler_use_cache = getattr(model.config, "use_cache", None)
    model.config.use_cache = False
    register()
    if getattr(model.config, "_attn_implementation", None) != NAME:
        model.set_attn_implementation(NAME)
    return cp


def disable_context_parallel(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`enable_context_parallel`: every rank runs whole sequences again; ``use_cache`` restored."""
    for m in attention_modules(model).values():
        if hasattr(m, CP_ATTR):
            delattr(m, CP_ATTR)
    if hasattr(model, "attncompiler_use_cache"):
        model.config.use_cache = model.__dict__.pop("attncompiler_use_cache")
    return model


def shard_inputs(model: torch.nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                 labels: torch.Tensor | None = None, *, shift_labels: bool = True) -> dict:
    """This rank's part of a batch for a model under :func:`enable_context_parallel`
    (see :meth:`ContextParallel.shard_inputs`): ``model(**shard_inputs(model, ids, labels=ids))``."""
    cps = {id(c): c for m in attention_modules(model).values() if (c := getattr(m, CP_ATTR, None)) is not None}
    if len(cps) != 1:
        raise InputError(f"shard_inputs needs a model under enable_context_parallel ({type(model).__name__} has "
                         f"{'no' if not cps else len(cps)} context-parallel state{'s' if len(cps) > 1 else ''})")
    return next(iter(cps.values())).shard_inputs(input_ids, position_ids, labels, shift_labels=shift_labels)


def layer_patterns(model: torch.nn.Module) -> dict[int, Pattern]:
    """Each layer's effective pattern: its :func:`set_patterns` pattern with causality, else its own mask
    (read from the module's ``is_causal``/``sliding_window`` and the config's ``layer_types``)."""
    cfg = model.config
    types = getattr(cfg, "layer_types", None)
    out = {}
    for idx, m in attention_modules(model).items():
        chosen = getattr(m, PATTERN_ATTR, None)
        is_causal = bool(m.is_causal)
        if chosen is not None:  # a family pattern is stored as the variant the layer runs
            out[idx] = chosen & causal() if is_causal and chosen.family == Family.MASK else chosen
            continue
        window = getattr(m, "sliding_window", None)
        if window is None and (types is None or types[idx] == "sliding_attention"):
            window = getattr(cfg, "sliding_window", None) if types is not None or is_causal else None
        out[idx] = model_pattern(is_causal, window, bidirectional_inclusive=False) if window else \
            model_pattern(is_causal, None, bidirectional_inclusive=False)
    return out


@dataclass(frozen=True)
class StackReport:
    """Stacked reach of a model's attention layers at one sequence length.

    ``hops_to_full``: layers (running through the model's layers in order, repeating the stack)
    until every legal (query, key) pair is connected, or None if not within ``max_layers``.
    ``reach_after_model``: fraction of legal pairs connected after the model's own depth.
    ``level``: ``"token"`` (exact) or ``"block"`` (block quotient: reach is an upper bound, hops a lower bound).
    """

    seq_len: int
    layers: int
    causal: bool
    level: str
    block: int
    hops_to_full: int | None
    reach_after_model: float
    patterns: tuple[str, ...]
    seconds: float

    def __str__(self) -> str:
        kinds = sorted(set(self.patterns), key=self.patterns.index)
        rows = [f"stacked reach of {self.layers} layers at L={self.seq_len} ({self.level} level"
                + (f", block {self.block}" if self.level == "block" else "") + ")",
                f"  hops_to_full        {self.hops_to_full if self.hops_to_full is not None else 'not reached'}",
                f"  reach after model   {self.reach_after_model:.4f}",
                f"  causal              {self.causal}"]
        rows += [f"  layers {sum(p == k for p in self.patterns):>3} x {k}" for k in kinds]
        return "\n".join(rows)


def analyze(model: torch.nn.Module, seq_len: int, *, max_layers: int | None = None,
            token_max: int = 1024) -> StackReport:
    """Stacked reach across the model's layers and patterns (see :class:`StackReport`).

    Token level (exact) up to ``seq_len <= token_max``, block level beyond. ``max_layers`` bounds
    the search for ``hops_to_full`` (default: four times the model's depth, at least 16). Layers
    given a structured family count through its attention graph (a Combiner summary or an ABC
    memory slot is one layer step; a Diffuser layer reaches what its hops reach).
    """
    import time

    t0 = time.perf_counter()
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len <= 0:
        raise InputError(f"seq_len={seq_len!r} must be a positive integer")
    pats = layer_patterns(model)
    order = [pats[i] for i in sorted(pats)]
    depth = len(order)
    limit = max_layers if max_layers is not None else max(4 * depth, 16)
    level = "token" if seq_len <= token_max else "block"
    block = 1 if level == "token" else max(1, math.ceil(seq_len / 512))
    ops: dict[Pattern, np.ndarray] = {}
    for p in set(order):
        g = attention_graph(p, seq_len, level=level, block=block) if level == "block" else \
            attention_graph(p, seq_len, level="token")
        ops[p] = layer_operator(g).toarray().astype(np.float32)
    n = next(iter(ops.values())).shape[0]
    is_causal = all(np.allclose(np.triu(m, 1), 0) for m in ops.values())
    legal = np.tril(np.ones((n, n), bool)) if is_causal else np.ones((n, n), bool)
    r = np.eye(n, dtype=np.float32)
    hops, after = None, None
    for step in range(1, limit + 1):
        r = np.minimum(r + ops[order[(step - 1) % depth]] @ r, 1.0)  # residual stream keeps what it had
        full = bool((r > 0)[legal].all())
        if step == depth:
            after = float((r > 0)[legal].mean())
        if full and hops is None:
            hops = step
        if hops is not None and step >= depth:
            break
    if after is None:
        after = float((r > 0)[legal].mean())
    return StackReport(seq_len, depth, is_causal, level, block, hops, after, tuple(repr(p) for p in order),
                       time.perf_counter() - t0)
