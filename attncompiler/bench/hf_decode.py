"""Greedy generation with a tiny transformers model: ``"attncompiler"`` against ``"sdpa"`` tokens/s.

Builds a small Llama (or, with ``--window``, a Mistral with that sliding window) from a config
with random weights (no download), checks that both attention implementations generate the same
tokens, then alternates them run by run and prints the median tokens/s of each and the ratio.
The whole ``generate`` call is timed (prefill and every decode step), at ``--threads`` threads.

Run: ``python -m attncompiler.bench.hf_decode`` (``--help`` lists the options), e.g.
``python -m attncompiler.bench.hf_decode --prompt 4096 --window 512 --new-tokens 32`` for the
long-prompt sliding-window case. Needs ``transformers`` (``pip install attncompiler[hf]``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

IMPLS = ("attncompiler", "sdpa")


def build_model(hidden: int, layers: int, heads: int, kv_heads: int, vocab: int, window: int | None,
                max_positions: int):
    """A tiny decoder from a config, random weights (seed 0), fp32, eval mode."""
    import transformers

    torch.manual_seed(0)
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_positions,
                  attention_dropout=0.0, eos_token_id=None, pad_token_id=None, bos_token_id=None)
    if window is None:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    else:
        model = transformers.MistralForCausalLM(transformers.MistralConfig(sliding_window=window, **common))
    return model.eval()


def generate(model, impl: str, ids: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, float]:
    """``(generated ids [1, new_tokens], seconds)`` of one greedy ``generate`` call with ``impl``."""
    model.set_attn_implementation(impl)
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False)
        seconds = time.perf_counter() - t0
    return out[:, ids.shape[1]:], seconds


def run(args: argparse.Namespace) -> dict:
    """Median tokens/s of each implementation and their ratio (``attncompiler / sdpa``)."""
    from ..integrations import transformers as ac_hf

    ac_hf.register()
    old = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        model = build_model(args.hidden, args.layers, args.heads, args.kv_heads or args.heads, args.vocab,
                            args.window, args.prompt + args.new_tokens + 8)
        torch.manual_seed(1)
        ids = torch.randint(0, args.vocab, (1, args.prompt))
        tokens = {impl: generate(model, impl, ids, args.new_tokens)[0] for impl in IMPLS}  # also warms up
        if not torch.equal(tokens["attncompiler"], tokens["sdpa"]):
            diff = (tokens["attncompiler"] != tokens["sdpa"]).nonzero()
            raise RuntimeError(f"attncompiler and sdpa generated different tokens (first difference at step "
                               f"{int(diff[0, 1])}); the benchmark compares equal work only")
        modules = ac_hf.compiled_modules()
        times: dict[str, list[float]] = {impl: [] for impl in IMPLS}
        for r in range(args.repeats):
            for impl in (IMPLS if r % 2 == 0 else IMPLS[::-1]):  # alternate which runs first
                times[impl].append(generate(model, impl, ids, args.new_tokens)[1])
        if ac_hf.compiled_modules() != modules:
            raise RuntimeError(f"compiled modules grew from {modules} to {ac_hf.compiled_modules()} while timing")
    finally:
        torch.set_num_threads(old)
    med = {impl: statistics.median(ts) for impl, ts in times.items()}
    tps = {impl: args.new_tokens / s for impl, s in med.items()}
    return {"tokens_per_s": tps, "seconds": med, "ratio": tps["attncompiler"] / tps["sdpa"],
            "compiled_modules": modules}


def parser() -> argparse.ArgumentParser:
    """The command-line options."""
    p = argparse.ArgumentParser(prog="python -m attncompiler.bench.hf_decode", description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default: --heads)")
    p.add_argument("--vocab", type=int, default=1000)
    p.add_argument("--prompt", type=int, default=16, help="prompt tokens (batch 1)")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--window", type=int, default=None, help="sliding window: a Mistral model instead of Llama")
    p.add_argument("--repeats", type=int, default=5, help="timed generate calls per implementation")
    p.add_argument("--threads", type=int, default=1)
    return p


def main(argv: list[str] | None = None) -> dict:
    """Parse ``argv``, run, print the medians and the ratio; returns the result dict."""
    args = parser().parse_args(argv)
    res = run(args)
    model = "llama" if args.window is None else f"mistral window={args.window}"
    print(f"tiny {model}: hidden {args.hidden}, {args.layers} layers, {args.heads} heads, prompt {args.prompt}, "
          f"{args.new_tokens} new tokens, {args.threads} thread(s), median of {args.repeats}")
    for impl in IMPLS:
        print(f"  {impl:>12}: {res['tokens_per_s'][impl]:8.1f} tokens/s ({res['seconds'][impl]:.3f} s)")
    print(f"  ratio attncompiler/sdpa tokens/s: {res['ratio']:.3f} (identical tokens; "
          f"{res['compiled_modules']} compiled modules)")
    return res


if __name__ == "__main__":
    main()
