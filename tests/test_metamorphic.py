"""Metamorphic tests (issue 15): relations between calls that must hold for every backend and
family, checked with large logits, odd lengths and random schedules, so that a silently wrong
answer shows up as a broken relation even where no oracle would be consulted.

Relations (each also compared with the float64 reference of the untransformed call):

* **row shift**: ``q' = [q, t / scale]``, ``k' = [k, 1]`` adds ``t_i`` (hundreds, either sign)
  to every logit of row i; v is unchanged, so the output is unchanged (lse moves by ``t_i``).
  Combiner summaries pool the 1-column to 1, ABC slot keys are convex combinations of keys
  (their extra component is 1), Diffuser normalizes each row of P: all invariant.
* **batch permutation**: permuting the batch permutes the output.
* **heads one at a time**: each query head alone (with its key/value head under GQA, and its
  own pattern for ``ac.per_head``) equals that head of one call.
* **query split**: see :func:`check_query_split`.
* **per-batch masks**: a mask that depends on ``b`` equals one call per batch entry with ``b``
  fixed in the mask_mod.

The Triton backend runs under the interpreter on CPU: one example per case at short lengths.
Triton computes float64 with the torch path (covered by the torch cases), so only float32 runs
there, through the generated kernels.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attncompiler as ac
from strategies import opaque_batch_parity, opaque_near, schedules

HAS_TRITON = importlib.util.find_spec("triton") is not None


# ---------------------------------------------------------------------------------------------
# Families
# ---------------------------------------------------------------------------------------------

def _window_global(b, h, q, k):
    """``sliding_window(4) | global_tokens([0, 5])`` as a mask_mod (traced)."""
    return ((q - k).abs() <= 4) | (q == 0) | (q == 5) | (k == 0) | (k == 5)


def _traced_causal_strided(b, h, q, k):
    return (((q - k) % 3 == 0) & (k <= q)) | (k < 2)


@dataclass(frozen=True)
class Family:
    """A pattern under test and what the relations need to know about it.

    ``mod`` (mask families): the mask_mod, so that the query-split relation can build the same
    pattern with query positions moved by an offset. ``row_local``: a query row's output does
    not depend on its position (bidirectional ABC). ``heads``: the pattern of each head
    (``ac.per_head``). ``slots``: ABC slots, whose MLP control logits are passed explicitly.
    """

    name: str
    pattern: ac.Pattern
    mod: Callable | None = None
    row_local: bool = False
    heads: tuple[ac.Pattern, ...] = ()
    slots: int = 0
    lse: bool = False
    batch_dependent: bool = False

    def __repr__(self) -> str:
        return self.name

    def shifted(self, offset: int) -> ac.Pattern | None:
        """The pattern seen by query rows that start at ``offset`` (None: not expressible)."""
        if self.mod is not None:
            mod = self.mod
            return ac.mask(lambda b, h, q, k: mod(b, h, q + offset, k))
        return self.pattern if self.row_local else None

    def head_pattern(self, h: int) -> ac.Pattern:
        return self.heads[h % len(self.heads)] if self.heads else self.pattern

    def batch_pattern(self, b: int) -> ac.Pattern:
        """The mask with the batch entry fixed to ``b`` (for a call holding that entry alone)."""
        mod = self.mod
        return ac.mask(lambda _b, h, q, k: mod(b, h, q, k))


PER_HEAD = (ac.causal() & ac.sliding_window(6), ac.strided(3) | ac.global_tokens([1]))
MASKS = [
    Family("window_global", ac.sliding_window(4) | ac.global_tokens([0, 5]), _window_global, lse=True),
    Family("traced", ac.mask(_traced_causal_strided), _traced_causal_strided, lse=True),
    Family("opaque", ac.mask(opaque_near), opaque_near, lse=True),
    Family("per_head", ac.per_head(PER_HEAD), heads=PER_HEAD, lse=True),
]
STRUCTURED = [
    Family("combiner", ac.combiner_fixed(4)),
    Family("combiner_causal", ac.combiner_fixed(5, causal=True, pool="mean")),
    Family("diffuser", ac.diffuse(ac.sliding_window(2) | ac.global_tokens([0]), hops=2, alpha=0.2)),
    Family("abc", ac.memory(4), row_local=True, slots=4),
    Family("abc_causal", ac.memory(3, causal=True), slots=3),
]
FAMILIES = MASKS + STRUCTURED
PER_BATCH = [
    Family("traced_per_batch", ac.mask(lambda b, h, q, k: (q - k).abs() <= b * 3 + 1),
           lambda b, h, q, k: (q - k).abs() <= b * 3 + 1, lse=True, batch_dependent=True),
    Family("opaque_per_batch", ac.mask(opaque_batch_parity, per_batch=True), opaque_batch_parity, lse=True,
           batch_dependent=True),
]


# ---------------------------------------------------------------------------------------------
# Inputs, calls, tolerances
# ---------------------------------------------------------------------------------------------

@dataclass
class Setup:
    """One drawn configuration: compiled module, inputs in ``dtype``, extra call inputs."""

    family: Family
    backend: str
    dtype: torch.dtype
    attn: torch.nn.Module
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    extra: dict  # tensors [B, Hkv, ...] passed to every call (ABC control logits)
    scale: float
    schedule: ac.Schedule

    def __call__(self, q, k, v, pattern=None, **extra):
        """The compiled module (or ``pattern`` compiled alike) at the fixed scale."""
        attn = self.attn if pattern is None else ac.compile(pattern, backend=self.backend, schedule=self.schedule)
        return attn(q, k, v, scale=self.scale, **(extra or self.extra))

    def reference(self, q, k, v, **extra):
        return self.attn.reference(q, k, v, scale=self.scale, **(extra or self.extra))

    def logit_bound(self) -> float:
        """The largest |logit| of the untransformed call (sets the float32 tolerance)."""
        s = torch.einsum("bhqd,bhkd->bhqk", self.q.double(), self.k.double().repeat_interleave(
            self.q.shape[1] // self.k.shape[1], 1))
        return float(s.abs().max()) * self.scale


def tolerance(dtype: torch.dtype, logits: float) -> float:
    """Absolute and relative tolerance for a comparison involving logits of size ``logits``:
    float32 rounds a logit s by about ``s * 6e-8`` (times a few for the dot product), which
    moves probabilities by that relative amount; float64 by ``s * 1e-16``."""
    if dtype == torch.float64:
        return 1e-10 * max(1.0, logits)
    return 2e-5 + 1e-6 * logits


LENGTHS = {"torch": [37, 97, 131], "triton": [17, 37]}


@st.composite
def setups(draw, family: Family, backend: str, dtype: torch.dtype, batch: int = 2,
           lengths: list[int] | None = None) -> Setup:
    """Draw a length, a schedule, a logit magnitude (1 to 1000) and fresh inputs."""
    L = draw(st.sampled_from(lengths or LENGTHS[backend]))
    heads, kv_heads = (4, 2) if backend == "torch" else (2, 1)
    D = 16
    magnitude = draw(st.sampled_from([1.0, 100.0, 1000.0]))
    sched = draw(schedules(triton=backend == "triton"))
    seed = draw(st.integers(0, 2 ** 16))
    gen = torch.Generator().manual_seed(seed)

    def mk(*shape, s=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * s).to(dtype)

    # Logits q.k * D**-0.5 have standard deviation ``magnitude``.
    q, k = mk(batch, heads, L, D, s=magnitude ** 0.5), mk(batch, kv_heads, L, D, s=magnitude ** 0.5)
    v = mk(batch, kv_heads, L, D)
    extra = {"control": mk(batch, kv_heads, L, family.slots, s=3.0)} if family.slots else {}
    attn = ac.compile(family.pattern, backend=backend, schedule=sched)
    return Setup(family, backend, dtype, attn, q, k, v, extra, D ** -0.5, sched)


def _close(got, want, tol, what):
    torch.testing.assert_close(got.double(), want.double(), atol=tol, rtol=tol, msg=lambda m: f"{what}: {m}")


def _settings(n: int):
    return settings(max_examples=n, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---------------------------------------------------------------------------------------------
# Relations
# ---------------------------------------------------------------------------------------------

def check_row_shift(s: Setup, data) -> None:
    """Adding ``t_i`` to every logit of row i leaves the output unchanged."""
    B, H, L, _ = s.q.shape
    shift = data.draw(st.sampled_from([100.0, 500.0, 1000.0]), label="shift")
    t = torch.randn(B, H, L, 1, generator=torch.Generator().manual_seed(L), dtype=torch.float64) * shift
    q2 = torch.cat([s.q, (t / s.scale).to(s.dtype)], -1)
    k2 = torch.cat([s.k, torch.ones_like(s.k[..., :1])], -1)
    t = (q2[..., -1:].double() * s.scale)  # the shift as the rounded inputs carry it
    ref, ref_lse = s.reference(s.q, s.k, s.v, return_lse=True) if s.family.lse else (s.reference(s.q, s.k, s.v), None)
    tol = tolerance(s.dtype, s.logit_bound() + shift * 4)
    if s.family.lse:
        out, lse = s.attn(s.q, s.k, s.v, scale=s.scale, return_lse=True)
        out2, lse2 = s.attn(q2, k2, s.v, scale=s.scale, return_lse=True)
        fin = torch.isfinite(ref_lse)
        assert torch.equal(torch.isfinite(lse2), fin), "rows with keys changed under a row shift"
        _close(lse2.double()[fin] - t[..., 0][fin], ref_lse[fin], tol * 10, "lse - t")
    else:
        out, out2 = s(s.q, s.k, s.v), s(q2, k2, s.v)
    _close(out, ref, tolerance(s.dtype, s.logit_bound()), "out vs reference")
    _close(out2, ref, tol, "shifted out vs reference")
    _close(out2, out, tol, "shifted out vs out")


def check_batch_permutation(s: Setup, data) -> None:
    """Permuting the batch permutes the output."""
    B = s.q.shape[0]
    perm = torch.tensor(data.draw(st.permutations(range(B)), label="perm"))
    out = s(s.q, s.k, s.v)
    extra = {n: t[perm] for n, t in s.extra.items()}
    out_p = s(s.q[perm], s.k[perm], s.v[perm], **extra)
    tol = tolerance(s.dtype, s.logit_bound())
    _close(out_p, out[perm], tol, "permuted batch")
    _close(out, s.reference(s.q, s.k, s.v), tol, "out vs reference")


def check_heads_one_at_a_time(s: Setup, data) -> None:
    """Each query head alone (its key/value head under GQA, its own per-head pattern) equals
    that head of the call with all heads."""
    H, Hkv = s.q.shape[1], s.k.shape[1]
    out = s(s.q, s.k, s.v)
    tol = tolerance(s.dtype, s.logit_bound())
    _close(out, s.reference(s.q, s.k, s.v), tol, "out vs reference")
    for h in range(H):
        g = h // (H // Hkv)
        one = slice(g, g + 1)
        extra = {n: t[:, one] for n, t in s.extra.items()}
        pattern = s.family.head_pattern(h) if s.family.heads else None
        out_h = s(s.q[:, h:h + 1], s.k[:, one], s.v[:, one], pattern, **extra)
        _close(out_h, out[:, h:h + 1], tol, f"head {h} alone")


def check_query_split(s: Setup, data) -> None:
    """Query rows split over two calls equal one call.

    Positions are top-left: query row i of a call sits at position i. The first call takes rows
    ``[0, m)`` with all keys: their positions do not change, so it must equal ``out[:, :, :m]``
    with the same pattern. The second call takes rows ``[m, L)``, which it places at positions
    ``0 .. L-m-1``; it must equal ``out[:, :, m:]`` when run with the pattern whose query index
    is moved by ``m`` (``mask_mod(b, h, q + m, k)``), or with the same pattern when a row's
    output does not depend on its position (bidirectional ABC). Combiner summaries pool the
    queries of a span and Diffuser hops need as many queries as keys, so neither splits.
    """
    L = s.q.shape[2]
    m = data.draw(st.integers(1, L - 1), label="split")
    out = s(s.q, s.k, s.v)
    tol = tolerance(s.dtype, s.logit_bound())
    _close(out, s.reference(s.q, s.k, s.v), tol, "out vs reference")
    _close(s(s.q[:, :, :m], s.k, s.v), out[:, :, :m], tol, f"rows [0, {m})")
    shifted = s.family.shifted(m)
    assert shifted is not None, f"{s.family} has no query-split relation"
    second = s(s.q[:, :, m:], s.k, s.v, shifted if shifted is not s.family.pattern else None)
    _close(second, out[:, :, m:], tol, f"rows [{m}, {L}) at positions moved by {m}")


def check_per_batch(s: Setup, data) -> None:
    """A mask that depends on ``b`` equals one call per batch entry with ``b`` fixed."""
    out = s(s.q, s.k, s.v)
    tol = tolerance(s.dtype, s.logit_bound())
    _close(out, s.reference(s.q, s.k, s.v), tol, "out vs reference")
    for b in range(s.q.shape[0]):
        one = slice(b, b + 1)
        out_b = s(s.q[one], s.k[one], s.v[one], s.family.batch_pattern(b))
        _close(out_b, out[one], tol, f"batch entry {b} alone")


# ---------------------------------------------------------------------------------------------
# Tests: every relation on every backend and family it applies to, float64 and float32
# ---------------------------------------------------------------------------------------------

SPLITTABLE = [f for f in FAMILIES if f.mod is not None or f.row_local]
RELATIONS = {
    "row_shift": (check_row_shift, FAMILIES + PER_BATCH),
    "batch_permutation": (check_batch_permutation, FAMILIES),
    "heads_one_at_a_time": (check_heads_one_at_a_time, FAMILIES + PER_BATCH),
    "query_split": (check_query_split, SPLITTABLE),
    "per_batch": (check_per_batch, PER_BATCH),
}
# backend -> (examples per case, dtypes); float64 on triton runs the torch path, so only float32.
BACKENDS = {"torch": (2, (torch.float64, torch.float32)), "triton": (1, (torch.float32,))}

# Known silent wrong answers, marked so the suite stays green and a fix flips them (strict).
KNOWN: dict[tuple[str, str, str, str], str] = {}


def _params(relation: str, backend: str):
    _, families = RELATIONS[relation]
    out = []
    for fam in families:
        for dtype in BACKENDS[backend][1]:
            key = (relation, backend, fam.name, str(dtype).removeprefix("torch."))
            marks = [pytest.mark.xfail(strict=True, reason=KNOWN[key])] if key in KNOWN else []
            if backend == "triton":
                marks.append(pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed"))
            out.append(pytest.param(fam, dtype, id=f"{fam.name}-{key[3]}", marks=marks))
    return out


def _make_test(relation: str, backend: str):
    check, _ = RELATIONS[relation]

    @pytest.mark.parametrize("family,dtype", _params(relation, backend))
    @given(data=st.data())
    @_settings(BACKENDS[backend][0])
    def test(family, dtype, data):
        check(data.draw(setups(family, backend, dtype), label="setup"), data)

    test.__name__ = f"test_{relation}_{backend}"
    test.__doc__ = check.__doc__
    return test


for _rel in RELATIONS:
    for _backend in BACKENDS:
        _t = _make_test(_rel, _backend)
        globals()[_t.__name__] = _t
del _rel, _backend, _t


def test_family_mask_mods_equal_their_patterns():
    """The mask_mods the query-split relation shifts are the patterns under test."""
    for fam in MASKS + PER_BATCH:
        if fam.mod is None:
            continue
        for b in range(2):
            got = ac.mask(lambda _b, h, q, k: fam.mod(b, h, q, k)).to_dense(23, 29)
            assert torch.equal(got, fam.pattern.to_dense(23, 29, b=b)), fam.name
            assert torch.equal(fam.shifted(0).to_dense(23, 29, b=b), got), fam.name
