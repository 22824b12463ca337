"""The time limits of one attempt: to its first token, between two tokens, and in all.

One timer per attempt, not one per token: a token only records the time it came
(`Watchdog.alive`, a float assignment; the first one also moves the timer from the
first-token deadline to the stall deadline), and when the timer fires it looks whether a
token came since and, if so, sets itself again for the new deadline. Past a deadline it cancels
the attempt's task; `expired` then turns that cancellation into the attempt's typed,
retryable error (FirstTokenTimeoutError, StallTimeoutError, AttemptTimeoutError), as
`asyncio.timeout` does for its own.
"""

from __future__ import annotations

import asyncio
from types import TracebackType

from tokenrelay.errors import (
    AttemptTimeoutError,
    FirstTokenTimeoutError,
    GenerationError,
    StallTimeoutError,
)


class Watchdog:
    """Cancels the current task when no token comes in time; use it as an async context."""

    def __init__(self, *, first_token: float, stall: float, whole: float | None = None) -> None:
        self.first_token = first_token
        self.stall = stall
        self.whole = whole  # seconds the attempt may take in all (None: no limit of its own)
        self.ends = float("inf")  # loop time past which the attempt has taken too long
        self.tokens = 0
        self.last = 0.0  # loop time of the last token (or of the start)
        self.error: GenerationError | None = None
        self._loop = asyncio.get_running_loop()
        self._task: asyncio.Task[object] | None = None
        self._timer: asyncio.TimerHandle | None = None

    def alive(self) -> None:
        """A token came."""
        self.last = self._loop.time()
        if not self.tokens and self._timer is not None:  # from now on, the stall timeout
            self._timer.cancel()
            self._timer = self._loop.call_at(min(self.last + self.stall, self.ends), self._check)
        self.tokens += 1

    async def __aenter__(self) -> Watchdog:
        self._task = asyncio.current_task()
        self.last = self._loop.time()
        if self.whole is not None:
            self.ends = self.last + self.whole
        self._timer = self._loop.call_at(min(self.last + self.first_token, self.ends), self._check)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self.error is not None and exc_type is asyncio.CancelledError:
            assert self._task is not None
            if self._task.uncancel() == 0:  # ours alone: no one else cancelled the task too
                raise self.error from None

    def _check(self) -> None:
        now = self._loop.time()
        if now >= self.ends:
            self.error = AttemptTimeoutError(
                f"the attempt took longer than {self.whole:g} s in all (the attempt timeout)"
            )
        elif self.tokens:
            deadline = self.last + self.stall
            if now < deadline:
                self._timer = self._loop.call_at(min(deadline, self.ends), self._check)
                return
            self.error = StallTimeoutError(
                f"no token for {self.stall:g} s after token {self.tokens} (the stall timeout)"
            )
        else:
            deadline = self.last + self.first_token
            if now < deadline:  # the attempt's own limit was due, a hair early
                self._timer = self._loop.call_at(min(deadline, self.ends), self._check)
                return
            self.error = FirstTokenTimeoutError(
                f"no first token within {self.first_token:g} s (the first-token timeout)"
            )
        self._timer = None
        assert self._task is not None
        self._task.cancel()
