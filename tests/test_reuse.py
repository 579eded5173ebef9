"""Cross-layer attention reuse: lowering vs an explicit float64 computation, plans, similarity,
the cost model and ``attnc similarity``."""

import copy

import pytest
import torch
import torch.nn.functional as F

import attncompiler as ac
from attncompiler.nn import TransformerStack, save_checkpoint
from attncompiler.reuse import (LayerAttention, PairSimilarity, ReusePlan, SimilarityReport, attention_similarity,
                                map_similarity, reuse_savings, suggest_reuse)

E, H, D = 32, 4, 8


def explicit(stack: TransformerStack, x: torch.Tensor, sources, patterns=None) -> torch.Tensor:
    """The stack in float64, written out: ``sources[l][h] = (layer, head)`` whose Q/K and pattern
    head ``h`` of layer ``l`` attends with; attention from :func:`ac.reference`."""
    st = stack if next(stack.parameters()).dtype == torch.float64 else copy.deepcopy(stack).double()
    x = x.double()
    B, L, _ = x.shape
    qks = []
    for l, block in enumerate(st.layers):
        a = block.attn
        hin = block.ln1(x)
        q, k, v = (F.linear(hin, w, b).view(B, L, H, D).transpose(1, 2)
                   for w, b in zip(a.in_proj_weight.chunk(3), a.in_proj_bias.chunk(3)))
        qks.append((q, k))
        heads = []
        for h in range(H):
            sl, sh = sources[l][h]
            pattern = (patterns or stack.patterns)[sl].specialize(0, sh)  # the source head's mask
            qs, ks = qks[sl][0][:, sh:sh + 1], qks[sl][1][:, sh:sh + 1]
            heads.append(ac.reference(pattern, qs, ks, v[:, h:h + 1]))  # [B, 1, L, D]
        o = torch.cat(heads, dim=1).transpose(1, 2).reshape(B, L, E)
        x = x + a.out_proj(o)
        x = x + block.mlp(block.ln2(x))
    return st.norm(x)


def _check(stack, sources, patterns=None, L=29):
    x = torch.randn(2, L, E, requires_grad=True)
    y = stack(x)
    x64 = x.detach().double().requires_grad_()
    st64 = copy.deepcopy(stack).double()
    exp = explicit(st64, x64, sources, patterns)
    torch.testing.assert_close(y.double(), exp, rtol=1e-4, atol=1e-5)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, *stack.parameters()], g)
    want = torch.autograd.grad(exp, [x64, *st64.parameters()], g.double())
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)
    grads = dict(zip((n for n, _ in stack.named_parameters()), got[1:]))
    # Reused heads skip their Q/K projections: those weight rows get exactly zero gradient.
    for l, block in enumerate(stack.layers):
        wq = grads[f"layers.{l}.attn.in_proj_weight"][:E].view(H, D, E)
        for h in range(H):
            used = any(src == (l, h) for row in sources for src in row)
            assert bool((wq[h] == 0).all()) != used, (l, h)


def test_reused_heads_equal_explicit_previous_layer_qk_forward_backward():
    pattern = ac.sliding_window(4) | ac.global_tokens([0])
    st = TransformerStack(E, H, pattern, num_layers=3, reuse={1: [0, 2]}, backend="torch")
    srcs = [[(0, h) for h in range(H)], [(0, 0), (1, 1), (0, 2), (1, 3)], [(2, h) for h in range(H)]]
    _check(st, srcs)


def test_reuse_chains_and_head_mappings_resolve_to_the_computing_layer():
    pattern = ac.causal()
    st = TransformerStack(E, H, pattern, num_layers=4, reuse={1: "all", 2: {0: 3, 1: 1}, 3: 2},
                          backend="torch")
    srcs = [[(0, h) for h in range(H)], [(0, h) for h in range(H)],
            [(0, 3), (0, 1), (2, 2), (2, 3)], [(0, 3), (0, 1), (3, 2), (3, 3)]]
    _check(st, srcs)


def test_reuse_across_different_patterns_is_an_error_unless_previous_pattern_is_requested():
    pats = [ac.sliding_window(3), ac.causal(), ac.causal()]
    with pytest.raises(ac.PatternError, match=r"layer 1 reuses head 0 of layer 0.*differ.*reuse_pattern='previous'"):
        TransformerStack(E, H, pats, reuse={1: [0]}, backend="torch")
    st = TransformerStack(E, H, pats, reuse={1: [0], 2: [0, 1]}, reuse_pattern="previous", backend="torch")
    srcs = [[(0, h) for h in range(H)], [(0, 0), (1, 1), (1, 2), (1, 3)], [(0, 0), (1, 1), (2, 2), (2, 3)]]
    _check(st, srcs)


def test_per_head_pattern_reuse_keeps_head_numbering():
    pattern = ac.per_head([ac.sliding_window(2), ac.causal()])
    with pytest.raises(ac.PatternError, match="per-head pattern"):
        TransformerStack(E, H, pattern, num_layers=2, reuse={1: {1: 0}}, backend="torch")
    st = TransformerStack(E, H, pattern, num_layers=2, reuse={1: {1: 3, 2: 2}}, backend="torch")
    srcs = [[(0, h) for h in range(H)], [(1, 0), (0, 3), (0, 2), (1, 3)]]
    _check(st, srcs, L=21)


@pytest.mark.parametrize("spec, message", [
    ({0: "all"}, "layer 0 has no previous layer"),
    ({5: "all"}, r"\[1, 2\]"),
    ({1: [0, 0]}, "twice"),
    ({1: [4]}, r"head index in \[0, 3\]"),
    ({1: "most"}, "'all'"),
    ({1: 9}, r"head count must be in \[0, 4\]"),
    ([1, 2], "mapping"),
])
def test_invalid_plans(spec, message):
    with pytest.raises(ac.PatternError, match=message):
        ReusePlan.build(spec, 3, H)


def test_plan_normal_forms():
    p = ReusePlan.build({2: 2, 1: "all"}, 3, H)
    assert p.sources(1) == {h: h for h in range(H)} and p.sources(2) == {0: 0, 1: 1} and p.sources(0) == {}
    assert p.reused_heads == 6 and ReusePlan.build(p.to_spec(), 3, H) == p
    assert "2: [0, 1]" in str(p) and "1: all" in str(p)


# ---------------------------------------------------------------------------------------------
# Similarity
# ---------------------------------------------------------------------------------------------

def _layer(q, k, patterns):
    return LayerAttention(q, k, q.shape[-1] ** -0.5, tuple((p, h) for h, p in enumerate(patterns)))


def _dense_probs(q, k, patterns):
    L = q.shape[2]
    masks = torch.stack([p.to_dense(L, b=0, h=h) for h, p in enumerate(patterns)])  # [H, L, L]
    s = (q.double() @ k.double().transpose(-1, -2)) * q.shape[-1] ** -0.5
    return torch.nan_to_num(torch.softmax(s.masked_fill(~masks, float("-inf")), -1))


def test_similarity_of_identical_maps_is_one_and_of_disjoint_maps_zero():
    L = 40
    q, k = torch.randn(2, 2, L, D), torch.randn(2, 2, L, D)
    band = ac.sliding_window(3)
    a = _layer(q, k, [band, band])
    assert torch.allclose(map_similarity(a, a).diagonal(), torch.ones(2, dtype=torch.float64))
    other = _layer(torch.randn(2, 2, L, D), torch.randn(2, 2, L, D), [~band, ~band])
    assert torch.allclose(map_similarity(a, other), torch.zeros(2, 2, dtype=torch.float64))


def test_similarity_matches_brute_force_and_is_blockwise_exact():
    L = 33
    pats = [ac.sliding_window(5), ac.causal(), ac.full()]
    qa, ka, qb, kb = (torch.randn(1, 3, L, D) for _ in range(4))
    pa, pb = _dense_probs(qa, ka, pats), _dense_probs(qb, kb, pats)  # [1, 3, L, L]
    want = torch.stack([torch.stack([1 - 0.5 * (pb[0, i] - pa[0, j]).abs().sum(-1).mean() for j in range(3)])
                        for i in range(3)])
    a, b = _layer(qa, ka, pats), _layer(qb, kb, pats)
    for rows in (None, 1, 7, 64):
        torch.testing.assert_close(map_similarity(a, b, block_rows=rows), want)


def test_attention_similarity_of_a_stack_and_suggested_plan():
    st = TransformerStack(E, H, ac.sliding_window(3), num_layers=3, reuse={1: "all", 2: {0: 2}}, backend="torch")
    rep = attention_similarity(st, torch.randn(1, 24, E), block_rows=5)
    assert rep.pairs[0].best == pytest.approx((1.0,) * H) and rep.pairs[0].best_head == tuple(range(H))
    assert rep.pairs[1].best[0] == pytest.approx(1.0) and rep.pairs[1].best_head[0] == 2
    assert max(rep.pairs[1].best[1:]) < 0.999
    assert "0->1" in str(rep)
    plan = suggest_reuse(rep, 0.999)
    assert plan.sources(1) == {h: h for h in range(H)} and plan.sources(2) == {0: 2}
    assert suggest_reuse(rep, 0.999, same_head=True).sources(2) == {}


def test_suggest_reuse_thresholds_and_limits():
    m = ((0.95, 0.2), (0.3, 0.5))
    rep = SimilarityReport(3, 2, (PairSimilarity(1, (0.95, 0.5), (0, 1), m),
                                  PairSimilarity(2, (0.99, 0.98), (1, 0), ((0.1, 0.99), (0.98, 0.2)))))
    assert suggest_reuse(rep, 0.9).to_spec() == {1: {0: 0}, 2: {0: 1, 1: 0}}
    assert suggest_reuse(rep, 0.9, max_layers=1).to_spec() == {2: {0: 1, 1: 0}}
    assert suggest_reuse(rep, 1.0).to_spec() == {}
    with pytest.raises(ac.InputError, match="threshold"):
        suggest_reuse(rep, 1.5)


def test_similarity_rejects_models_without_attention_inputs():
    with pytest.raises(ac.InputError, match="attncompiler.nn"):
        attention_similarity(torch.nn.Linear(2, 2), torch.randn(1, 2))


# ---------------------------------------------------------------------------------------------
# Cost model and CLI
# ---------------------------------------------------------------------------------------------

def test_savings_closed_form_for_full_attention():
    L, B = 128, 2
    st = TransformerStack(E, H, ac.full(), num_layers=4, reuse={1: "all", 3: [0]}, backend="torch")
    s = reuse_savings(st, L, B, block=32)
    proj = 2 * B * L * E * D
    assert [r.flops_saved for r in s.layers] == [0, 2 * H * proj, 0, 2 * proj]
    assert s.score_flops == 4 * H * 2 * 2 * B * L * L * D
    assert s.score_flops_saved == (H + 1) * 2 * B * L * L * D
    assert s.flops == 4 * (4 * H * proj + H * 2 * 2 * B * L * L * D + 2 * 2 * B * L * E * 4 * E)
    assert s.activation_bytes_saved == 4 * 2 * (H + 1) * B * L * D
    assert "stack:" in str(s)
    none = reuse_savings(st, L, B, plan={})
    assert none.flops_saved == 0 and none.flops == s.flops


def test_savings_count_computed_blocks_of_sparse_patterns():
    st = TransformerStack(E, H, ac.block_local(32), num_layers=2, reuse={1: "all"}, backend="torch")
    s = reuse_savings(st, 128, block=32)
    assert s.layers[1].score_flops_saved == H * 2 * 128 * 32 * D


def test_cli_similarity(tmp_path, capsys):
    from attncompiler.cli import main

    st = TransformerStack(E, H, ac.sliding_window(3), num_layers=3, reuse={2: "all"}, backend="torch")
    path = tmp_path / "m.pt"
    save_checkpoint(st, path)
    assert main(["similarity", str(path), "--seq-len", "20", "--threshold", "0.999", "--seq-savings", "64"]) == 0
    out = capsys.readouterr().out
    assert "1->2" in out and "proposed at threshold 0.999" in out and "2: all" in out and "stack:" in out
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert main(["similarity", str(tmp_path / "junk.pt")]) == 2
    assert "InputError" in capsys.readouterr().err


def test_reuse_lm_example_runs_tiny(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "examples" / "reuse_lm.py"
    proc = subprocess.run([sys.executable, str(script), "--steps", "3", "--eval-every", "3", "--seeds", "0",
                           "--seq-len", "64", "--layers", "2", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "reuse 1 seed 0: final val loss" in proc.stdout and "0->1" in proc.stdout
    rows = (tmp_path / "reuse_lm_loss.csv").read_text().splitlines()
    assert rows[0] == "variant,seed,step,train_loss,val_loss" and len(rows) == 1 + 2 * 2
    assert "o = no reuse" in (tmp_path / "reuse_lm_loss.txt").read_text()
