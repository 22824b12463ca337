"""What an operator tells a worker: RQ's commands (stop a job, shut down) and signals.

The first SIGINT or SIGTERM (or RQ's shutdown command) stops taking jobs and lets the running
ones finish (warm shutdown); a second one stops them all at once, each stream ending with a
`WorkerShutdown` error (cold). Both run on the loop's thread.
"""

from __future__ import annotations

import signal
from typing import TYPE_CHECKING, Any

import structlog

from tokenrelay.stream.protocol import ErrorEntry

if TYPE_CHECKING:
    from tokenrelay.worker.loop import WorkerLoop

log = structlog.get_logger()


def on_command(loop: WorkerLoop, payload: dict[str, Any]) -> None:
    """A command from RQ's pubsub."""
    command = payload.get("command")
    if command == "stop-job":
        _stop_requested(loop, str(payload.get("job_id")))
    elif command == "stop-execution":
        for job_id, running in list(loop.running.items()):
            if running.execution is not None and running.execution.id == payload.get(
                "execution_id"
            ):
                _stop_requested(loop, job_id)
    elif command == "shutdown":
        on_signal(loop, signal.SIGTERM)
    else:
        log.info("worker.command_ignored", command=command)


def _stop_requested(loop: WorkerLoop, job_id: str) -> None:
    running = loop.running.get(job_id)
    attempt = running.run.attempt if running else 1
    loop.stop(
        job_id,
        "stopped",
        ErrorEntry("JobStopped", "the job was stopped on request", False, attempt),
    )


def on_signal(loop: WorkerLoop, signum: int) -> None:
    """SIGINT or SIGTERM: the first a warm shutdown, the second a cold one."""
    name = signal.Signals(signum).name
    if not loop.stopping.is_set():
        loop.stopping.set()
        log.info("worker.warm_shutdown", signal=name, in_flight=len(loop.running))
        return
    if loop.cold:
        return
    loop.cold = True
    log.warning("worker.cold_shutdown", signal=name, in_flight=len(loop.running))
    for job_id, running in list(loop.running.items()):
        message = "the worker was shut down while running the job"
        loop.stop(
            job_id, "shutdown", ErrorEntry("WorkerShutdown", message, True, running.run.attempt)
        )
