"""Cross-layer attention reuse: lowering vs an explicit float64 computation under both schedules
(stored probabilities, recompute from kept Q/K), plans, the cost model vs counted FLOPs, and
``attnc similarity``. Similarity analysis tests are in the second half."""

import copy

import pytest
import torch
import torch.nn.functional as F

import attncompiler as ac
from attncompiler import patterns as catalogue
from attncompiler.nn import TransformerStack, save_checkpoint
from attncompiler.families.reuse.similarity import (LayerAttention, PairSimilarity, SimilarityReport,
                                                    attention_similarity, map_similarity, suggest_reuse)
from attncompiler.families.reuse.plan import ReusePlan, reuse_savings
from attncompiler.bench.reuse import counted_attention_flops
from attncompiler.program.schedule import Schedule

E, H, D = 32, 4, 8
SCHEDULES = ["stored_probs", "recompute"]
SMALL = Schedule(block_m=8, block_n=8, tile_elems=256)  # several blocks, chunks and buckets at L ~ 45


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


def _check(stack, sources, patterns=None, L=29, schedule=None):
    if schedule is not None:
        stack.set_reuse(stack.plan, reuse_schedule=schedule)
        assert stack.resolved_reuse_schedule() == schedule  # the schedule under test really runs
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


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_reused_heads_equal_explicit_previous_layer_qk_forward_backward(schedule):
    pattern = ac.sliding_window(4) | ac.global_tokens([0])
    st = TransformerStack(E, H, pattern, num_layers=3, reuse={1: [0, 2]}, backend="torch")
    srcs = [[(0, h) for h in range(H)], [(0, 0), (1, 1), (0, 2), (1, 3)], [(2, h) for h in range(H)]]
    _check(st, srcs, schedule=schedule)


_BIGBIRD = catalogue.bigbird(block=8, window_blocks=3, global_blocks=1, random_blocks=2, seed=0)


@pytest.mark.parametrize("pattern", [ac.sliding_window(6), _BIGBIRD, ac.sliding_window(9) & ac.causal()],
                         ids=["sliding_window", "bigbird", "causal_window"])
def test_stored_probs_equal_explicit_computation_per_family(pattern):
    """Multi-block layouts (block 8, L=45: ragged last block, several chunks): every second layer
    reuses all heads, one layer reuses two heads with swapped sources."""
    st = TransformerStack(E, H, pattern, num_layers=4, reuse={1: "all", 3: {0: 1, 1: 0}}, backend="torch",
                          schedule=SMALL)
    srcs = [[(0, h) for h in range(H)], [(0, h) for h in range(H)], [(2, h) for h in range(H)],
            [(2, 1), (2, 0), (3, 2), (3, 3)]]
    _check(st, srcs, L=45, schedule="stored_probs")


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_reuse_chains_and_head_mappings_resolve_to_the_computing_layer(schedule):
    pattern = ac.causal()
    st = TransformerStack(E, H, pattern, num_layers=4, reuse={1: "all", 2: {0: 3, 1: 1}, 3: 2},
                          backend="torch")
    srcs = [[(0, h) for h in range(H)], [(0, h) for h in range(H)],
            [(0, 3), (0, 1), (2, 2), (2, 3)], [(0, 3), (0, 1), (3, 2), (3, 3)]]
    _check(st, srcs, schedule=schedule)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_reuse_across_different_patterns_is_an_error_unless_previous_pattern_is_requested(schedule):
    pats = [ac.sliding_window(3), ac.causal(), ac.causal()]
    with pytest.raises(ac.PatternError, match=r"layer 1 reuses head 0 of layer 0.*differ.*reuse_pattern='previous'"):
        TransformerStack(E, H, pats, reuse={1: [0]}, backend="torch")
    st = TransformerStack(E, H, pats, reuse={1: [0], 2: [0, 1]}, reuse_pattern="previous", backend="torch")
    srcs = [[(0, h) for h in range(H)], [(0, 0), (1, 1), (1, 2), (1, 3)], [(0, 0), (1, 1), (2, 2), (2, 3)]]
    _check(st, srcs, schedule=schedule)


def test_per_head_pattern_reuse_keeps_head_numbering():
    pattern = ac.per_head([ac.sliding_window(2), ac.causal()])
    with pytest.raises(ac.PatternError, match="per-head pattern"):
        TransformerStack(E, H, pattern, num_layers=2, reuse={1: {1: 0}}, backend="torch")
    st = TransformerStack(E, H, pattern, num_layers=2, reuse={1: {1: 3, 2: 2}}, backend="torch")
    assert st.resolved_reuse_schedule() == "recompute"  # one layout per head: stored P does not apply
    with pytest.raises(ac.UnsupportedError, match="stored_probs.*layer 0"):
        st.set_reuse(st.plan, reuse_schedule="stored_probs")
    srcs = [[(0, h) for h in range(H)], [(1, 0), (0, 3), (0, 2), (1, 3)]]
    _check(st, srcs, L=21)


def test_both_schedules_agree_and_zero_reuse_is_the_plain_stack():
    pattern = ac.sliding_window(5) & ac.causal()
    st = TransformerStack(E, H, pattern, num_layers=4, reuse={1: "all", 2: [1, 3], 3: "all"}, backend="torch",
                          schedule=SMALL)
    x = torch.randn(2, 40, E, requires_grad=True)
    outs = {}
    for sched in SCHEDULES:
        st.set_reuse(st.plan, reuse_schedule=sched)
        y = st(x)
        outs[sched] = (y, torch.autograd.grad(y.square().sum(), [x, *st.parameters()]))
    (ya, ga), (yb, gb) = outs.values()
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # inference: the stored path recycles its storage across calls
        torch.testing.assert_close(st(x), yb.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(st(x), yb.detach(), rtol=1e-5, atol=1e-5)
    for sched in SCHEDULES:
        st.set_reuse({}, reuse_schedule=sched)
        plain = x
        for block in st.layers:
            plain = block(plain)
        torch.testing.assert_close(st(x), st.norm(plain), rtol=0, atol=0)


def test_triton_backend_keeps_the_recompute_schedule():
    st = TransformerStack(E, H, ac.causal(), num_layers=2, reuse={1: "all"}, backend="triton")
    assert st.resolved_reuse_schedule() == "recompute"
    with pytest.raises(ac.UnsupportedError, match="torch backend"):
        TransformerStack(E, H, ac.causal(), num_layers=2, reuse={1: "all"}, backend="triton",
                         reuse_schedule="stored_probs")
    with pytest.raises(ac.InputError, match="reuse_schedule"):
        st.set_reuse({1: "all"}, reuse_schedule="cache")


# ---------------------------------------------------------------------------------------------
# Codegen: attention with probabilities out, apply stored probabilities
# ---------------------------------------------------------------------------------------------

def _dense_reference_probs(pattern, q, k):
    """float64 softmax of the masked scores, ``[B, H, Lq, Lk]`` (zeros for rows without keys)."""
    L = q.shape[2]
    mask = pattern.to_dense(L)
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return torch.nan_to_num(torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1))


@pytest.mark.parametrize("pattern", [_BIGBIRD, ac.sliding_window(3) & ac.causal() | ac.global_tokens([0]),
                                     ac.causal() & ~ac.sliding_window(0)],
                         ids=["bigbird", "window_causal_global", "strictly_causal_empty_row"])
@pytest.mark.parametrize("heads, kv_heads", [(3, 3), (4, 2)])
def test_attention_with_probs_and_apply_equal_the_reference(pattern, heads, kv_heads):
    """out = P V1 and a second use P V2: values, stored P and all gradients (through both uses)
    against the float64 reference; GQA folds query heads; a row without keys gives zeros."""
    from attncompiler.codegen.pytorch.probs import apply_probs, attention_with_probs

    L = 45
    q = torch.randn(2, heads, L, D, dtype=torch.float64, requires_grad=True)
    k, v1, v2 = (torch.randn(2, kv_heads, L, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
    layout = pattern.layout(L, L, 8, 8, batch=2, heads=heads)
    out, probs = attention_with_probs(q, k, v1, layout, SMALL, D ** -0.5)
    y = out + 2 * apply_probs(probs, v2)
    G = heads // kv_heads
    kr, v1r, v2r = (t.repeat_interleave(G, 1) for t in (k, v1, v2))
    want = ac.reference(pattern, q, kr, v1r) + 2 * ac.reference(pattern, q, kr, v2r)
    torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(probs.to_dense(), _dense_reference_probs(pattern, q, kr), rtol=1e-10, atol=1e-10)
    g = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, [q, k, v1, v2], g), torch.autograd.grad(want, [q, k, v1, v2], g)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    # storage is O(non-empty blocks): never more than the layout's blocks (+ merge padding) x block area
    assert probs.p.shape[-1] <= 1.25 * layout.groups[0].num_blocks * 64 * G + 64 * 8 * G


def test_probs_workspace_recycles_storage_and_errors_are_clear():
    from attncompiler.codegen.pytorch.probs import ProbsWorkspace, apply_probs, attention_with_probs

    pattern = ac.sliding_window(7)
    q, k, v = (torch.randn(1, 2, 40, D) for _ in range(3))
    layout = pattern.layout(40, 40, 8, 8, heads=2)
    ws = ProbsWorkspace()
    with torch.no_grad():
        o1, p1 = attention_with_probs(q, k, v, layout, SMALL, 0.3, workspace=ws)
        dense, ptr = p1.to_dense().clone(), p1.p.data_ptr()
        ws.release(p1)
        o2, p2 = attention_with_probs(q, k, v, layout, SMALL, 0.3, workspace=ws)
    assert p2.p.data_ptr() == ptr and torch.equal(o1, o2) and torch.equal(p2.to_dense(), dense)
    with pytest.raises(ac.InputError, match="do not match"):
        apply_probs(p2, torch.randn(1, 2, 41, D))
    per_head = ac.per_head([ac.sliding_window(2), ac.causal()])
    with pytest.raises(ac.UnsupportedError, match="one block layout for every batch and head"):
        attention_with_probs(q, k, v, per_head.layout(40, 40, 8, 8, heads=2), SMALL, 0.3)


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
    proj = 2 * B * L * E * D
    score = 2 * B * L * L * D  # one head's QK^T (or PV)
    s = reuse_savings(st, L, B, block=32, schedule="recompute")
    assert [r.flops_saved for r in s.layers] == [0, 2 * H * proj, 0, 2 * proj]
    assert s.score_flops == 4 * H * 2 * score and s.score_flops_saved == (H + 1) * score
    assert s.realized_score_flops_saved == 0 and s.probs_bytes == 0
    assert s.flops == 4 * (4 * H * proj + H * 2 * score + 2 * 2 * B * L * E * 4 * E)
    assert s.activation_bytes_saved == 4 * 2 * (H + 1) * B * L * D
    assert "stack:" in str(s) and "0 (recomputed)" in str(s)
    stored = reuse_savings(st, L, B, block=32)  # the model's own schedule on CPU: stored probabilities
    assert stored.schedule == "stored_probs" and stored.flops == s.flops
    assert [r.flops_saved for r in stored.layers] == [0, 2 * H * proj + H * score, 0, 2 * proj + score]
    assert stored.realized_score_flops_saved == (H + 1) * score
    # layer 0 keeps all heads' P (read by layer 1), layer 2 keeps head 0's (read by layer 3)
    assert [r.probs_bytes for r in stored.layers] == [4 * B * L * L * H, 0, 4 * B * L * L, 0]
    none = reuse_savings(st, L, B, plan={})
    assert none.flops_saved == 0 and none.flops == s.flops and none.probs_bytes == 0


def test_savings_count_computed_blocks_of_sparse_patterns():
    st = TransformerStack(E, H, ac.block_local(32), num_layers=2, reuse={1: "all"}, backend="torch")
    s = reuse_savings(st, 128, block=32)
    assert s.layers[1].score_flops_saved == H * 2 * 128 * 32 * D


def _bmm_flops(stack, x):
    with torch.no_grad():  # counted on the plan path: the fused CPU kernels' products are inside C
        return counted_attention_flops(stack, x)


# causal as a block-sparse layout: plain ac.causal() layers run SDPA's fused kernel (the dense
# pass), whose work the bmm counter below does not see; the window covers all 128 positions
@pytest.mark.parametrize("pattern", [ac.block_local(16), ac.sliding_window(20), ac.causal() & ac.sliding_window(127)])
def test_counted_attention_flops_drop_by_the_predicted_amount(pattern):
    """The QK^T + PV matmuls really executed (counted by torch's FLOP counter) drop by exactly the
    cost model's attention-score saving under stored probabilities, and not at all under recompute."""
    plan = {1: "all", 3: [0, 2]}
    st = TransformerStack(E, H, pattern, num_layers=4, reuse=plan, backend="torch").eval()
    x = torch.randn(2, 128, E)
    st.set_reuse({})
    base = _bmm_flops(st, x)
    st.set_reuse(plan, reuse_schedule="stored_probs")
    stored = _bmm_flops(st, x)
    st.set_reuse(plan, reuse_schedule="recompute")
    assert _bmm_flops(st, x) == base
    s = reuse_savings(st, 128, 2, schedule="stored_probs", block=64)  # the stack's block size
    assert base == s.score_flops and base - stored == s.score_flops_saved > 0


def test_cli_similarity(tmp_path, capsys):
    from attncompiler.cli.main import main

    st = TransformerStack(E, H, ac.sliding_window(3), num_layers=3, reuse={2: "all"}, backend="torch")
    path = tmp_path / "m.pt"
    save_checkpoint(st, path)
    assert main(["similarity", str(path), "--seq-len", "20", "--threshold", "0.999", "--seq-savings", "64"]) == 0
    out = capsys.readouterr().out
    assert "1->2" in out and "proposed at threshold 0.999" in out and "2: all" in out and "stack:" in out
    assert "schedule=stored_probs" in out  # "auto" on the CPU
    for sched in ("recompute", "stored_probs"):
        assert main(["similarity", str(path), "--seq-len", "20", "--seq-savings", "64", "--schedule", sched]) == 0
        assert f"schedule={sched}" in capsys.readouterr().out
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert main(["similarity", str(tmp_path / "junk.pt")]) == 2
    assert "InputError" in capsys.readouterr().err


def test_reuse_lm_example_runs_tiny(tmp_path):
    import importlib.util
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "examples" / "reuse_lm.py"
    proc = subprocess.run([sys.executable, str(script), "--steps", "3", "--eval-every", "3", "--seeds", "0", "1",
                           "--seq-len", "32", "--layers", "2", "--d-model", "16", "--heads", "2",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "reuse 1 seed 1: final val loss" in proc.stdout and "0->1" in proc.stdout
    assert "reuse schedule stored_probs" in proc.stdout
    rows = (tmp_path / "reuse_lm_loss.csv").read_text().splitlines()
    assert rows[0] == "variant,seed,step,train_loss,val_loss" and len(rows) == 1 + 2 * 2 * 2
    txt = (tmp_path / "reuse_lm_loss.txt").read_text()
    assert "o = no reuse" in txt and "final val loss mean" in txt and "paired by seed" in txt
    has_plot = importlib.util.find_spec("matplotlib") is not None
    assert (tmp_path / "reuse_lm_loss.png").exists() == has_plot
