"""The concurrent worker: up to N generations at once on one event loop, for the process's life.

A slot is taken before a job: the loop waits for a free one, then takes the next job off the
queue with a blocking move (so an idle worker starts a new job at once), and runs it as a
task. Each task has its own timeout and its own way to be stopped (a stop command, a cancel
noticed at the heartbeat, a lease taken over, a cold shutdown); the worker records why before
cancelling it, and the generation ends its stream with that reason. RQ's bookkeeping runs in
a small pool of threads; nothing on a token's way blocks the loop.

Beside the jobs run the process's background tasks: the stream batcher (`stream.batcher`),
the loop-lag watch (`worker.lag`), heartbeats and maintenance (`worker.upkeep`), lease
renewals and takeovers (`worker.takeover`); commands and signals arrive through
`worker.control`. Redis outages are ridden out: writes wait in the batcher, RQ's bookkeeping
is retried, and the process's `Outage` logs each outage once (TOKENRELAY_REDIS_OUTAGE_LIMIT).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

import structlog
from rq import Queue
from rq.executions import Execution
from rq.timeouts import JobTimeoutException

from tokenrelay.connection import async_client_for
from tokenrelay.errors import (
    RedisUnavailableError,
    StreamClosedError,
    StreamLostError,
    WorkerShutdownError,
    WriterFencedError,
)
from tokenrelay.outage import is_down, retry
from tokenrelay.settings import Settings
from tokenrelay.stream.batcher import StreamBatcher
from tokenrelay.stream.lease_scripts import Claim
from tokenrelay.stream.protocol import ErrorEntry
from tokenrelay.worker import control, takeover, upkeep
from tokenrelay.worker.generation import generate
from tokenrelay.worker.intake import DEQUEUE_WAIT, Intake
from tokenrelay.worker.lag import LoopLag
from tokenrelay.worker.leases import Leases
from tokenrelay.worker.llm import ChatModels
from tokenrelay.worker.rq_job import RelayJob
from tokenrelay.worker.rq_worker import RelayWorker
from tokenrelay.worker.run import JobRun

log = structlog.get_logger()

T = TypeVar("T")
P = ParamSpec("P")

#: Threads for RQ's (blocking) bookkeeping: taking, admitting, finishing, heartbeats.
BOOKKEEPING_THREADS = 16

#: The most jobs taken off the queues in one round trip.
DEQUEUE_BATCH = 50

#: Seconds to wait before trying the queue again after Redis failed.
RETRY_DELAY = 1.0


@dataclass
class _Running:
    """A job in flight: its task, what it runs, and RQ's record of it."""

    task: asyncio.Task[None]
    run: JobRun
    execution: Execution | None = None
    #: Why the worker stopped it: timeout, stopped (a command), lost (ended elsewhere),
    #: fenced (taken over), closed (its stream ended elsewhere), gone (its stream vanished),
    #: shutdown.
    reason: str | None = None


class WorkerLoop:
    """Runs jobs from `worker`'s queues, up to `concurrency` at once, until stopped."""

    def __init__(
        self, worker: RelayWorker, settings: Settings, *, concurrency: int, burst: bool = False
    ) -> None:
        self.worker = worker
        self.settings = settings
        self.concurrency = concurrency
        self.burst = burst
        self.running: dict[str, _Running] = {}  # by job id
        self.lag = LoopLag(settings.loop_lag_limit)
        self.stopping = asyncio.Event()  # set by a warm shutdown: take no more jobs
        self.cold = False  # a cold shutdown is stopping every job
        self.busy = 0  # jobs taken off a queue and not yet over (being admitted, or running)
        self._slot_freed = asyncio.Event()
        self._admissions: set[asyncio.Task[None]] = set()
        self._pool = ThreadPoolExecutor(BOOKKEEPING_THREADS, thread_name_prefix="rq-bookkeeping")
        self.outage = worker.outage

    async def run(self) -> None:
        """Work until stopped (or, in burst mode, until the queues are empty)."""
        loop = asyncio.get_running_loop()
        self.worker.on_command = lambda payload: loop.call_soon_threadsafe(
            control.on_command, self, payload
        )
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, control.on_signal, self, signum)
        self.redis = async_client_for(self.settings)
        self.intake = Intake(self.redis, self.worker.queues, burst=self.burst)
        self.batcher = StreamBatcher(
            self.redis,
            outage=self.outage,
            tokens_per_entry=self.settings.tokens_per_entry,
            max_pending=self.settings.max_held_tokens,
        )
        self.leases = Leases(
            self.redis,
            self.outage,
            ttl=self.settings.lease_ttl,
            takeover_after=self.settings.takeover_after,
        )
        self.models = ChatModels(self.settings, connections=self.concurrency)
        background = [
            asyncio.create_task(self.batcher.serve(), name="stream-batcher"),
            asyncio.create_task(self.lag.watch(), name="loop-lag"),
            asyncio.create_task(upkeep.heartbeats(self), name="heartbeats"),
            asyncio.create_task(upkeep.maintenance(self), name="maintenance"),
            asyncio.create_task(takeover.renew_leases(self), name="lease-renewals"),
            asyncio.create_task(takeover.take_over_lapsed(self), name="takeovers"),
        ]
        try:
            await self._take_jobs()
            while self.running or self._admissions:  # warm shutdown: the jobs in flight finish
                await asyncio.wait([*self._admissions, *(r.task for r in self.running.values())])
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await self.models.aclose()
            await self.redis.aclose()
            self._pool.shutdown(wait=True)
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(signum)

    async def bookkeep(self, function: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run blocking RQ bookkeeping in the pool, with this task's log context."""
        call = functools.partial(contextvars.copy_context().run, function, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._pool, call)

    async def _book(self, function: Callable[P, None], *args: P.args, **kwargs: P.kwargs) -> None:
        """`_sync`, tried again while Redis is away (up to the outage limit): a job's end must
        reach RQ's records. Each of these re-checks the job's status, so a retry is safe."""
        call = functools.partial(function, *args, **kwargs)
        await self.bookkeep(retry, self.outage, call)

    def redis_down(self, exc: BaseException) -> None:
        """Note that Redis is away (logged once per outage, by the outage)."""
        with contextlib.suppress(RedisUnavailableError):  # the loop never gives up
            self.outage.failed(exc)

    # Taking jobs.

    async def _take_jobs(self) -> None:
        while not self.stopping.is_set():
            if self.lag.overloaded:
                await _within(self.lag.calm(), DEQUEUE_WAIT)
                continue
            free = self.concurrency - self.busy
            if free <= 0:
                self._slot_freed.clear()
                await _within(self._slot_freed.wait(), DEQUEUE_WAIT)
                continue
            try:
                taken = await self.intake.take(min(free, DEQUEUE_BATCH), self.stopping)
            except Exception as exc:  # Redis is away, or the queue could not be read
                if is_down(exc):
                    self.redis_down(exc)
                else:
                    log.exception("worker.dequeue_failed")
                await _within(self.stopping.wait(), RETRY_DELAY)
                continue
            self.outage.ok()
            if not taken and self.burst and not self.busy:
                return
            for job_id, queue_key in taken:
                self.reserve()
                self.track(asyncio.create_task(self._admit(job_id, queue_key)))

    async def _admit(self, job_id: str, queue_key: str) -> None:
        """Fetch a job moved off its queue and start it, beside the loop's next dequeue."""
        try:
            taken = await self.bookkeep(self.worker.take_and_admit, job_id, queue_key)
        except Exception:
            log.exception("worker.take_failed", job_id=job_id)
            taken = None
        if taken is None:
            self.release()
        else:
            self.start(*taken)

    def reserve(self) -> None:
        """Take a slot for a job about to be admitted (or taken over)."""
        self.busy += 1

    def track(self, admission: asyncio.Task[None]) -> None:
        """Keep a job's admission task until it is done (a warm shutdown waits for it)."""
        self._admissions.add(admission)
        admission.add_done_callback(self._admissions.discard)

    def release(self) -> None:
        """Give back the slot of a job that did not start, or is over."""
        self.busy -= 1
        self._slot_freed.set()

    def start(
        self, job: RelayJob, queue: Queue, execution: Execution, claim: Claim | None = None
    ) -> None:
        run = JobRun(
            job, self.settings, self.batcher, self.models, worker=self.worker.name, claim=claim
        )
        task = asyncio.create_task(self._execute(run, queue, execution), name=f"job-{job.id}")
        self.running[job.id] = _Running(task, run, execution)

    # Running one job.

    async def _execute(self, run: JobRun, queue: Queue, execution: Execution) -> None:
        job = run.job
        entry = self.running[job.id]
        with structlog.contextvars.bound_contextvars(job_id=job.id, attempt=run.attempt):
            try:
                await self._perform(run, queue, execution, entry)
            except Exception:
                log.exception("worker.job_bookkeeping_failed")
            finally:
                del self.running[job.id]
                self.release()

    async def _perform(
        self, run: JobRun, queue: Queue, execution: Execution, entry: _Running
    ) -> None:
        job, worker = run.job, self.worker
        assert isinstance(job, RelayJob)
        timeout = None if job.timeout == -1 else (job.timeout or Queue.DEFAULT_TIMEOUT)
        timer = None
        if timeout is not None:
            message = f"the job ran longer than its timeout ({timeout} s)"
            stop = ErrorEntry("JobTimeoutException", message, True, run.attempt)
            loop = asyncio.get_running_loop()
            began = run.claim.started_at if run.claim and run.claim.started_at else time.time()
            left = max(timeout - (time.time() - began), 0.0)  # a job taken over has used some
            timer = loop.call_later(left, self.stop, job.id, "timeout", stop)
        try:
            result = await generate(run)
        except asyncio.CancelledError:
            await asyncio.shield(self._stopped(run, queue, execution, entry.reason))
            if entry.reason is None:
                raise  # not the worker's doing: the loop itself is going away
        except (StreamLostError, WriterFencedError):  # gone, or another run's now: not ours
            await asyncio.shield(self._book(worker.drop, job, execution))
        except StreamClosedError:  # ended elsewhere: a cancel
            await asyncio.shield(
                self._book(worker.finish_stopped, job, queue, execution, writer=_writer(run))
            )
        except RedisUnavailableError:  # past the outage limit: left to a takeover
            log.error("worker.job_left_to_takeover")
        except Exception as exc:
            failure = (type(exc), exc, exc.__traceback__)
            finish = self._book(
                worker.finish_failed, job, queue, execution, failure, writer=_writer(run)
            )
            await asyncio.shield(finish)
        else:
            finish = self._book(
                worker.finish_ok, job, queue, execution, result, writer=_writer(run)
            )
            await asyncio.shield(finish)
        finally:
            if timer is not None:
                timer.cancel()

    async def _stopped(
        self, run: JobRun, queue: Queue, execution: Execution, reason: str | None
    ) -> None:
        """RQ's record of a job the worker stopped, by why it stopped it."""
        job, worker = run.job, self.worker
        if reason in ("stopped", "closed"):
            await self._book(worker.finish_stopped, job, queue, execution, writer=_writer(run))
        elif reason in ("lost", "fenced", "gone"):
            await self._book(worker.drop, job, execution)
        else:
            assert run.stop is not None or reason is None
            error: BaseException = (
                JobTimeoutException(run.stop.message)
                if reason == "timeout" and run.stop is not None
                else WorkerShutdownError("the worker stopped while running the job")
            )
            failure = (type(error), error, None)
            await self._book(
                worker.finish_failed, job, queue, execution, failure, writer=_writer(run)
            )

    def stop(self, job_id: str, reason: str, entry: ErrorEntry | None) -> None:
        """Stop one running job, the stream to end with `entry` (on the loop's thread)."""
        running = self.running.get(job_id)
        if running is None or running.task.done() or running.reason is not None:
            return
        running.reason = reason
        running.run.stop = entry
        running.task.cancel()
        log.info("job.stopping", job_id=job_id, reason=reason)


def _writer(run: JobRun) -> str | None:
    """The run's writer token once its stream began (None before: no stream to own yet)."""
    stream = run.stream
    return stream.writer_token if stream is not None and stream.begun else None


async def _within(awaitable: Any, seconds: float) -> bool:
    """Await it for at most `seconds`; whether it finished."""
    try:
        await asyncio.wait_for(awaitable, seconds)
    except TimeoutError:
        return False
    return True
