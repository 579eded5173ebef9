"""Block layouts: which (query-block, key-block) pairs a pattern visits, partial or full, in the CSR
form FlexAttention's BlockMask uses; memory budgets; pictures of patterns and layouts."""

from .block_layout import BlockLayout, Blocks2D, build_layout, partial_masks
from .block_sets import EMPTY, FULL, PARTIAL, UNKNOWN, BlockSet, Geometry, block_set
from .picture import render_text, save_png

__all__ = ["EMPTY", "FULL", "PARTIAL", "UNKNOWN", "BlockLayout", "BlockSet", "Blocks2D", "Geometry", "block_set",
           "build_layout", "partial_masks", "render_text", "save_png"]
