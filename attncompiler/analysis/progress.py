"""A minimal progress line on stderr for long analyses (no dependency, silent by default)."""

from __future__ import annotations

import sys
import time


class Progress:
    """Prints ``analyze: <stage> i/n`` on one stderr line, at most ten times a second."""

    def __init__(self, enabled: bool = False):
        self.enabled = enabled
        self._last = 0.0

    def update(self, stage: str, i: int | None = None, n: int | None = None) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if i is not None and n is not None and i < n and now - self._last < 0.1:
            return
        self._last = now
        count = f" {i}/{n}" if i is not None and n is not None else (f" {i}" if i is not None else "")
        sys.stderr.write(f"\ranalyze: {stage}{count}\033[K")
        sys.stderr.flush()

    def done(self) -> None:
        if self.enabled:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
