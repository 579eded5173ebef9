"""The program IR: schedules, stages, lowering and passes, input validation and the float64 reference."""

from .reference import dense_masks, reference, register_reference
from .schedule import Schedule
from .stages import BlockSparseAttention, Program, Stage, lower, register_lowering

__all__ = ["BlockSparseAttention", "Program", "Schedule", "Stage", "dense_masks", "lower", "reference",
           "register_lowering", "register_reference"]
