"""The pattern DSL: the :class:`Pattern` base with its combinators, and the primitive masks."""

from .pattern import Family, Pattern, intersection, per_head, union
from .primitives import (block_local, block_window, causal, dilated_window, document, full, global_tokens, mask,
                         prefix_lm, random_blocks, sliding_window, strided)

__all__ = ["Family", "Pattern", "block_local", "block_window", "causal", "dilated_window", "document", "full",
           "global_tokens", "intersection", "mask", "per_head", "prefix_lm", "random_blocks", "sliding_window",
           "strided", "union"]
