"""A small causal character-level language model trained with and without attention reuse.

Reuse Transformers (Bhojanapalli et al. 2021) report equal quality when some layers reuse the
previous layer's attention. This example trains the same model (same initialization, same
batches per seed) with a plain 4-layer stack and with layers 1 and 3 reusing all heads of the
layer before them (stored probabilities: the reused layers compute only P @ V), for several
seeds, and writes the validation-loss curves: ``reuse_lm_loss.csv`` (every run), a text plot
``reuse_lm_loss.txt`` of the per-variant mean with the final-loss mean and spread and, when
matplotlib is importable (``pip install attncompiler[plot]``), ``reuse_lm_loss.png`` (mean curves
with the per-seed curves faint), into ``--out`` (default: a new temporary folder, printed at the end; the ``reuse_lm_loss.*`` files
next to this script are a documented run and are never overwritten by default).

    python examples/reuse_lm.py                # 3 seeds x 2 variants x 300 steps: ~5-10 min on 2 cores
    python examples/reuse_lm.py --steps 100    # quicker
"""

from __future__ import annotations

import argparse
import csv
import random
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import attncompiler as ac
from attncompiler.nn import TransformerStack, save_checkpoint
from attncompiler.families.reuse.similarity import attention_similarity, suggest_reuse

SUBJECTS = ["the cat", "a dog", "the old man", "my sister", "the bird", "a child", "the teacher", "our neighbour"]
VERBS = ["sees", "likes", "follows", "paints", "finds", "calls", "watches", "helps"]
OBJECTS = ["the red ball", "a small house", "the river", "an apple", "the garden", "a green boat", "the moon"]
PLACES = ["in the morning", "at night", "near the park", "after school", "by the sea", "on sunday"]


def generated_text(n_sentences: int, seed: int) -> str:
    """Sentences from a small grammar with long-range agreement: a sentence that opens with
    ``because`` closes with ``so it was good``, which a model can only predict by attention."""
    rng = random.Random(seed)
    out = []
    for _ in range(n_sentences):
        s = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(PLACES)}"
        out.append(f"because {s}, so it was good. " if rng.random() < 0.3 else f"{s}. ")
    return "".join(out)


class CharLM(nn.Module):
    """Embedding + learned positions + :class:`TransformerStack` + tied output projection."""

    def __init__(self, vocab: int, seq_len: int, d_model: int, heads: int, layers: int, pattern, reuse):
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(torch.zeros(seq_len, d_model))
        self.stack = TransformerStack(d_model, heads, pattern, num_layers=layers, reuse=reuse, backend="torch")
        nn.init.normal_(self.tok.weight, std=0.02)  # tied output: unit-scale embeddings give huge logits

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos[: idx.shape[1]]  # [B, L, E]
        return self.stack(x) @ self.tok.weight.T  # [B, L, vocab]


def batches(data: torch.Tensor, seq_len: int, batch: int, steps: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - seq_len - 1, (batch,), generator=g)
        chunk = torch.stack([data[s:s + seq_len + 1] for s in starts.tolist()])  # [B, L + 1]
        yield chunk[:, :-1], chunk[:, 1:]


@torch.no_grad()
def evaluate(model: CharLM, data: torch.Tensor, seq_len: int) -> float:
    model.eval()
    n = min(64, (len(data) - 1) // seq_len)  # a fixed 64-sequence validation set
    x = data[: n * seq_len].view(n, seq_len)
    y = data[1: n * seq_len + 1].view(n, seq_len)
    loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
    model.train()
    return loss


def train(args, reuse, train_data, val_data, vocab: int, seed: int):
    """Train one model; returns it and (step, train loss, validation loss) every ``eval_every`` steps."""
    torch.manual_seed(seed)
    pattern = ac.sliding_window(args.window) & ac.causal()
    model = CharLM(vocab, args.seq_len, args.d_model, args.heads, args.layers, pattern, reuse)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    curve = [(0, float("nan"), evaluate(model, val_data, args.seq_len))]
    running = None
    for step, (x, y) in enumerate(batches(train_data, args.seq_len, args.batch, args.steps, seed + 1), 1):
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
        if step % args.eval_every == 0 or step == args.steps:
            curve.append((step, running, evaluate(model, val_data, args.seq_len)))
    return model, curve


@torch.no_grad()
def similarity_of(model: CharLM, idx: torch.Tensor, args) -> None:
    """How similar the trained plain model's adjacent layers are, and the plan that suggests."""
    x = model.tok(idx) + model.pos[: idx.shape[1]]  # [B, L, E]: the stack's input
    rep = attention_similarity(model.stack, x)
    print(rep)
    print(f"suggested at 0.8: {suggest_reuse(rep, 0.8)}")
    if args.save_checkpoint:
        args.save_checkpoint.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(model.stack, args.save_checkpoint)
        print(f"wrote {args.save_checkpoint} (try: attnc similarity {args.save_checkpoint})")


def text_plot(series: dict[str, list[tuple[int, float]]], width: int = 64, height: int = 16) -> str:
    """An ASCII chart of several (step, loss) series; each series has its own marker."""
    pts = [(s, v) for curve in series.values() for s, v in curve]
    x1 = max(s for s, _ in pts) or 1
    lo, hi = min(v for _, v in pts), max(v for _, v in pts)
    grid = [[" "] * (width + 1) for _ in range(height + 1)]
    markers = "ox+*"
    for (name, curve), m in zip(series.items(), markers):
        for s, v in curve:
            r = round((hi - v) / ((hi - lo) or 1) * height)
            c = round(s / x1 * width)
            grid[r][c] = m if grid[r][c] in (" ", m) else "#"
    lines = [f"{hi - (hi - lo) * r / height:7.3f} |{''.join(row)}" for r, row in enumerate(grid)]
    lines.append(" " * 8 + "+" + "-" * (width + 1))
    lines.append(" " * 9 + f"0{'step':^{width - 8}}{x1}")
    lines.append("   " + "   ".join(f"{m} = {name}" for name, m in zip(series, markers)) + "   (# = overlap)")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--window", type=int, default=48)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one run per seed and variant")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1: OpenMP threads spin badly on a busy shared machine)")
    ap.add_argument("--save-checkpoint", type=Path, default=None,
                    help="also save the trained plain stack (for `attnc similarity`)")
    ap.add_argument("--out", type=Path, default=None,
                    help="folder for reuse_lm_loss.csv/.txt/.png (default: a new temporary folder)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    text = generated_text(6000, seed=1234)
    chars = sorted(set(text))
    data = torch.tensor([chars.index(c) for c in text])
    split = int(0.9 * len(data))
    train_data, val_data = data[:split], data[split:]
    reused = range(1, args.layers, 2)
    variants = {"no reuse": None, f"reuse {','.join(map(str, reused))}": {l: "all" for l in reused}}
    results = {}
    for seed in args.seeds:
        for name, reuse in variants.items():
            t0 = time.perf_counter()
            model, curve = train(args, reuse, train_data, val_data, len(chars), seed)
            results[(name, seed)] = curve
            print(f"{name:>9} seed {seed}: final val loss {curve[-1][2]:.4f} "
                  f"(train {curve[-1][1]:.4f}) in {time.perf_counter() - t0:.1f} s"
                  f"{'' if reuse is None else ', reuse schedule ' + model.stack.resolved_reuse_schedule()}")
            if reuse is None and seed == args.seeds[0]:
                similarity_of(model, val_data[:4 * args.seq_len].view(4, args.seq_len), args)

    if args.out is None:
        args.out = Path(tempfile.mkdtemp(prefix="reuse_lm_"))
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "reuse_lm_loss.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["variant", "seed", "step", "train_loss", "val_loss"])
        for (name, seed), curve in results.items():
            for step, tr, va in curve:
                w.writerow([name, seed, step, f"{tr:.5f}", f"{va:.5f}"])
    curves = {name: mean_curve([results[(name, seed)] for seed in args.seeds]) for name in variants}
    summary = summarize(results, list(variants), args.seeds)
    plot = (f"mean validation loss over seeds {args.seeds}, {args.layers} layers, {args.steps} steps\n"
            f"{text_plot(curves)}\n{summary}\n")
    (args.out / "reuse_lm_loss.txt").write_text(plot)
    print(plot)
    write_png(results, list(variants), args)
    print(f"results in {args.out}")


def mean_curve(runs: list[list[tuple[int, float, float]]]) -> list[tuple[int, float]]:
    """``(step, mean validation loss)`` over runs evaluated at the same steps (step 0 left out)."""
    return [(rows[0][0], sum(r[2] for r in rows) / len(rows)) for rows in zip(*(run[1:] for run in runs))]


def _mean_std(vals: list[float]) -> tuple[float, float]:
    m = sum(vals) / len(vals)
    return m, (sum((v - m) ** 2 for v in vals) / max(len(vals) - 1, 1)) ** 0.5


def summarize(results, variants: list[str], seeds: list[int]) -> str:
    """Final validation loss per variant (mean, sample std, range) and the paired difference
    (same seed: same initialization and batches) of the reuse variant against no reuse."""
    lines = []
    finals = {name: [results[(name, s)][-1][2] for s in seeds] for name in variants}
    for name, vals in finals.items():
        m, sd = _mean_std(vals)
        lines.append(f"{name}: final val loss mean {m:.4f}, std {sd:.4f}, range {min(vals):.4f}..{max(vals):.4f} "
                     f"(per seed {', '.join(f'{v:.4f}' for v in vals)})")
    base, other = variants[0], variants[1]
    diffs = [b - a for a, b in zip(finals[base], finals[other])]
    m, sd = _mean_std(diffs)
    lines.append(f"{other} - {base}, paired by seed: mean {m:+.4f}, std {sd:.4f} "
                 f"(per seed {', '.join(f'{d:+.4f}' for d in diffs)})")
    return "\n".join(lines)


def write_png(results, variants: list[str], args) -> None:
    """Mean validation-loss curve per variant, per-seed curves faint (skipped without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed (pip install attncompiler[plot]): wrote {args.out / 'reuse_lm_loss.csv'} "
              "and the text plot instead of a PNG")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, color in zip(variants, ("tab:blue", "tab:orange")):
        runs = [results[(name, s)] for s in args.seeds]
        for run in runs:
            ax.plot([s for s, _, _ in run[1:]], [v for _, _, v in run[1:]], color=color, alpha=0.25, linewidth=1)
        mean = mean_curve(runs)
        ax.plot([s for s, _ in mean], [v for _, v in mean], color=color, linewidth=2,
                label=f"{name} (mean of {len(runs)} seeds)")
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss")
    ax.set_title(f"char LM, {args.layers} layers: with and without attention reuse")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "reuse_lm_loss.png", dpi=100)
    plt.close(fig)
    print(f"wrote {args.out / 'reuse_lm_loss.png'}")


if __name__ == "__main__":
    main()
