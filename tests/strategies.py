"""Hypothesis strategies for random attention-pattern expressions.

Other test modules import these: ``cases()`` draws a mask pattern together with lengths that it
is valid at, ``geometries()`` draws lengths and block sizes (including lengths that are not
block multiples). Patterns are built only through the public DSL, so every primitive, every
combinator and both traced and opaque ``mask_mod`` patterns are exercised.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st

import attncompiler as ac

# Opaque mask_mods: tensor methods the tracer does not model make tracing fail, so these stay
# opaque and exercise the chunked-evaluation path. Module-level functions hash stably.


def opaque_parity(b, h, q_idx, kv_idx):
    """Keys with the parity of the query (``Tensor.remainder`` is not traced)."""
    return (q_idx - kv_idx).remainder(2) == 0


def opaque_near(b, h, q_idx, kv_idx):
    """``|q - k| < 5`` via ``Tensor.lt`` (not traced)."""
    return (q_idx - kv_idx).abs().lt(5)


# Traced mask_mods (each traces to an Expr).
TRACED = (
    lambda b, h, q_idx, kv_idx: (q_idx - kv_idx) % 3 == 0,
    lambda b, h, q_idx, kv_idx: (q_idx // 8) >= (kv_idx // 8),
    lambda b, h, q_idx, kv_idx: torch.where(q_idx < 10, kv_idx < 4, (q_idx - kv_idx).abs() <= 2),
    lambda b, h, q_idx, kv_idx: (kv_idx * 3 + 1) % 7 < 3,
    lambda b, h, q_idx, kv_idx: ((q_idx ^ kv_idx) & 1) == 0,
)
OPAQUE = (opaque_parity, opaque_near)


@dataclass(frozen=True)
class Case:
    """A pattern and lengths at which it is valid."""

    pattern: ac.Pattern
    q_len: int
    kv_len: int


def primitives(max_index: int) -> st.SearchStrategy[ac.Pattern]:
    """Every mask primitive with small parameters; global indices lie below ``max_index``."""
    small = st.integers(0, 12)
    pos = st.integers(1, 12)
    return st.one_of(
        st.just(ac.full()),
        st.just(ac.causal()),
        small.map(ac.sliding_window),
        st.builds(ac.dilated_window, st.integers(0, 5), st.integers(1, 4)),
        pos.map(ac.block_local),
        st.builds(ac.block_window, st.integers(0, 2), st.integers(1, 16)),
        st.integers(1, 9).map(ac.strided),
        st.lists(st.integers(0, max_index - 1), min_size=1, max_size=7).map(ac.global_tokens),
        st.builds(ac.random_blocks, st.integers(0, 3), st.integers(1, 24), st.integers(0, 5)),
        st.integers(0, 40).map(ac.prefix_lm),
        st.lists(st.integers(1, 40), min_size=1, max_size=4).map(ac.document),
        st.sampled_from(TRACED).map(ac.mask),
        st.sampled_from(OPAQUE).map(ac.mask),
    )


def expressions(max_index: int, max_leaves: int = 4) -> st.SearchStrategy[ac.Pattern]:
    """Random trees of primitives combined with ``|``, ``&``, ``~`` and ``.causal()``."""

    def extend(children):
        return st.one_of(
            st.tuples(children, children).map(lambda t: t[0] | t[1]),
            st.tuples(children, children).map(lambda t: t[0] & t[1]),
            children.map(lambda p: ~p),
            children.map(lambda p: p.causal()),
        )

    return st.recursive(primitives(max_index), extend, max_leaves=max_leaves)


@st.composite
def cases(draw, min_len: int = 1, max_len: int = 130, same_len: bool = False,
          max_leaves: int = 4) -> Case:
    """A random pattern expression with query/key lengths in ``[min_len, max_len]``."""
    q_len = draw(st.integers(min_len, max_len))
    kv_len = q_len if same_len else draw(st.integers(min_len, max_len))
    p = draw(expressions(max(q_len, kv_len), max_leaves))
    return Case(p, q_len, kv_len)


@st.composite
def block_sizes(draw) -> tuple[int, int]:
    """(block_m, block_n): small, often different, often not dividing the lengths."""
    return draw(st.sampled_from([1, 3, 8, 16, 32])), draw(st.sampled_from([2, 5, 8, 16, 32]))


def head_dims() -> st.SearchStrategy[int]:
    """Head dims including the awkward ones the issue names (48, 96)."""
    return st.sampled_from([8, 16, 48, 96])


# ---------------------------------------------------------------------------------------------
# Index expressions
# ---------------------------------------------------------------------------------------------

def int_exprs(max_leaves: int = 6, divisors: bool = True) -> st.SearchStrategy:
    """Integer index expressions over ``b, h, q_idx, kv_idx`` and small constants.

    Division and modulo use non-zero constant divisors of both signs (Python floor semantics).
    """
    from attncompiler.ir import expr as E

    leaves = st.one_of(st.sampled_from(E.INDEX_VARS), st.integers(-9, 9).map(E.Const))
    nonzero = st.integers(-7, 7).filter(bool)

    def extend(children):
        ops = [
            st.tuples(children, children).map(lambda t: t[0] + t[1]),
            st.tuples(children, children).map(lambda t: t[0] - t[1]),
            st.tuples(children, st.integers(-3, 3)).map(lambda t: t[0] * t[1]),
            children.map(abs),
            children.map(lambda e: -e),
            st.tuples(children, children).map(lambda t: E.minimum(*t)),
            st.tuples(children, children).map(lambda t: E.maximum(*t)),
            st.tuples(children, children).map(lambda t: t[0] & t[1]),  # bitwise on integers
            st.tuples(children, children).map(lambda t: t[0] ^ t[1]),
        ]
        if divisors:
            ops += [st.tuples(children, nonzero).map(lambda t: t[0] // t[1]),
                    st.tuples(children, nonzero).map(lambda t: t[0] % t[1])]
        return st.one_of(*ops)

    return st.recursive(leaves, extend, max_leaves=max_leaves).map(E.as_expr)


def bool_exprs(max_leaves: int = 4) -> st.SearchStrategy:
    """Boolean index expressions: comparisons of integer expressions under ``& | ^ ~ where``."""
    from attncompiler.ir import expr as E

    ints = int_exprs(3)
    cmp = st.tuples(ints, ints, st.sampled_from(["lt", "le", "gt", "ge", "eq", "ne"])).map(
        lambda t: E.binop(t[2], t[0], t[1]))

    def extend(children):
        return st.one_of(
            st.tuples(children, children).map(lambda t: t[0] & t[1]),
            st.tuples(children, children).map(lambda t: t[0] | t[1]),
            st.tuples(children, children).map(lambda t: t[0] ^ t[1]),
            children.map(lambda e: ~e),
            st.tuples(children, children, children).map(lambda t: E.where(*t)),
        )

    return st.recursive(cmp, extend, max_leaves=max_leaves)


# ---------------------------------------------------------------------------------------------
# Issue 15: schedules, batch/head-dependent masks and whole fuzz cases
# ---------------------------------------------------------------------------------------------

# Lengths the fuzzers favour: 1, 2 and primes (never a multiple of any block size but 1).
PRIME_LENGTHS = (1, 2, 3, 5, 7, 11, 13, 17, 23, 31, 37, 41, 53, 67, 79, 97, 101, 127, 131)


def opaque_batch_parity(b, h, q_idx, kv_idx):
    """Keys whose position parity matches ``q + b`` (``remainder`` keeps it opaque; per batch)."""
    return (q_idx + kv_idx + b).remainder(2) == 0


def opaque_head_band(b, h, q_idx, kv_idx):
    """``|q - k| <= h + 1`` via ``Tensor.le`` (opaque; per head)."""
    return (q_idx - kv_idx).abs().le(h + 1)


# Traced mask_mods that read ``b`` and ``h`` (the tracer detects the dependence).
TRACED_BH = (
    lambda b, h, q_idx, kv_idx: (q_idx - kv_idx).abs() <= b * 3 + h,
    lambda b, h, q_idx, kv_idx: ((q_idx + h) % 4 == 0) | (kv_idx <= q_idx - b),
)


# Traced mask_mods whose index arithmetic leaves int32 (products past 2**31) or that index a
# 1-D table of document ids (longer than any fuzzed length).
DOC_IDS = torch.arange(256) // 7
TRACED_WIDE = (
    lambda b, h, q_idx, kv_idx: (q_idx * kv_idx * 3000017 + kv_idx) % 5 < 2,
    lambda b, h, q_idx, kv_idx: ((q_idx + 1) * 100000007) // ((kv_idx + 1) * 100000007) <= 1,
    lambda b, h, q_idx, kv_idx: DOC_IDS[q_idx] == DOC_IDS[kv_idx],
)


def batch_head_masks() -> st.SearchStrategy[ac.Pattern]:
    """Masks that depend on the batch entry and/or the head, traced and opaque."""
    return st.one_of(
        st.sampled_from(TRACED_BH).map(ac.mask),
        st.just(ac.mask(opaque_batch_parity, per_batch=True)),
        st.just(ac.mask(opaque_head_band, per_head=True)),
    )


def pattern_trees(max_index: int, max_leaves: int = 4, batch_head: bool = True) -> st.SearchStrategy[ac.Pattern]:
    """Random trees over every mask primitive with ``| & ~ .causal()``, ``ac.per_head`` nodes
    and (``batch_head``) masks that depend on ``b``/``h``; global indices stay below ``max_index``."""
    leaves = st.one_of(primitives(max_index), st.sampled_from(TRACED_WIDE).map(ac.mask))
    if batch_head:
        leaves = st.one_of(leaves, batch_head_masks())

    def extend(children):
        return st.one_of(
            st.tuples(children, children).map(lambda t: t[0] | t[1]),
            st.tuples(children, children).map(lambda t: t[0] & t[1]),
            children.map(lambda p: ~p),
            children.map(lambda p: p.causal()),
            st.lists(children, min_size=1, max_size=3).map(ac.per_head),
        )

    return st.recursive(leaves, extend, max_leaves=max_leaves)


@st.composite
def schedules(draw, triton: bool = False) -> ac.Schedule:
    """A random schedule. Torch: any block sizes, tiny score tiles and one key block per
    online-softmax step (many merges per row). Triton: blocks that are multiples of 16, kernel
    tiles that split them."""
    if triton:
        bm, bn = draw(st.sampled_from([16, 32])), draw(st.sampled_from([16, 32]))
        km = draw(st.sampled_from([None, 16])) if bm == 32 else None
        kn = draw(st.sampled_from([None, 16])) if bn == 32 else None
        return ac.Schedule(block_m=bm, block_n=bn, kernel_block_m=km, kernel_block_n=kn)
    bm, bn = draw(block_sizes())
    return ac.Schedule(block_m=bm, block_n=bn,
                       tile_elems=draw(st.sampled_from([16, 256, 4096, 1 << 18])),
                       key_blocks_per_step=draw(st.sampled_from([1, 2, 3, 64])))


def lengths(max_len: int) -> st.SearchStrategy[int]:
    """Sequence lengths up to ``max_len``, half of them from :data:`PRIME_LENGTHS`."""
    primes = [n for n in PRIME_LENGTHS if n <= max_len]
    return st.one_of(st.sampled_from(primes), st.integers(1, max_len))


@dataclass(frozen=True)
class FuzzCase:
    """One differential test: a pattern, shapes, dtype, backend, schedule and logit magnitude."""

    pattern: ac.Pattern
    backend: str
    dtype: torch.dtype
    batch: int
    heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    v_dim: int
    schedule: ac.Schedule
    magnitude: float
    row_shift: float = 0.0

    def inputs(self, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Fresh random q, k, v (never zeros) in ``dtype`` with gradients. q and k are scaled so
        that typical logits reach ``magnitude`` times their usual size; with ``row_shift`` the
        last components (q: ``t_i / scale``, k: 1) add about ``+-row_shift`` to every logit of
        row i, which is where online-softmax merges underflow if they mishandle maxima."""
        gen = torch.Generator().manual_seed(seed)
        s = self.magnitude ** 0.5

        def mk(*shape, scale=1.0):
            return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale

        q = mk(self.batch, self.heads, self.q_len, self.head_dim, scale=s)
        k = mk(self.batch, self.kv_heads, self.kv_len, self.head_dim, scale=s)
        v = mk(self.batch, self.kv_heads, self.kv_len, self.v_dim)
        if self.row_shift:
            q[..., -1] = mk(self.batch, self.heads, self.q_len, scale=self.row_shift * self.head_dim ** 0.5)
            k[..., -1] = 1.0
        return tuple(t.to(self.dtype).requires_grad_() for t in (q, k, v))


@st.composite
def fuzz_cases(draw, backend: str = "torch", max_len: int = 131, max_leaves: int = 4) -> FuzzCase:
    """A random mask pattern tree with everything around it: GQA head counts (``Hkv | H``),
    ``Lq != Lk``, ``Dv != D``, a schedule for ``backend``, fp32 or fp64, logit magnitude."""
    triton = backend == "triton"
    q_len = draw(lengths(max_len))
    kv_len = q_len if draw(st.booleans()) else draw(lengths(max_len))
    heads, kv_heads = draw(st.sampled_from([(1, 1), (2, 1), (2, 2), (3, 3), (4, 2), (4, 1), (6, 3)]))
    head_dim = draw(st.sampled_from([16, 32] if triton else [8, 16, 48]))
    v_dim = head_dim if draw(st.booleans()) else draw(st.sampled_from([16, 32] if triton else [4, 8, 24]))
    pattern = draw(pattern_trees(min(q_len, kv_len), max_leaves))
    dtype = torch.float32 if triton or draw(st.booleans()) else torch.float64
    return FuzzCase(pattern, backend, dtype, draw(st.integers(1, 2)), heads, kv_heads, q_len, kv_len,
                    head_dim, v_dim, draw(schedules(triton)), draw(st.sampled_from([1.0, 1.0, 4.0, 100.0])),
                    draw(st.sampled_from([0.0, 0.0, 300.0])))
