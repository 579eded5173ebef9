"""The transformers backend: models from configs (random weights, offline) agree with eager/SDPA."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

import attncompiler as ac  # noqa: E402
from attncompiler.errors import UnexpectedArgumentError, UnsupportedError  # noqa: E402
from attncompiler.integrations import transformers as ac_hf  # noqa: E402
from attncompiler.integrations.hf_masks import build_layout  # noqa: E402
from transformers import masking_utils as mu  # noqa: E402

ac_hf.register()
TOL = 1e-4
SMALL = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, attention_dropout=0.0)


def build(name: str, **over):
    """A tiny model of one architecture, random weights, eval mode, fp32."""
    torch.manual_seed(0)
    if name == "llama":
        cfg, cls = transformers.LlamaConfig(**{**SMALL, **over}), transformers.LlamaForCausalLM
    elif name == "mistral":
        cfg, cls = transformers.MistralConfig(**{**SMALL, "sliding_window": 5, **over}), transformers.MistralForCausalLM
    elif name == "gemma2":
        kw = {**SMALL, "head_dim": 16, "sliding_window": 4, "query_pre_attn_scalar": 16,
              "attn_logit_softcapping": None, "final_logit_softcapping": None, **over}
        cfg, cls = transformers.Gemma2Config(**kw), transformers.Gemma2ForCausalLM
    elif name == "qwen3":
        cfg, cls = transformers.Qwen3Config(**{**SMALL, "head_dim": 16, **over}), transformers.Qwen3ForCausalLM
    elif name == "modernbert":
        kw = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  local_attention=6, global_attn_every_n_layers=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                  cls_token_id=1, sep_token_id=2, attention_dropout=0.0, **over)
        cfg, cls = transformers.ModernBertConfig(**kw), transformers.ModernBertForMaskedLM
    elif name == "gpt_oss":
        kw = {**SMALL, "head_dim": 16, "num_local_experts": 2, "num_experts_per_tok": 1, "sliding_window": 4,
              **over}
        cfg, cls = transformers.GptOssConfig(**kw), transformers.GptOssForCausalLM
    else:
        raise KeyError(name)
    return cls(cfg).eval()


def logits(model, impl, **inputs):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model(**inputs).logits


DECODERS = ["llama", "mistral", "gemma2", "qwen3"]


def left_padded(batch=3, length=13, pads=(0, 4, 1)):
    torch.manual_seed(1)
    ids = torch.randint(1, 97, (batch, length))
    mask = torch.ones(batch, length, dtype=torch.long)
    for b, p in enumerate(pads):
        mask[b, :p] = 0
    return ids, mask, pads


@pytest.mark.parametrize("name", DECODERS + ["modernbert"])
def test_logits_match_eager_and_sdpa_on_left_padded_batch(name):
    model = build(name)
    ids, mask, pads = left_padded()
    ref = logits(model, "eager", input_ids=ids, attention_mask=mask)
    got = logits(model, "attncompiler", input_ids=ids, attention_mask=mask)
    sdpa = logits(model, "sdpa", input_ids=ids, attention_mask=mask) if model._supports_sdpa else ref
    for b, p in enumerate(pads):
        torch.testing.assert_close(got[b, p:], ref[b, p:], atol=TOL, rtol=TOL)
        torch.testing.assert_close(got[b, p:], sdpa[b, p:], atol=TOL, rtol=TOL)


@pytest.mark.parametrize("name", DECODERS)
def test_logits_match_on_packed_sequences(name):
    model = build(name)
    torch.manual_seed(2)
    ids = torch.randint(1, 97, (2, 15))
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 6, 0, 1],
                        [0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 2, 3, 4, 5]])
    ref = logits(model, "eager", input_ids=ids, position_ids=pos)
    got = logits(model, "attncompiler", input_ids=ids, position_ids=pos)
    torch.testing.assert_close(got, ref, atol=TOL, rtol=TOL)
    # packing really changed the answer (the test would notice a dropped document mask)
    plain = logits(model, "eager", input_ids=ids)
    assert (plain - ref).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["llama", "mistral", "gemma2"])
def test_greedy_generation_matches_and_compiles_once_per_layer_kind(name):
    model = build(name)
    ids, mask, _ = left_padded(batch=2, length=9, pads=(0, 3))
    model.set_attn_implementation("sdpa" if model._supports_sdpa else "eager")
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0)
    model.set_attn_implementation("attncompiler")
    got = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0)
    assert torch.equal(got, ref)
    # a long decode compiles nothing new: one module per layer kind, whatever the step
    from attncompiler.runtime.module import compile_program

    before, programs = ac_hf.compiled_modules(), compile_program.cache_info().currsize
    out = model.generate(ids, attention_mask=mask, max_new_tokens=200, min_new_tokens=200, do_sample=False,
                         pad_token_id=0)
    assert out.shape[1] == ids.shape[1] + 200
    assert ac_hf.compiled_modules() == before
    assert compile_program.cache_info().currsize == programs


@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_one_training_step_gives_the_same_gradients(name):
    grads = {}
    ids, mask, pads = left_padded()
    labels = ids.clone()
    for b, p in enumerate(pads):
        labels[b, :p + 1] = -100  # no loss on predictions made at padding (their rows are implementation-defined)
    for impl in ("eager", "attncompiler"):
        model = build(name).train()
        model.set_attn_implementation(impl)
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        grads[impl] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads["eager"].keys() == grads["attncompiler"].keys()
    for n, g in grads["eager"].items():
        torch.testing.assert_close(grads["attncompiler"][n], g, atol=TOL, rtol=1e-3, msg=n)


def test_dropout_in_training_is_refused_naming_the_config_field():
    model = build("llama", attention_dropout=0.1).train()
    model.set_attn_implementation("attncompiler")
    with pytest.raises(UnsupportedError, match="attention_dropout"):
        model(input_ids=torch.randint(0, 97, (1, 5)))


HAS_GPT_OSS = hasattr(transformers, "GptOssForCausalLM")
EDGE_WEIGHTED = ["gemma2_softcap"] + (["gpt_oss"] if HAS_GPT_OSS else [])


def sharpen(model, factor: float = 12.0):
    """Scale the query/key projections so scaled scores reach ~10-100 (random init gives ~0.01,
    where a softcap of 5 would change nothing and the test could not fail)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(factor)
    return model


def build_edge_weighted(name: str, **over):
    """Gemma 2 with ``attn_logit_softcapping=5`` or gpt-oss (sinks), with large attention logits."""
    if name == "gemma2_softcap":
        return sharpen(build("gemma2", attn_logit_softcapping=5.0, **over))
    model = sharpen(build("gpt_oss", **over))
    with torch.no_grad():  # sinks of O(1) weigh like a visible key (init gives ~0.02)
        for layer in model.model.layers:
            layer.self_attn.sinks.copy_(torch.linspace(-2.0, 3.0, layer.self_attn.sinks.numel()))
    return model


@pytest.mark.parametrize("name", EDGE_WEIGHTED)
def test_softcap_and_sinks_logits_match_eager_on_left_padded_batch(name):
    model = build_edge_weighted(name)
    ids, mask, pads = left_padded()
    ref = logits(model, "eager", input_ids=ids, attention_mask=mask)
    got = logits(model, "attncompiler", input_ids=ids, attention_mask=mask)
    for b, p in enumerate(pads):
        torch.testing.assert_close(got[b, p:], ref[b, p:], atol=TOL, rtol=TOL)
    # the edge weights changed the answer, so dropping them would fail the comparison above
    if name == "gemma2_softcap":
        model.config.attn_logit_softcapping = None
        for layer in model.model.layers:
            layer.self_attn.attn_logit_softcapping = None
    else:
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.sinks.fill_(-1e4)
    plain = logits(model, "eager", input_ids=ids, attention_mask=mask)
    assert (plain[0] - ref[0]).abs().max() > 1e-2


@pytest.mark.parametrize("name", EDGE_WEIGHTED)
def test_softcap_and_sinks_greedy_generation_matches_eager(name):
    model = build_edge_weighted(name)
    ids, mask, _ = left_padded(batch=2, length=9, pads=(0, 3))
    model.set_attn_implementation("eager")
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0)
    model.set_attn_implementation("attncompiler")
    got = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0)
    assert torch.equal(got, ref)
    before = ac_hf.compiled_modules()  # a second decode compiles nothing
    model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0)
    assert ac_hf.compiled_modules() == before


@pytest.mark.parametrize("name", EDGE_WEIGHTED)
def test_softcap_and_sinks_training_step_gives_the_same_gradients(name):
    grads = {}
    ids, mask, pads = left_padded()
    labels = ids.clone()
    for b, p in enumerate(pads):
        labels[b, :p + 1] = -100
    for impl in ("eager", "attncompiler"):
        model = build_edge_weighted(name).train()
        model.set_attn_implementation(impl)
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        grads[impl] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads["eager"].keys() == grads["attncompiler"].keys()
    if name == "gpt_oss":
        sinks = [n for n in grads["eager"] if n.endswith("sinks")]
        assert len(sinks) == 2 and all(grads["eager"][n].abs().max() > 1e-4 for n in sinks)
    for n, g in grads["eager"].items():
        torch.testing.assert_close(grads["attncompiler"][n], g, atol=TOL, rtol=1e-3, msg=n)


@pytest.mark.skipif(not HAS_GPT_OSS, reason="this transformers has no gpt-oss")
def test_sinks_parameter_is_read_by_reference_and_the_cache_stays_bounded():
    model = build_edge_weighted("gpt_oss")
    ids = torch.randint(1, 97, (1, 11))
    logits(model, "attncompiler", input_ids=ids)
    held = ac_hf.compiled_modules()
    for step in range(3):  # an optimizer-like in-place update is seen, nothing is recompiled
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.sinks.add_(0.7)
        torch.testing.assert_close(logits(model, "attncompiler", input_ids=ids),
                                   logits(model, "eager", input_ids=ids), atol=TOL, rtol=TOL)
        assert ac_hf.compiled_modules() == held
    # a new parameter object (load_state_dict(assign=True), a re-init) replaces the layer's module
    for layer in model.model.layers:
        layer.self_attn.sinks = torch.nn.Parameter(torch.full_like(layer.self_attn.sinks, -0.5))
    torch.testing.assert_close(logits(model, "attncompiler", input_ids=ids), logits(model, "eager", input_ids=ids),
                               atol=TOL, rtol=TOL)
    import gc

    gc.collect()
    assert ac_hf.compiled_modules() == held
    del model
    gc.collect()
    assert ac_hf.compiled_modules() < held  # the per-layer modules die with the model


def eager_edge_weighted(allowed, q, k, v, scale, softcap, sinks):
    """transformers' eager attention in float64 (gemma2 softcap before the mask; gpt-oss sinks
    concatenated as a last column and dropped after the softmax); rows with no key give zeros."""
    rep = q.shape[1] // k.shape[1]
    k, v = (t.double().repeat_interleave(rep, 1) for t in (k, v))
    s = (q.double() @ k.transpose(-1, -2)) * scale
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    s = s.masked_fill(~allowed, float("-inf"))
    if sinks is not None:
        col = sinks.double().reshape(1, -1, 1, 1).expand(*s.shape[:-1], 1)
        p = torch.softmax(torch.cat([s, col], -1), -1)[..., :-1]
    else:
        p = torch.softmax(s, -1).nan_to_num(0.0)
    return p @ v


@pytest.mark.parametrize("seed", range(3))
def test_layer_call_with_softcap_and_sinks_equals_float64(seed):
    """attention_forward with ``softcap``/``s_aux`` against transformers' eager formulas in float64:
    logits ~100-1000, odd lengths, padding, a cache offset, GQA; gradients of q, k, v and the sinks."""
    g = torch.Generator().manual_seed(seed)
    B, H, Hkv, D = 3, 4, 2, 8
    Lq, past = [(13, 0), (1, 20), (5, 16)][seed]
    Lk = past + Lq
    window = [None, 6, 4][seed]
    softcap, use_sinks = [(30.0, True), (None, True), (50.0, False)][seed]
    fn = mu.causal_mask_function if window is None else mu.sliding_window_causal_mask_function(window)
    pad = torch.ones(B, Lk, dtype=torch.bool)
    pad[1, :3] = False
    pad[2, Lk - 2:] = False if Lq > 2 else True
    q = (torch.randn(B, H, Lq, D, generator=g) * 8).requires_grad_()
    k = (torch.randn(B, Hkv, Lk, D, generator=g) * 8).requires_grad_()
    v = torch.randn(B, Hkv, Lk, D, generator=g).requires_grad_()
    sinks = torch.nn.Parameter(torch.randn(H, generator=g) * 3) if use_sinks else None
    scale = 1.3
    layout = ac_hf.mask_hook(B, Lq, Lk, q_offset=past, kv_offset=0, mask_function=fn, attention_mask=pad)
    dense = mu.sdpa_mask(B, Lq, Lk, q_offset=past, kv_offset=0, mask_function=fn, attention_mask=pad,
                         allow_is_causal_skip=False)
    module = torch.nn.Module()
    module.is_causal = True
    out, _ = ac_hf.attention_forward(module, q, k, v, layout, scaling=scale, softcap=softcap, s_aux=sinks)
    ref = eager_edge_weighted(dense, q, k, v, scale, softcap, sinks).transpose(1, 2)
    rows = dense.any(-1)[:, 0]
    assert (out[rows].double() - ref[rows]).abs().max() < 1e-4
    dout = torch.randn(ref.shape, generator=g, dtype=torch.float64) * rows[:, :, None, None]
    leaves = (q, k, v) + ((sinks,) if use_sinks else ())
    g_got = torch.autograd.grad(out, leaves, dout.float())
    g_ref = torch.autograd.grad(ref, leaves, dout)
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a.double(), b.double(), atol=2e-3, rtol=2e-3)


def dense_reference(allowed, q, k, v, scale):
    """float64 softmax attention under a dense bool mask [B, 1|H, Lq, Lk]; empty rows give zeros."""
    rep = q.shape[1] // k.shape[1]
    k, v = (t.double().repeat_interleave(rep, 1) for t in (k, v))
    s = (q.double() @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return p @ v


@pytest.mark.parametrize("seed", range(3))
def test_layer_call_equals_float64_with_transformers_own_mask(seed):
    """The mask hook + attention function against the dense mask transformers builds, in float64,
    with logits of magnitude ~100-1000, odd lengths, left/right padding, a cache offset and GQA."""
    g = torch.Generator().manual_seed(seed)
    B, H, Hkv, D = 3, 4, 2, 8
    Lq, past = [(13, 0), (1, 20), (5, 16)][seed]
    Lk = past + Lq
    window = [None, 6, 4][seed]
    fn = mu.causal_mask_function if window is None else mu.sliding_window_causal_mask_function(window)
    pad = torch.ones(B, Lk, dtype=torch.bool)
    pad[1, :3] = False  # left padding
    pad[2, Lk - 2:] = False if Lq > 2 else True  # right padding
    q = (torch.randn(B, H, Lq, D, generator=g) * 8).requires_grad_()
    k = (torch.randn(B, Hkv, Lk, D, generator=g) * 8).requires_grad_()
    v = torch.randn(B, Hkv, Lk, D, generator=g).requires_grad_()
    scale = 1.3
    layout = ac_hf.mask_hook(B, Lq, Lk, q_offset=past, kv_offset=0, mask_function=fn, attention_mask=pad)
    dense = mu.sdpa_mask(B, Lq, Lk, q_offset=past, kv_offset=0, mask_function=fn, attention_mask=pad,
                         allow_is_causal_skip=False)
    module = torch.nn.Module()
    module.is_causal = True
    out, w = ac_hf.attention_forward(module, q, k, v, layout, scaling=scale)
    assert w is None and out.shape == (B, Lq, H, D) and out.is_contiguous()
    ref = dense_reference(dense, q, k, v, scale).transpose(1, 2)
    rows = dense.any(-1)[:, 0]  # [B, Lq] rows with a visible key
    assert (out[rows].double() - ref[rows]).abs().max() < 1e-4
    torch.manual_seed(seed)
    dout = torch.randn_like(ref) * rows[:, :, None, None]
    g_got = torch.autograd.grad(out, (q, k, v), dout.float())
    g_ref = torch.autograd.grad(ref, (q, k, v), dout)
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a.double(), b.double(), atol=2e-3, rtol=2e-3)


def test_set_patterns_gives_the_dense_oracle_answer():
    model = build("llama")
    pattern = ac.sliding_window(2) | ac.global_tokens([0, 1])
    ids, mask, pads = left_padded(length=11, pads=(0, 3, 0))
    B, L = ids.shape
    # the same mask for eager: pattern (positions from each row's first real token) & causal & padding
    allowed = torch.zeros(B, 1, L, L, dtype=torch.bool)
    for b, p in enumerate(pads):
        n = L - p
        allowed[b, 0, p:, p:] = pattern.to_dense(n) & torch.ones(n, n, dtype=torch.bool).tril()
    float_mask = torch.zeros(B, 1, L, L).masked_fill(~allowed, torch.finfo(torch.float32).min)
    ref = logits(model, "eager", input_ids=ids, attention_mask=float_mask)
    ac_hf.set_patterns(model, {"*": pattern})
    got = logits(model, "attncompiler", input_ids=ids, attention_mask=mask)
    for b, p in enumerate(pads):
        torch.testing.assert_close(got[b, p:], ref[b, p:], atol=TOL, rtol=TOL)
    own = logits(build("llama"), "attncompiler", input_ids=ids, attention_mask=mask)
    assert (own[0] - got[0]).abs().max() > 1e-3  # the pattern changed the answer
    # per layer: layer 1 back to its own (causal) mask
    ac_hf.set_patterns(model, {1: None})
    pats = ac_hf.layer_patterns(model)
    assert pats[0] == pattern & ac.causal() and pats[1] == ac.causal()


def test_analyze_reports_stacked_reach():
    model = build("llama", num_hidden_layers=3)
    ac_hf.set_patterns(model, {"*": ac.sliding_window(8)})
    rep = ac_hf.analyze(model, seq_len=64)
    assert rep.level == "token" and rep.causal
    assert rep.hops_to_full == math.ceil(63 / 8)  # a causal window of 8 moves 8 tokens per layer
    assert 0 < rep.reach_after_model < 1
    ac_hf.set_patterns(model, {1: ac.full()})  # a full (causal) second layer connects every legal pair
    rep = ac_hf.analyze(model, seq_len=64)
    assert rep.hops_to_full == 2 and rep.reach_after_model == 1.0 and "hops_to_full" in str(rep)
    big = ac_hf.analyze(build("mistral"), seq_len=2048)
    assert big.level == "block"


def test_mistral_decode_past_the_window_with_a_sliding_cache():
    model = build("mistral", sliding_window=4)
    ids = torch.randint(1, 97, (1, 10))
    model.set_attn_implementation("eager")
    ref = model.generate(ids, max_new_tokens=12, do_sample=False)
    model.set_attn_implementation("attncompiler")
    assert torch.equal(model.generate(ids, max_new_tokens=12, do_sample=False), ref)


def test_refusals_name_the_problem():
    module = torch.nn.Module()
    module.is_causal = True
    q = torch.randn(1, 2, 3, 4)
    with pytest.raises(UnexpectedArgumentError, match="cu_seq_lens_q"):
        ac_hf.attention_forward(module, q, q, q, None, cu_seq_lens_q=torch.tensor([0, 3]))
    with pytest.raises(UnsupportedError, match="4D tensor"):
        ac_hf.attention_forward(module, q, q, q, torch.zeros(1, 1, 3, 3))
    holes = torch.tensor([[True, False, True]])
    with pytest.raises(UnsupportedError, match="one run of ones"):
        build_layout(1, 3, 3, mask_function=mu.causal_mask_function, attention_mask=holes)
    with pytest.raises(UnsupportedError, match="chunked_overlay"):
        build_layout(1, 3, 3, mask_function=mu.chunked_causal_mask_function(2, torch.zeros(1, dtype=torch.long)))
    with pytest.raises(ValueError, match="set_patterns key 7"):
        ac_hf.set_patterns(build("llama"), {7: ac.causal()})


# -- structured families (Combiner, Diffuser, ABC memory) as a layer's attention --------------------

FAMILIES = {0: ac.memory(4), 1: ac.combiner_fixed(3)}  # bidirectional forms: causal layers build the causal ones


def family_reference(module, q, k, v, dropout=0.0, scaling=None):
    """float64 oracle of the layer's family pattern on its q/k/v (ABC with the layer's own parameter)."""
    fam = module.attncompiler_family
    qd, kd, vd = (t.double() for t in (q, k, v))
    if isinstance(fam, ac.MemoryAttention):
        return fam.reference(qd, kd, vd, scaling)
    return ac.reference(fam.pattern, qd, kd, vd, scaling)


def reference_attention(module, q, k, v, attention_mask, dropout=0.0, scaling=None, **kwargs):
    return family_reference(module, q, k, v, scaling=scaling).to(q.dtype).transpose(1, 2).contiguous(), None


transformers.AttentionInterface.register("family_reference", reference_attention)


def test_family_layers_give_the_float64_oracle_answer():
    model = sharpen(build("llama"), 4.0)
    ac_hf.set_patterns(model, FAMILIES)
    attn = [layer.self_attn for layer in model.model.layers]
    assert attn[0].attncompiler_family.pattern == ac.memory(4, causal=True)  # the causal variants
    assert attn[1].attncompiler_family.pattern == ac.combiner_fixed(3, causal=True)
    ids = torch.randint(1, 97, (2, 13), generator=torch.Generator().manual_seed(3))
    got = logits(model, "attncompiler", input_ids=ids)
    ref = logits(model, "family_reference", input_ids=ids)
    torch.testing.assert_close(got, ref, atol=TOL, rtol=TOL)
    own = logits(build("llama"), "attncompiler", input_ids=ids)
    assert (got - own).abs().max() > 1e-3  # the families changed the answer
    pats = ac_hf.layer_patterns(model)
    assert pats == {0: ac.memory(4, causal=True), 1: ac.combiner_fixed(3, causal=True)}
    rep = ac_hf.analyze(model, seq_len=24)
    assert rep.causal and rep.layers == 2 and 0 < rep.reach_after_model <= 1


@pytest.mark.parametrize("seed", range(3))
def test_family_layer_call_equals_float64_forward_and_backward(seed):
    """One layer call against the family's float64 oracle: logits ~100-1000, odd lengths, GQA."""
    pattern = [ac.memory(3, causal=True), ac.combiner_logsparse(causal=True),
               ac.diffuse(ac.sliding_window(2), hops=2)][seed]
    model = build("llama")
    ac_hf.set_patterns(model, {"*": pattern})
    module = model.model.layers[0].self_attn
    g = torch.Generator().manual_seed(seed)
    B, H, Hkv, D, L = 2, 4, 2, 16, [11, 17, 9][seed]
    q = (torch.randn(B, H, L, D, generator=g) * 12).requires_grad_()
    k = (torch.randn(B, Hkv, L, D, generator=g) * 12).requires_grad_()
    v = torch.randn(B, Hkv, L, D, generator=g).requires_grad_()
    out, _ = ac_hf.attention_forward(module, q, k, v, None, scaling=0.9)
    kr, vr = (t.repeat_interleave(H // Hkv, 1) for t in (k, v))  # transformers' repeat_kv: head h reads h // 2
    ref = family_reference(module, q, kr, vr, scaling=0.9).transpose(1, 2)
    assert (q.double() @ k.double().repeat_interleave(2, 1).transpose(-1, -2)).abs().max() * 0.9 > 100
    assert (out.double() - ref).abs().max() < 1e-4
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64)
    g_got = torch.autograd.grad(out, (q, k, v), dout.float())
    g_ref = torch.autograd.grad(ref, (q, k, v), dout)
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a.double(), b.double(), atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("pattern", [ac.memory(3, causal=True), ac.memory(5, ac.ClusterControl(), causal=True)])
def test_abc_decode_rows_equal_the_float64_oracle_of_the_whole_sequence(pattern):
    """A decode call (the last queries against the cache) gives the oracle's last rows: an ABC row
    reads only its own query (and the memory written from keys and values)."""
    model = build("llama")
    ac_hf.set_patterns(model, {"*": pattern})
    module = model.model.layers[0].self_attn
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 4, 15, 16, generator=g) * 12
    k = torch.randn(2, 2, 15, 16, generator=g) * 12
    v = torch.randn(2, 2, 15, 16, generator=g)
    kr, vr = (t.repeat_interleave(2, 1) for t in (k, v))
    ref = family_reference(module, q, kr, vr, scaling=0.7).transpose(1, 2)
    for new in (1, 3):
        out, _ = ac_hf.attention_forward(module, q[:, :, -new:], k, v, None, scaling=0.7)
        assert (out.double() - ref[:, -new:]).abs().max() < 1e-4


def test_abc_greedy_generation_with_a_cache_equals_recomputing():
    model = sharpen(build("llama"), 4.0)
    ac_hf.set_patterns(model, {"*": ac.memory(4)})
    ids = torch.randint(1, 97, (1, 9), generator=torch.Generator().manual_seed(2))
    before = ac_hf.compiled_modules()
    cached = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert ac_hf.compiled_modules() == before  # family modules live on the layers; nothing compiled per step
    assert torch.equal(cached, model.generate(ids, max_new_tokens=12, do_sample=False, use_cache=False))


def test_analyze_counts_family_layers_by_their_attention_graph():
    model = build("llama")
    ac_hf.set_patterns(model, {"*": ac.memory(4)})  # every earlier token through the memory: one layer
    rep = ac_hf.analyze(model, seq_len=24)
    assert rep.causal and rep.hops_to_full == 1 and rep.reach_after_model == 1.0
    ac_hf.set_patterns(model, {"*": ac.diffuse(ac.sliding_window(2), hops=3)})  # 3 hops of 2 tokens per layer
    rep = ac_hf.analyze(model, seq_len=24)
    assert rep.hops_to_full == math.ceil(23 / 6) and rep.reach_after_model < 1


def test_abc_parameters_train_save_and_move_with_the_model():
    model = build("llama")
    ac_hf.set_patterns(model, FAMILIES)
    key = "model.layers.0.self_attn.attncompiler_family.control_param"
    assert key in model.state_dict()
    param = dict(model.named_parameters())[key]
    before = param.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    ids = torch.randint(1, 97, (2, 11))
    model(input_ids=ids, labels=ids).loss.backward()
    assert param.grad is not None and param.grad.abs().max() > 0
    opt.step()
    assert (param.detach() - before).abs().max() > 0
    ac_hf.set_patterns(model, FAMILIES)  # the same pattern again keeps the trained module
    assert dict(model.named_parameters())[key] is param
    assert model.to(torch.float64).state_dict()[key].dtype == torch.float64
    ac_hf.set_patterns(model, {0: None})
    assert key not in model.state_dict()


def test_family_refusals_name_the_layer_and_the_problem():
    model = build("llama")
    ac_hf.set_patterns(model, FAMILIES)
    ids, mask, _ = left_padded()
    with pytest.raises(UnsupportedError, match="layer 0: a padding mask"):
        model(input_ids=ids, attention_mask=mask)
    with pytest.raises(UnsupportedError, match="layer 1: KV-cache decoding .* Combiner pools queries"):
        model.generate(ids[:1], max_new_tokens=2, do_sample=False)  # layer 0 (ABC) decodes, layer 1 cannot
    ac_hf.set_patterns(model, {1: ac.diffuse(ac.sliding_window(2), hops=2)})
    with pytest.raises(UnsupportedError, match="layer 1: KV-cache decoding .* Diffuser"):
        model.generate(ids[:1], max_new_tokens=2, do_sample=False)
    bert = build("modernbert")
    with pytest.raises(UnsupportedError, match=r"layer 1 is bidirectional .*combiner_fixed\(3, causal=True\)"):
        ac_hf.set_patterns(bert, {1: ac.combiner_fixed(3, causal=True)})
    with pytest.raises(ValueError, match="must be a mask pattern"):
        ac_hf.set_patterns(model, {0: "memory"})
    ac_hf.set_patterns(bert, {"*": ac.combiner_fixed(3)})  # bidirectional Combiner on bidirectional layers
    out = bert(input_ids=ids).logits
    assert torch.isfinite(out).all()


def test_import_attncompiler_does_not_import_transformers():
    code = ("import sys, attncompiler, attncompiler.integrations.transformers as t; "
            "print('transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
