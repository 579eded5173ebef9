"""Context parallelism through the transformers backend: 2 spawned gloo processes against one process."""

from __future__ import annotations

import copy
import datetime
import socket
import types

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

transformers = pytest.importorskip("transformers")

import attncompiler as ac  # noqa: E402
from attncompiler.errors import InputError, UnsupportedError  # noqa: E402
from attncompiler.integrations import transformers as ac_hf  # noqa: E402
from attncompiler.integrations.hf_context_parallel import ContextParallel  # noqa: E402

TOL = 1e-4
SMALL = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, attention_dropout=0.0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


HAS_GPT_OSS = hasattr(transformers, "GptOssForCausalLM")


def _sharpen(model, factor: float = 12.0):
    """Scale the q/k projections so scaled scores reach ~10-100, where a softcap of 5 and O(1) sinks
    change the answer (random init gives ~0.01: dropping them could not fail the comparison)."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(factor)
            elif n.endswith("self_attn.sinks"):  # sinks of O(1) weigh like a visible key (init gives ~0.02)
                p.copy_(torch.linspace(-2.0, 3.0, p.numel()))
    return model


def _build(name: str):
    torch.manual_seed(0)  # the same weights on every rank
    if name == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL))
    if name == "gemma2":  # logit softcap 5 (and alternating sliding-window layers)
        cfg = transformers.Gemma2Config(**SMALL, head_dim=16, sliding_window=4, query_pre_attn_scalar=16,
                                        attn_logit_softcapping=5.0, final_logit_softcapping=None)
        return _sharpen(transformers.Gemma2ForCausalLM(cfg))
    if name == "gpt_oss":  # attention sinks (s_aux)
        cfg = transformers.GptOssConfig(**SMALL, head_dim=16, num_local_experts=2, num_experts_per_tok=1,
                                        sliding_window=4)
        return _sharpen(transformers.GptOssForCausalLM(cfg))
    return transformers.MistralForCausalLM(transformers.MistralConfig(**SMALL, sliding_window=5))


def _without_edge_weights(model):
    """A copy of a Gemma 2 / gpt-oss model with its softcap / sinks switched off."""
    plain = copy.deepcopy(model)
    for layer in plain.model.layers:
        if hasattr(layer.self_attn, "sinks"):
            with torch.no_grad():
                layer.self_attn.sinks.fill_(-1e4)
        else:
            layer.self_attn.attn_logit_softcapping = None
    return plain


def _step(model, ids, **kw):
    """Logits and parameter gradients of one training step (loss: mean next-token cross entropy)."""
    model.zero_grad()
    out = model(input_ids=ids, labels=ids, **kw)
    out.loss.backward()
    return out.logits.detach(), out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _check_model(name: str, sharding: str, patterns: dict | None, L: int, docs: tuple | None = None) -> str:
    """The sharded run's gathered logits, loss and summed gradients equal the single-process run's."""
    base = _build(name).train()
    torch.manual_seed(1)
    ids = torch.randint(1, 97, (2, L))
    pos = torch.cat([torch.arange(n) for n in docs])[None] if docs else None  # packed documents
    refs = {}
    for impl in (["attncompiler"] if patterns else ["attncompiler", "eager"]):
        m = copy.deepcopy(base)
        m.set_attn_implementation(impl)
        if patterns:
            ac_hf.set_patterns(m, patterns)
        refs[impl] = _step(m, ids, use_cache=False, position_ids=pos)
    model = copy.deepcopy(base)
    if patterns:
        ac_hf.set_patterns(model, patterns)
    cp = ac_hf.enable_context_parallel(model, sharding=sharding)
    batch = cp.shard_inputs(ids, pos, labels=ids)
    assert cp.documents == docs
    assert batch["input_ids"].shape[1] == cp.sharding.local_len(cp.rank) < L
    model.zero_grad()
    out = model(**batch)
    out.loss.backward()
    cp.all_reduce_gradients(model)
    logits = cp.gather(out.logits)
    loss = out.loss.detach().clone()
    dist.all_reduce(loss)  # the ranks' losses sum to the full sequence's mean loss
    for impl, (ref_logits, ref_loss, ref_grads) in refs.items():
        torch.testing.assert_close(logits, ref_logits, atol=TOL, rtol=TOL, msg=f"{name} {sharding} vs {impl}")
        torch.testing.assert_close(loss, ref_loss, atol=TOL, rtol=TOL)
        for n, p in model.named_parameters():
            atol = TOL * 1e-3 if n.endswith("sinks") else TOL  # sinks' gradients are ~1e-5..1e-3 here
            torch.testing.assert_close(p.grad, ref_grads[n], atol=atol, rtol=TOL, msg=f"grad {n} vs {impl}")
    if name in ("gemma2", "gpt_oss"):  # the softcap / sinks changed the answer, so dropping them would fail
        sinks = [n for n, p in model.named_parameters() if n.endswith("sinks")]
        assert len(sinks) == (2 if name == "gpt_oss" else 0)
        assert all(model.get_parameter(n).grad.abs().max() > 1e-5 for n in sinks)
        plain = _without_edge_weights(base).eval()
        plain.set_attn_implementation("eager")
        with torch.no_grad():
            assert (plain(input_ids=ids, use_cache=False).logits - refs["eager"][0]).abs().max() > 1e-2
    return cp.sharding.kind


def _fake_layer(cp, pattern, is_causal: bool):
    return types.SimpleNamespace(layer_idx=0, is_causal=is_causal, attncompiler_pattern=pattern,
                                 attncompiler_context_parallel=cp)


def _check_oracle(rank: int, pattern, is_causal: bool, sharding: str, L: int = 29, softcap: float | None = None,
                  sinks: bool = False) -> None:
    """The attention function alone, float64, logits ~100-1000, GQA, odd length: forward and backward
    (with ``softcap`` and ``sinks``: their effect, and the sinks' gradient summed over the ranks)."""
    g = torch.Generator().manual_seed(7)
    B, H, Hkv, D = 2, 4, 2, 8
    q = torch.randn(B, H, L, D, generator=g, dtype=torch.float64) * 12   # [B, H, L, D]
    k = torch.randn(B, Hkv, L, D, generator=g, dtype=torch.float64) * 12
    v = torch.randn(B, Hkv, L, D, generator=g, dtype=torch.float64)
    do = torch.randn(B, L, H, D, generator=g, dtype=torch.float64)
    full = pattern & ac.causal() if is_causal else pattern
    assert (q @ k.repeat_interleave(2, 1).transpose(-1, -2) * D ** -0.5).abs().max() > 100
    s_ref = torch.linspace(-2.0, 3.0, H, dtype=torch.float64).requires_grad_() if sinks else None
    mods = {} if softcap is None else {"score_mod": ac.softcap(softcap)}
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = ac.reference(full, ref_in[0], ref_in[1].repeat_interleave(2, 1), ref_in[2].repeat_interleave(2, 1),
                       sinks=s_ref, **mods)
    (ref.transpose(1, 2) * do).sum().backward()
    if softcap is not None or sinks:  # the edge weights matter here
        plain = ac.reference(full, q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1))
        assert (plain - ref).abs().max() > 1e-2
    cp = ContextParallel(None, sharding, lambda: {0: full}, H)
    sh = cp.choose(L)
    mine = [sh.shard(t, rank).clone().requires_grad_() for t in (q, k, v)]
    s_mine = s_ref.detach().clone().requires_grad_() if sinks else None
    out, weights = ac_hf.attention_forward(_fake_layer(cp, pattern, is_causal), *mine, None, scaling=None,
                                           softcap=softcap, s_aux=s_mine)
    assert weights is None and out.shape == (B, sh.local_len(rank), H, D)
    (out * sh.shard(do, rank, dim=1)).sum().backward()
    torch.testing.assert_close(out, sh.shard(ref.transpose(1, 2), rank, dim=1).detach(), atol=1e-9, rtol=1e-9)
    for got, want in zip(mine, ref_in):
        torch.testing.assert_close(got.grad, sh.shard(want.grad, rank), atol=1e-9, rtol=1e-9)
    if sinks:  # each rank's part of the sinks' gradient; summed over the ranks, the whole
        dist.all_reduce(s_mine.grad)
        assert s_ref.grad.abs().max() > 1e-3
        torch.testing.assert_close(s_mine.grad, s_ref.grad, atol=1e-9, rtol=1e-9)


def _check_errors(rank: int) -> None:
    model = _build("llama").eval()
    cp = ac_hf.enable_context_parallel(model, sharding="zigzag")
    assert model.config.use_cache is False
    ids = torch.randint(1, 97, (1, 21))
    batch = ac_hf.shard_inputs(model, ids)
    with torch.no_grad():
        mask = torch.ones_like(batch["input_ids"])
        mask[:, 0] = 0
        with pytest.raises(UnsupportedError, match="padding"):
            model(**batch, attention_mask=mask)
        out = model(**batch, use_cache=True)  # a prefill that fills a cache runs; decoding on it does not
        nxt = {"input_ids": ids[:, :1], "position_ids": torch.tensor([[21]])}
        with pytest.raises(UnsupportedError, match="decoding"):
            model(**nxt, cache=out.cache, use_cache=True)
        with pytest.raises(InputError, match="shard_inputs"):
            model(input_ids=ids)  # the whole sequence on one rank
    with pytest.raises(UnsupportedError, match="different document lengths"):
        cp.shard_inputs(ids.expand(2, 21), position_ids=torch.stack([torch.arange(21), torch.arange(21) % 11]))
    layer = _fake_layer(cp, None, True)
    q = torch.randn(1, 4, cp.sharding.local_len(rank), 8)
    with pytest.raises(InputError, match=r"sinks must be a floating tensor of shape \[4\]"):
        ac_hf.attention_forward(layer, q, q, q, None, s_aux=torch.zeros(3))
    ac_hf.disable_context_parallel(model)
    assert model.config.use_cache is True
    with torch.no_grad():
        model(input_ids=ids)  # whole sequences again


def _worker(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        ac_hf.register()
        window_global = ac.sliding_window(3) | ac.global_tokens([0, 17])  # global rows: the dense-row exchange
        _check_oracle(rank, window_global, True, "zigzag")
        _check_oracle(rank, window_global, False, "contiguous")
        _check_oracle(rank, ac.sliding_window(2), True, "striped")
        assert _check_model("llama", "contiguous", None, 37) == "contiguous"
        assert _check_model("llama", "auto", None, 37) == "zigzag"  # causal: zigzag balances the ranks
        _check_model("mistral", "zigzag", None, 31)  # the model's own sliding window (5)
        _check_model("llama", "auto", {"*": ac.sliding_window(4) | ac.global_tokens([0, 20]),
                                       1: ac.sliding_window(2)}, 33)
        _check_model("llama", "zigzag", None, 29, docs=(10, 12, 7))  # packed: a document mask on every layer
        _check_oracle(rank, window_global, True, "zigzag", softcap=50.0, sinks=True)
        _check_model("gemma2", "zigzag", None, 31)  # softcap on the ring
        if HAS_GPT_OSS:
            _check_model("gpt_oss", "contiguous", None, 27)  # sinks on the ring, gradient summed
        _check_errors(rank)
    finally:
        dist.destroy_process_group()


def test_context_parallel_matches_single_process_on_2_ranks():
    mp.spawn(_worker, args=(2, _free_port()), nprocs=2, join=True)


def test_enable_needs_a_process_group_and_a_known_sharding():
    model = _build("llama")
    with pytest.raises(InputError, match="sharding='diagonal'"):
        ac_hf.enable_context_parallel(model, sharding="diagonal")
    if not dist.is_initialized():
        with pytest.raises(InputError, match="process group"):
            ac_hf.enable_context_parallel(model)
    with pytest.raises(InputError, match="enable_context_parallel"):
        ac_hf.shard_inputs(model, torch.zeros(1, 8, dtype=torch.long))
