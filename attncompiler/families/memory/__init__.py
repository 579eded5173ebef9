"""Bounded-memory attention (ABC): the pattern node and its controls (:mod:`.pattern`), program stages,
lowering and control weights (:mod:`.program`), and the float64 reference (:mod:`.reference`)."""

from .pattern import (CONTROLS, MEMORY, ClusterControl, Control, LinformerControl, Memory, MLPControl, WindowControl,
                      memory)
from .program import SlotControl, SlotRead, SlotWrite, control_weights


__all__ = ["CONTROLS", "MEMORY", "ClusterControl", "Control", "LinformerControl", "MLPControl", "Memory",
           "SlotControl", "SlotRead", "SlotWrite", "WindowControl", "control_weights", "memory"]
