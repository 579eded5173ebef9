"""What a stage implementation receives besides its inputs (shared by every backend)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class RunContext:
    """What a stage implementation may need besides its inputs."""

    scale: float
    batch: int
    heads: int
    extra: dict[str, Any] = field(default_factory=dict)
