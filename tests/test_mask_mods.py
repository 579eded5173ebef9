"""The mask_mods FlexAttention users write (issue 23): attention-gym's generators and transformers'
``masking_utils`` mask functions, written here from their documented definitions. Each must give
``create_mask``'s mask, trace into the index IR, and run on both backends against the float64
oracle; opaque mask_mods are evaluated with FlexAttention's (vmap, 0-d index) semantics and say
why they did not trace."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention.flex_attention import and_masks, create_mask, noop_mask, or_masks

import attncompiler as ac
from attncompiler.dsl.mask_mod import evaluate_mask_mod
from codegen.triton.render import render_predicate

from oracle import assert_matches_oracle

L = 64  # a multiple of the 8x8 grids below


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(tmp_path / "kernels"))


# ---------------------------------------------------------------------------------------------
# attention-gym's generators, from their documented definitions
# ---------------------------------------------------------------------------------------------

def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def sliding_window(window):
    """Causal sliding window: a key at most ``window`` positions back."""
    def in_window(b, h, q_idx, kv_idx):
        return q_idx - kv_idx <= window
    return and_masks(in_window, causal)


def prefix_lm(prefix):
    """Bidirectional over the first ``prefix`` keys, causal after."""
    def in_prefix(b, h, q_idx, kv_idx):
        return kv_idx < prefix
    return or_masks(in_prefix, causal)


def document(inner, lengths):
    """Packed documents: same document, and ``inner`` on positions relative to its start."""
    offsets = torch.cumsum(torch.tensor([0] + lengths), 0)
    doc_id = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))

    def doc_mask(b, h, q_idx, kv_idx):
        same = doc_id[q_idx] == doc_id[kv_idx]
        q_logical = q_idx - offsets[doc_id[q_idx]]
        kv_logical = kv_idx - offsets[doc_id[kv_idx]]
        return same & inner(b, h, q_logical, kv_logical)
    return doc_mask


def dilated_sliding_window(window, dilation):
    def dilated(b, h, q_idx, kv_idx):
        diff = (q_idx - kv_idx).abs()
        return (diff <= window * dilation) & (diff % dilation == 0)
    return dilated


def natten(height, width, kh, kw):
    """2-D neighbourhood attention on a row-major grid: the window centre is clamped inside."""
    def mask(b, h, q_idx, kv_idx):
        qx, qy, kx, ky = q_idx // width, q_idx % width, kv_idx // width, kv_idx % width
        cx = qx.clamp(kh // 2, height - 1 - kh // 2)
        cy = qy.clamp(kw // 2, width - 1 - kw // 2)
        return ((cx - kx).abs() <= kh // 2) & ((cy - ky).abs() <= kw // 2)
    return mask


def tiled_natten(height, width, tile_h, tile_w, kh, kw):
    """NATTEN on a grid stored tile by tile (tiles row-major, row-major inside a tile)."""
    per_tile, tiles_w = tile_h * tile_w, width // tile_w

    def coords(idx):
        t, r = idx // per_tile, idx % per_tile
        return (t // tiles_w) * tile_h + r // tile_w, (t % tiles_w) * tile_w + r % tile_w

    def mask(b, h, q_idx, kv_idx):
        (qx, qy), (kx, ky) = coords(q_idx), coords(kv_idx)
        cx = torch.clamp(qx, kh // 2, height - 1 - kh // 2)
        cy = torch.clamp(qy, kw // 2, width - 1 - kw // 2)
        return ((cx - kx).abs() <= kh // 2) & ((cy - ky).abs() <= kw // 2)
    return mask


def morton_natten(height, width, kh, kw):
    """NATTEN on a grid stored along a Morton (Z-order) curve: bits de-interleaved by shifts."""
    def compact(x):
        x = x & 0x55555555
        x = (x | (x >> 1)) & 0x33333333
        x = (x | (x >> 2)) & 0x0F0F0F0F
        x = (x | (x >> 4)) & 0x00FF00FF
        return (x | (x >> 8)) & 0x0000FFFF

    def mask(b, h, q_idx, kv_idx):
        qx, qy, kx, ky = compact(q_idx >> 1), compact(q_idx), compact(kv_idx >> 1), compact(kv_idx)
        cx = qx.clamp_min(kh // 2).clamp_max(height - 1 - kh // 2)
        cy = qy.clamp_min(kw // 2).clamp_max(width - 1 - kw // 2)
        return ((cx - kx).abs() <= kh // 2) & ((cy - ky).abs() <= kw // 2)
    return mask


def sta_2d(height, width, tile, window_tiles):
    """Sliding tile attention: tiles of ``tile x tile`` tokens see a window of whole tiles."""
    tiles_w, per_tile, half = width // tile, tile * tile, window_tiles // 2

    def mask(b, h, q_idx, kv_idx):
        qt, kt = q_idx // per_tile, kv_idx // per_tile
        qx, qy, kx, ky = qt // tiles_w, qt % tiles_w, kt // tiles_w, kt % tiles_w
        cx = torch.maximum(torch.minimum(qx, torch.tensor(height // tile - 1 - half)), torch.tensor(half))
        cy = torch.maximum(torch.minimum(qy, torch.tensor(tiles_w - 1 - half)), torch.tensor(half))
        return ((cx - kx).abs() <= half) & ((cy - ky).abs() <= half)
    return mask


def batchify(inner, size):
    """Independent sequences of ``size`` tokens, each with ``inner``."""
    def mask(b, h, q_idx, kv_idx):
        return (q_idx // size == kv_idx // size) & inner(b, h, q_idx % size, kv_idx % size)
    return mask


def flamingo(image_of_key, intervals):
    """Vision cross-attention: text query q sees image i's tokens while q is in image i's span."""
    def mask(b, h, q_idx, kv_idx):
        interval = intervals[image_of_key[kv_idx]]
        return (q_idx >= interval[0]) & (q_idx < interval[1])
    return mask


_IMG = torch.repeat_interleave(torch.arange(3), torch.tensor([20, 30, 14]))
_SPANS = torch.tensor([[0, 24], [10, 50], [40, 64]])

GENERATORS = {
    "causal": causal,
    "sliding_window": sliding_window(5),
    "prefix_lm": prefix_lm(9),
    "document": document(causal, [10, 25, 7, 22]),
    "dilated_sliding_window": dilated_sliding_window(4, 3),
    "natten": natten(8, 8, 3, 5),
    "tiled_natten": tiled_natten(8, 8, 4, 2, 3, 3),
    "morton_natten": morton_natten(8, 8, 3, 3),
    "sta_2d": sta_2d(8, 8, 2, 3),
    "batchify": batchify(causal, 16),
    "and_masks": and_masks(dilated_sliding_window(8, 2), causal, noop_mask),
    "or_masks": or_masks(sliding_window(3), prefix_lm(4), lambda b, h, q, k: k % 16 == 0),
    "flamingo": flamingo(_IMG, _SPANS),
}


# ---------------------------------------------------------------------------------------------
# transformers' masking_utils mask functions, from their documented definitions
# ---------------------------------------------------------------------------------------------

def hf_and_masks(*fns):
    def and_mask(batch_idx, head_idx, q_idx, kv_idx):
        result = q_idx.new_ones((), dtype=torch.bool)
        for fn in fns:
            result = result & fn(batch_idx, head_idx, q_idx, kv_idx).to(result.device)
        return result
    return and_mask


def hf_or_masks(*fns):
    def or_mask(batch_idx, head_idx, q_idx, kv_idx):
        result = q_idx.new_zeros((), dtype=torch.bool)
        for fn in fns:
            result = result | fn(batch_idx, head_idx, q_idx, kv_idx).to(result.device)
        return result
    return or_mask


def hf_causal(batch_idx, head_idx, q_idx, kv_idx):
    return kv_idx <= q_idx


def hf_sliding_window_overlay(window):
    def inner(batch_idx, head_idx, q_idx, kv_idx):
        return kv_idx > q_idx - window
    return inner


def hf_chunked_overlay(chunk, left_padding):
    def inner(batch_idx, head_idx, q_idx, kv_idx):
        return (kv_idx - left_padding[batch_idx]) // chunk == (q_idx - left_padding[batch_idx]) // chunk
    return inner


def hf_padding(padding_mask):
    def inner(batch_idx, head_idx, q_idx, kv_idx):
        return padding_mask[batch_idx, kv_idx]
    return inner


def hf_packed(packed):
    def inner(batch_idx, head_idx, q_idx, kv_idx):
        return packed[batch_idx, q_idx] == packed[batch_idx, kv_idx]
    return inner


def hf_offsets(fn, q_offset, kv_offset):
    def inner(batch_idx, head_idx, q_idx, kv_idx):
        return fn(batch_idx, head_idx, q_idx + q_offset, kv_idx + kv_offset)
    return inner


_PAD = torch.ones(2, L, dtype=torch.bool)
_PAD[1, :5] = False
_PACKED = torch.stack([torch.repeat_interleave(torch.arange(3), torch.tensor([20, 20, 24])),
                       torch.repeat_interleave(torch.arange(2), torch.tensor([40, 24]))])

HF = {
    "hf_causal": hf_causal,
    "hf_sliding_window": hf_and_masks(hf_causal, hf_sliding_window_overlay(6)),
    "hf_chunked": hf_and_masks(hf_causal, hf_chunked_overlay(16, torch.tensor([0, 5]))),
    "hf_padding": hf_and_masks(hf_causal, hf_padding(_PAD)),
    "hf_packed": hf_and_masks(hf_or_masks(hf_causal, hf_sliding_window_overlay(0)), hf_packed(_PACKED)),
    "hf_offsets": hf_offsets(hf_and_masks(hf_causal, hf_sliding_window_overlay(8)), 3, 1),
}
ALL = {**GENERATORS, **HF}


def _dense(p, batch: int) -> torch.Tensor:
    return torch.stack([p.to_dense(L, b=b) for b in range(batch)])


@pytest.mark.parametrize("name", list(ALL))
def test_equals_create_mask_traced_and_opaque(name):
    fn = ALL[name]
    batch = 2 if name in ("hf_chunked", "hf_padding", "hf_packed") else 1
    want = create_mask(fn, batch, 1, L, L, device="cpu")[:, 0]
    p = ac.mask(fn)
    assert p.traced, p.trace_failure
    assert torch.equal(_dense(p, batch), want)
    # The opaque evaluation (what an untraceable mask_mod gets) gives the same mask.
    q, k = torch.arange(L)[:, None], torch.arange(L)[None, :]
    opaque = torch.stack([evaluate_mask_mod(fn, b, 0, q, k) for b in range(batch)])
    assert torch.equal(opaque, want)
    assert str(ac.analyze(p, seq_len=L))  # the traced mask enters the analysis


@pytest.mark.parametrize("name", list(ALL))
def test_torch_backend_matches_oracle(name):
    p = ac.mask(ALL[name])
    q, k, v = (torch.randn(2, 2, L, 16, requires_grad=True) for _ in range(3))
    out = ac.compile(p, backend="torch")(q, k, v)
    assert_matches_oracle(out, ac.reference(p, q, k, v), (q, k, v))


@pytest.mark.parametrize("name", ["sliding_window", "document", "natten", "morton_natten", "sta_2d", "flamingo",
                                  "hf_chunked", "hf_packed"])
def test_triton_backend_matches_oracle(name, tmp_path):
    p = ac.mask(ALL[name])
    assert "OPAQUE" not in render_predicate(p.expr)  # rendered, not read from byte masks
    q, k, v = (torch.randn(2, 1, L, 16, requires_grad=True) for _ in range(3))
    out = ac.compile(p, backend="triton")(q, k, v)
    assert_matches_oracle(out, ac.reference(p, q, k, v), (q, k, v))
    assert list(tmp_path.glob("kernels/**/*.py"))  # a generated Triton kernel ran


# ---------------------------------------------------------------------------------------------
# Operators, one at a time, with torch's int64 semantics
# ---------------------------------------------------------------------------------------------

OPS = {
    "shifts": lambda b, h, q, k: ((q << 3) >> 2) - (k << 1) == 0,
    "shift_out_of_range": lambda b, h, q, k: ((q << 64) == 0) & ((-(k + 1) >> 70) == -1) & (q >= k),
    "bit_ops": lambda b, h, q, k: ((q & k) ^ (q | 5)) % 3 == (~k & 7) % 3,
    "bitwise_fns": lambda b, h, q, k: torch.bitwise_and(torch.bitwise_xor(q, k), 4) == torch.bitwise_not(k) & 4,
    "minimum_maximum": lambda b, h, q, k: torch.minimum(q, k + 3) >= torch.maximum(k, torch.tensor(7)),
    "where_floor_mod": lambda b, h, q, k: torch.where(q > 20, q // 7, -q % 5) == k // 9,
    "clip": lambda b, h, q, k: torch.clip(q - k, min=-3, max=2) == q - k,
    "consts": lambda b, h, q, k: (torch.ones_like(q) + q.new_zeros(()) + torch.zeros_like(k)) * (q >= k).long() == 1,
    "casts": lambda b, h, q, k: (((q - k) % 3).to(torch.bool) | (q == k)).to(torch.int64).bool() & ~(k > q),
    "chained": lambda b, h, q, k: ~((q < k) | (q - k > 9)) & ((q % 2 == 0) ^ (k % 3 == 0)),
    "big_constant": lambda b, h, q, k: (q * (2**40) + k) // (2**40) >= k,
    "nd_index_twice": lambda b, h, q, k: _SPANS[_IMG[q]][1] > k + _SPANS[-1][0] - 40,
}


@pytest.mark.parametrize("name", list(OPS))
def test_operator_traces_and_matches_create_mask(name):
    fn = OPS[name]
    p = ac.mask(fn)
    assert p.traced, p.trace_failure
    want = create_mask(fn, 1, 1, L, L, device="cpu")[0, 0]
    assert torch.equal(p.to_dense(L), want)


def test_operators_render_into_triton_with_int64_semantics():
    fns = [OPS[n] for n in ("shifts", "shift_out_of_range", "bit_ops", "minimum_maximum", "casts", "big_constant")]
    p = ac.mask(lambda b, h, q, k: fns[0](b, h, q, k) | fns[1](b, h, q, k) | fns[2](b, h, q, k)
                | fns[3](b, h, q, k) | fns[4](b, h, q, k) | fns[5](b, h, q, k))
    assert p.traced
    assert "<<" in render_predicate(p.expr) and ">>" in render_predicate(p.expr)
    q, k, v = (torch.randn(1, 1, L, 16, requires_grad=True) for _ in range(3))
    out = ac.compile(p, backend="triton")(q, k, v)
    assert_matches_oracle(out, ac.reference(p, q, k, v), (q, k, v))


def test_left_shift_past_int32_is_exact_in_triton():
    p = ac.mask(lambda b, h, q, k: ((q << 33) >> 33) - ((k << 40) >> 40) >= 0)
    assert ".to(tl.int64) << 33" in render_predicate(p.expr)
    q, k, v = (torch.randn(1, 1, L, 16) for _ in range(3))
    torch.testing.assert_close(ac.compile(p, backend="triton")(q, k, v).double(), ac.reference(p, q, k, v),
                               rtol=1e-5, atol=2e-5)


def test_constant_beyond_int64_is_a_clear_error():
    with pytest.raises(ac.PatternError, match="int64"):
        ac.mask(lambda b, h, q, k: q + 2**64 > k)


def test_non_constant_shift_count_stays_opaque_and_correct():
    fn = lambda b, h, q, k: (q >> (k % 4)) > 2  # noqa: E731
    p = ac.mask(fn)
    assert not p.traced and "non-constant count" in p.trace_failure
    assert torch.equal(p.to_dense(L), create_mask(fn, 1, 1, L, L, device="cpu")[0, 0])


# ---------------------------------------------------------------------------------------------
# Opaque mask_mods: FlexAttention's semantics and the reason they did not trace
# ---------------------------------------------------------------------------------------------

def _scalar_flamingo(b, h, q_idx, kv_idx):
    interval = _SPANS[_IMG[kv_idx]]
    lo = interval[0].float()  # floats stop the tracer; under vmap this is a 0-d value
    return (q_idx >= lo) & (q_idx < interval[1])


def test_scalar_semantics_mask_mod_that_used_to_fail_is_create_mask():
    p = ac.mask(_scalar_flamingo)
    assert not p.traced
    assert "'float'" in p.trace_failure and "test_mask_mods.py" in p.trace_failure
    assert "interval[0].float()" in p.trace_failure  # the user's source line
    want = create_mask(_scalar_flamingo, 1, 1, L, L, device="cpu")[0, 0]
    assert torch.equal(p.to_dense(L), want)
    q, k, v = (torch.randn(1, 2, L, 16, requires_grad=True) for _ in range(3))
    assert_matches_oracle(ac.compile(p, backend="torch")(q, k, v), ac.reference(p, q, k, v), (q, k, v))


def test_opaque_with_python_if_is_evaluated_element_by_element():
    def branchy(b, h, q_idx, kv_idx):
        if q_idx >= kv_idx:
            return q_idx - kv_idx < 4
        return q_idx < q_idx
    p = ac.mask(branchy)
    assert not p.traced and "Python control flow" in p.trace_failure and "if q_idx >= kv_idx" in p.trace_failure
    assert torch.equal(p.to_dense(32), ac.mask(lambda b, h, q, k: (q >= k) & (q - k < 4)).to_dense(32))


def test_opaque_batch_dependence_probe_still_works():
    table = torch.tensor([3, 9])

    def per_batch(b, h, q_idx, kv_idx):
        return table[b] >= (q_idx - kv_idx).float().abs()
    p = ac.mask(per_batch, per_batch=None)
    assert not p.traced and p.batch_dependent  # tracing saw b: evaluated per batch entry
    want = create_mask(per_batch, 2, 1, L, L, device="cpu")[:, 0]
    assert torch.equal(_dense(p, 2), want)

    def hidden(b, h, q_idx, kv_idx):  # touches b only after the tracer stopped
        return (q_idx.float() - kv_idx).abs() <= table[b]
    with pytest.raises(ac.PatternError, match="depends on the batch entry"):
        ac.compile(ac.mask(hidden), backend="torch")(*(torch.randn(2, 1, L, 8) for _ in range(3)))


def test_cli_show_and_explain_say_whether_a_mask_traced(tmp_path):
    from attncompiler.cli.common import describe_mask_tracing
    text = describe_mask_tracing(ac.mask(_scalar_flamingo) | ac.mask(causal))
    assert "traced: no" in text and "'float'" in text and "traced: yes" in text


@pytest.mark.parametrize("name", list(GENERATORS))
def test_traced_layout_equals_the_evaluated_layout(name):
    from attncompiler.dsl.mask_mod import Mask
    traced, opaque = ac.mask(GENERATORS[name]), Mask(GENERATORS[name], None, False, False)
    for bm, bn in ((16, 16), (32, 16)):
        want = opaque.layout(L, L, block_m=bm, block_n=bn).block_kinds()
        assert (traced.layout(L, L, block_m=bm, block_n=bn).block_kinds() == want).all()
