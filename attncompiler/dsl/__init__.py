"""The pattern DSL: the :class:`Pattern` base with its combinators, and the primitive masks."""

from .pattern import (INT_LIMIT, Complement, Family, Intersection, Pattern, PerHead, Union, check_int, check_lengths,
                      intersection, per_head, require_mask, union)
from .primitives import (BlockLocal, BlockWindow, DilatedWindow, Document, Full, GlobalTokens, PrefixLM,
                         RandomBlocks, SlidingWindow, Strided, block_local, block_window, dilated_window, document,
                         full, global_tokens, prefix_lm, random_blocks, sliding_window, strided)
from .mask_mod import Mask, mask
from .pattern import Causal, causal

__all__ = ["INT_LIMIT", "BlockLocal", "BlockWindow", "Causal", "Complement", "DilatedWindow", "Document", "Family",
           "Full", "GlobalTokens", "Intersection", "Mask", "Pattern", "PerHead", "PrefixLM", "RandomBlocks",
           "SlidingWindow", "Strided", "Union", "block_local", "block_window", "causal", "check_int", "check_lengths",
           "dilated_window", "document", "full", "global_tokens", "intersection", "mask", "per_head", "prefix_lm",
           "random_blocks", "require_mask", "sliding_window", "strided", "union"]
