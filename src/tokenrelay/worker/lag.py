"""Watching the worker's event loop: how late its callbacks run, and whether to take more jobs.

Every `interval` a timer checks how much later than asked it woke up. While that lag stays
over `limit`, the worker takes no new jobs: the ones it holds get the loop. Each episode is
logged once when it starts and once, with its duration, when it ends.
"""

from __future__ import annotations

import asyncio
import time

import structlog

log = structlog.get_logger()


class LoopLag:
    """Measures the event loop's lag; `overloaded` while it is over `limit` seconds."""

    def __init__(self, limit: float, *, interval: float = 0.1) -> None:
        self.limit = limit
        self.interval = interval
        self.lag = 0.0  # the last measurement, in seconds
        self.worst = 0.0  # the largest since `take_worst` was last called
        self._calm = asyncio.Event()
        self._calm.set()
        self._since = 0.0

    @property
    def overloaded(self) -> bool:
        """Whether the loop is too late to take new jobs."""
        return not self._calm.is_set()

    async def calm(self) -> None:
        """Wait until the loop keeps time again."""
        await self._calm.wait()

    def take_worst(self) -> float:
        """The worst lag since the last call (for a metric), and start over."""
        worst, self.worst = self.worst, self.lag
        return worst

    async def watch(self) -> None:
        """Measure until cancelled."""
        while True:
            asked = time.monotonic()
            await asyncio.sleep(self.interval)
            self.lag = max(0.0, time.monotonic() - asked - self.interval)
            self.worst = max(self.worst, self.lag)
            self._judge(self.lag)

    def _judge(self, lag: float) -> None:
        if lag > self.limit and not self.overloaded:
            self._calm.clear()
            self._since = time.monotonic()
            log.warning("worker.loop_lag_high", lag_ms=round(lag * 1000, 1), taking_jobs=False)
        elif lag < self.limit / 2 and self.overloaded:
            self._calm.set()
            lasted = time.monotonic() - self._since
            log.info("worker.loop_lag_ok", lag_ms=round(lag * 1000, 1), lasted_s=round(lasted, 2))
