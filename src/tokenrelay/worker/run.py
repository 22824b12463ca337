"""One job as the worker runs it: everything its generation uses, passed explicitly."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import structlog
from rq.job import Job

from tokenrelay.settings import Settings
from tokenrelay.stream.batched import BatchedStream
from tokenrelay.stream.batcher import StreamBatcher
from tokenrelay.stream.lease_scripts import Claim
from tokenrelay.stream.protocol import ErrorEntry
from tokenrelay.worker.llm import ChatModels
from tokenrelay.worker.streaming import StreamedAnswer


@dataclass
class JobRun:
    """One job as its generation runs it, with everything it needs, passed explicitly."""

    job: Job
    settings: Settings
    batcher: StreamBatcher
    models: ChatModels
    worker: str
    #: The job taken over from a dead worker: its new writer and where it stands.
    claim: Claim | None = None
    #: Why the worker stopped the job, set before it cancels the task: the error entry to end with.
    stop: ErrorEntry | None = None
    #: The job's stream, once the generation has it (the worker renews its lease).
    stream: BatchedStream | None = None
    #: The attempt running now, from 1 (`begin_attempt` moves it on).
    attempt: int = 1
    nonce: str = field(default_factory=lambda: uuid.uuid4().hex)

    def begin_attempt(self, attempt: int) -> None:
        """Make `attempt` the current one, for the stream and for every log line from here."""
        self.attempt = attempt
        structlog.contextvars.bind_contextvars(attempt=attempt)


@dataclass
class Usage:
    """Token usage summed over attempts; an attempt with no report counts what it streamed."""

    prompt: int = 0
    completion: int = 0
    reported: bool = False

    def add(self, answer: StreamedAnswer | None, streamed: int) -> None:
        usage = answer.usage if answer is not None else None
        if usage:
            self.reported = True
            self.prompt += int(usage.get("input_tokens", 0))
            self.completion += int(usage.get("output_tokens", streamed))
        else:
            self.completion += streamed
