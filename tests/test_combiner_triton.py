"""Combiner on the Triton backend (TRITON_INTERPRET=1 on CPU, set in conftest): forward and
backward vs the float64 reference at tiny sizes; the rendered kernel does not depend on L."""

from __future__ import annotations

import pytest
import torch

import attncompiler as ac
from attncompiler.families import combiner as C
from attncompiler.codegen.triton.render import render_predicate
from attncompiler.families.combiner.joint import slot_plan
from oracle import assert_matches_oracle

pytest.importorskip("triton")

SCHED = ac.Schedule(block_m=16, block_n=16)


@pytest.mark.parametrize("pattern", [
    C.combiner_fixed(4, causal=True),
    C.combiner_logsparse(),
    C.combiner_mixture(C.combiner_axial(5, variant="rowmajor", causal=True), C.combiner_axial(5)),  # reorders tokens
], ids=repr)
def test_triton_matches_reference(pattern):
    q, k, v = (torch.randn(1, 2, 21, 16, requires_grad=True) for _ in range(3))
    out = ac.compile(pattern, backend="triton", schedule=SCHED)(q, k, v)
    ref = ac.reference(pattern, q, k, v)
    assert_matches_oracle(out, ref, (q, k, v))


@pytest.mark.parametrize("pattern", [C.combiner_fixed(4, causal=True), C.combiner_logsparse(),
                                     C.combiner_axial(5, variant="rowmajor")], ids=repr)
@pytest.mark.parametrize("pack", [None, (16, 16)], ids=["shared", "pack16"])
def test_kernel_source_independent_of_length(pattern, pack):
    joint = C.JointMask(pattern, 128, pack)
    sources = {render_predicate(joint.predicate(L, joint.kv_len(L))) for L in (20, 37, 300)}
    assert len(sources) == 1


def test_kernel_source_same_for_shared_and_packed_slots():
    joint = C.JointMask(C.combiner_axial(5, variant="rowmajor", causal=True), 128, (16, 16))
    assert {slot_plan(joint, L).packed for L in (20, 23)} == {True, False}  # the slot arrangement changes
    assert len({render_predicate(joint.predicate(L, joint.kv_len(L))) for L in (20, 23)}) == 1
