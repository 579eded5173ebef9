"""``attnc similarity CHECKPOINT``: adjacent-layer attention similarity and a proposed reuse plan.

The checkpoint is a :class:`attncompiler.nn.TransformerStack` written with
:func:`attncompiler.nn.save_checkpoint`. Inputs are standard-normal activations of the model's
width (or a saved ``[B, L, d_model]`` tensor), since a stack has no embedding of its own.
"""

from __future__ import annotations

import argparse

from ..errors import InputError


def register(subparsers) -> None:
    """Add ``similarity`` to the ``attnc`` parser."""
    p = subparsers.add_parser(
        "similarity", help="attention similarity of adjacent layers of a checkpoint and a reuse plan",
        description="Print, for each pair of adjacent layers of an attncompiler.nn checkpoint, the "
                    "best-matching-head attention similarity (1 - mean total-variation distance, "
                    "Bhojanapalli et al. 2021) and the reuse plan that a threshold proposes.")
    p.add_argument("checkpoint", help="file written by attncompiler.nn.save_checkpoint")
    p.add_argument("--seq-len", type=int, default=256, help="length of the random probe input (default 256)")
    p.add_argument("--batch", type=int, default=1, help="batch of the random probe input (default 1)")
    p.add_argument("--inputs", help="a torch file holding a [B, L, d_model] input tensor instead of random input")
    p.add_argument("--threshold", type=float, default=0.9, help="similarity at which a head reuses (default 0.9)")
    p.add_argument("--same-head", action="store_true", help="only propose head h -> head h reuse")
    p.add_argument("--block-rows", type=int, default=None, help="query rows per block of the analysis")
    p.add_argument("--seq-savings", type=int, default=None,
                   help="also print the savings of the plan at this sequence length")
    p.add_argument("--schedule", choices=["stored_probs", "recompute"], default=None,
                   help="reuse schedule whose savings --seq-savings reports (default: what the model runs on CPU)")
    p.add_argument("--no-reuse", action="store_true",
                   help="measure every layer's own maps, ignoring the checkpoint's reuse plan")
    p.add_argument("--seed", type=int, default=0, help="seed of the random probe input")
    p.set_defaults(func=run_similarity)


def run_similarity(args: argparse.Namespace) -> int:
    """Load the checkpoint, print the similarity table, the plan and (optionally) its savings."""
    import torch

    from ..nn import load_checkpoint
    from ..families.reuse.similarity import attention_similarity, suggest_reuse
    from ..families.reuse.plan import reuse_savings

    stack = load_checkpoint(args.checkpoint, backend="torch")
    if args.no_reuse:  # each layer's own maps (heads trained with reuse never trained their Q/K)
        stack.set_reuse(None)
    stack.eval()
    if args.inputs:
        x = torch.load(args.inputs, map_location="cpu", weights_only=True)
        if not isinstance(x, torch.Tensor):
            raise InputError(f"--inputs {args.inputs!r} must hold a tensor, got {type(x).__name__}")
    else:
        for name in ("seq_len", "batch"):
            if getattr(args, name) <= 0:
                raise InputError(f"--{name.replace('_', '-')}={getattr(args, name)} must be positive")
        g = torch.Generator().manual_seed(args.seed)
        x = torch.randn(args.batch, args.seq_len, stack.d_model, generator=g)
    rep = attention_similarity(stack, x, block_rows=args.block_rows)
    print(rep)
    plan = suggest_reuse(rep, args.threshold, same_head=args.same_head)
    print(f"\nproposed at threshold {args.threshold}: {plan}")
    print(f"as code: reuse={plan.to_spec()}")
    if args.seq_savings:
        print()
        print(reuse_savings(stack, args.seq_savings, plan=plan, schedule=args.schedule))
    return 0
