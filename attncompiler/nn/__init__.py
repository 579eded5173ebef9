"""Model-level modules: multi-head attention, pre-norm transformer blocks and stacks.

Attention inside every layer is an ``ac.compile(pattern, backend=...)`` module, so any pattern
family that maps ``[B, H, L, D]`` q/k/v to ``[B, H, L, D]`` works per layer. A stack takes one
pattern per layer and a reuse plan (see :mod:`attncompiler.families.reuse.plan`): reused heads skip their Q/K
projections and apply the map of the head they reuse to the current layer's values, either from
the probabilities that head's layer stored over its block layout (``stored_probs``) or by
recomputing it from that head's kept Q/K (``recompute``).
"""

from .attention import MultiheadAttention
from .checkpoint import CHECKPOINT_FORMAT, load_checkpoint, parse_pattern, save_checkpoint
from .stack import TransformerBlock, TransformerStack

__all__ = ["CHECKPOINT_FORMAT", "MultiheadAttention", "TransformerBlock", "TransformerStack", "load_checkpoint",
           "parse_pattern", "save_checkpoint"]
