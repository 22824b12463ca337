"""The RQ side of one tokenrelay job: a job class that runs nothing but tokenrelay's
generation, and time limits for RQ's callbacks that work outside the main thread."""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable
from typing import Any

from rq.job import Job
from rq.timeouts import BaseDeathPenalty

from tokenrelay.errors import UnsafeJobError
from tokenrelay.stream import keys
from tokenrelay.worker import hooks


class ThreadTimerDeathPenalty(BaseDeathPenalty):
    """A time limit for a callback run in a thread: a timer raises the exception in it.

    RQ's default uses SIGALRM, which works only in the main thread; its thread-based one
    rewrites `JobTimeoutException.__init__` for the whole process. This does neither. The
    exception lands when the thread next runs Python code.
    """

    def setup_death_penalty(self) -> None:
        self._thread = threading.get_ident()
        self._timer: threading.Timer | None = None
        if self._timeout and self._timeout > 0:
            self._timer = threading.Timer(self._timeout, self._fire)
            self._timer.daemon = True
            self._timer.start()

    def _fire(self) -> None:
        exception = ctypes.py_object(self._exception)
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self._thread), exception)

    def cancel_death_penalty(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


class RelayJob(Job):
    """A job that runs tokenrelay's generation or nothing: the payload names no other code.

    RQ imports a job's callbacks by the dotted names stored in the job; this class never
    imports a name, it maps the few it knows to tokenrelay's hooks.
    """

    def check_runnable(self) -> None:
        """Raise UnsafeJobError unless the job names tokenrelay's generation function."""
        if self.func_name != keys.GENERATE_FUNC:
            raise UnsafeJobError(
                f"refused job {self.id}: it names {self.func_name!r}, "
                f"and a tokenrelay worker runs only {keys.GENERATE_FUNC}"
            )

    @property
    def func(self) -> Callable[..., Any]:
        self.check_runnable()
        raise UnsafeJobError("tokenrelay jobs are run by the worker's loop, not by RQ")

    @property
    def success_callback(self) -> None:
        return None

    @property
    def failure_callback(self) -> Callable[..., Any] | None:
        if self._failure_callback_name == keys.ON_FAILURE_CALLBACK:
            return hooks.on_failure
        return None

    @property
    def stopped_callback(self) -> Callable[..., Any] | None:
        if self._stopped_callback_name == keys.ON_STOPPED_CALLBACK:
            return hooks.on_stopped
        return None
