"""The Combiner stages on the Triton backend.

The joint softmax over ``[keys ; summaries]`` -- the O(L sqrt L) / O(L log L) part -- is the
shared ``BlockSparseAttention`` stage, so on this backend it runs in the generated Triton
kernels (forward and backward), with the Combiner predicate rendered into them; its block
layout, the summary slot tables and the span tables are runtime data, so the kernel source does
not depend on L (nor on whether the slots are shared or packed at that length).
The summary stages (span pooling, the local expectation, concatenation, token reordering, the
mixture mean) are
O(L)-sized batched tensor ops (O(L sqrt L) for causal prefix columns); they run as PyTorch ops
on the same device, shared with the torch backend, rather than as hand-written kernels.
"""

from __future__ import annotations

from attncompiler.families.combiner.program import ConcatSummaries, MixOutputs, ReorderTokens, SpanAttention, SpanPool

from ..pytorch.combiner import run_concat, run_mix, run_reorder, run_span_attention, run_span_pool

STAGES = {SpanPool: run_span_pool, SpanAttention: run_span_attention, ConcatSummaries: run_concat,
          MixOutputs: run_mix, ReorderTokens: run_reorder}
