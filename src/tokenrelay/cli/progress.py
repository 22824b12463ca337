"""A progress line for long work: redrawn in place on a terminal, a line per step otherwise."""

from __future__ import annotations

import time
from typing import TextIO


class Progress:
    """Reports `done` of `total` items to `out`, at most every `interval` seconds when not a tty."""

    def __init__(self, total: int, out: TextIO, label: str, interval: float = 2.0) -> None:
        self.total = total
        self._out = out
        self._label = label
        self._interval = interval
        self._tty = out.isatty()
        self._started = time.monotonic()
        self._last = 0.0

    def __call__(self, done: int) -> None:
        now = time.monotonic()
        finished = done >= self.total
        if not self._tty and not finished and now - self._last < self._interval:
            return
        self._last = now
        rate = done / max(now - self._started, 1e-9)
        line = f"{self._label} {done:,}/{self.total:,} ({done / self.total:.0%}, {rate:,.0f}/s)"
        self._out.write(f"\r{line}" if self._tty else f"{line}\n")
        if self._tty and finished:
            self._out.write("\n")
        self._out.flush()
