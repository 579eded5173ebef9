"""Fine-tune a small Llama-style model with a window + global-token attention pattern.

The model is built from a config (random weights, no download), switched to
``attn_implementation="attncompiler"``, given ``ac.sliding_window(w) | ac.global_tokens(...)`` in every
layer with :func:`attncompiler.integrations.transformers.set_patterns`, and trained on the
public-domain text in ``examples/data`` (bytes as tokens). It prints the loss, the throughput and
the stacked reach of the model's layers. Nothing is written: it runs in a temporary directory.

    python examples/hf_long_context.py --steps 300
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

import attncompiler as ac
from attncompiler.integrations import transformers as ac_hf

TEXT = Path(__file__).resolve().parent / "data" / "public_domain.txt"


def batches(data: torch.Tensor, seq_len: int, batch: int, gen: torch.Generator):
    """Random windows of the byte stream: ``(input_ids [batch, seq_len], labels)``."""
    while True:
        starts = torch.randint(0, len(data) - seq_len, (batch,), generator=gen)
        ids = torch.stack([data[s:s + seq_len] for s in starts.tolist()])
        yield ids, ids


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--globals", type=int, default=4, help="leading global tokens")
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args(argv)

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    data = torch.tensor(list(TEXT.read_bytes()), dtype=torch.long)
    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=args.layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4 * args.seq_len,
                         attention_dropout=0.0, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    pattern = ac.sliding_window(args.window) | ac.global_tokens(range(args.globals))
    ac_hf.set_patterns(model, {"*": pattern})  # registers and switches to attn_implementation="attncompiler"
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {args.layers} layers, "
          f"pattern {pattern!r} (causal)")
    print(ac_hf.analyze(model, seq_len=args.seq_len))

    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    gen = torch.Generator().manual_seed(0)
    stream = batches(data, args.seq_len, args.batch, gen)
    model.train()
    first = last = None
    tokens, t0 = 0, time.perf_counter()
    every = max(1, args.steps // 10)
    for step in range(1, args.steps + 1):
        ids, labels = next(stream)
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        tokens += ids.numel()
        first = loss.item() if first is None else first
        last = loss.item()
        if step % every == 0 or step == args.steps:
            rate = tokens / (time.perf_counter() - t0)
            print(f"step {step:4d}  loss {last:.3f}  {rate:,.0f} tokens/s")
    print(f"loss {first:.3f} -> {last:.3f}; compiled attention modules: {ac_hf.compiled_modules()}")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:  # the example writes nothing in the repository
        os.chdir(tmp)
        main()
