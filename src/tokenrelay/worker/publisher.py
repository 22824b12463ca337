"""The LangChain callback handler that publishes every token into the job's stream."""

from __future__ import annotations

from typing import Any
from uuid import UUID

import structlog
from langchain_core.callbacks import AsyncCallbackHandler
from langchain_core.outputs import ChatGenerationChunk, GenerationChunk

from tokenrelay.errors import BacklogError
from tokenrelay.stream.batched import BatchedStream
from tokenrelay.worker.continuation import Seam
from tokenrelay.worker.watchdog import Watchdog

log = structlog.get_logger()


class TokenPublisher(AsyncCallbackHandler):
    """Hands each new token to the job's stream as it is generated, up to `limit` tokens.

    Attach it to any LangChain runnable's callbacks, and what its chat model streams reaches
    the readers. A token costs a list append: the stream's batcher does the writing. Only
    when Redis falls far behind does a token wait (`BatchedStream.backlogged`); if Redis is
    away meanwhile, the attempt ends instead (BacklogError), to be continued once it is back.
    Each token tells the attempt's `watchdog` that the model is alive, and a continuation's
    first tokens pass through its `seam`, which drops a passage the model repeated.

    `raise_error` makes LangChain re-raise what this handler raises, so a token that cannot
    be written (the job was cancelled, another writer took over) stops the generation
    instead of vanishing; `run_inline` has it awaited in place, not gathered per token.
    """

    raise_error = True
    run_inline = True

    def __init__(
        self,
        stream: BatchedStream,
        *,
        limit: int,
        started: float,
        watchdog: Watchdog | None = None,
        seam: Seam | None = None,
    ) -> None:
        self.stream = stream
        self.limit = limit
        self.started = started
        self.watchdog = watchdog
        self.seam = seam
        self.over_limit = False

    async def on_llm_new_token(
        self,
        token: str | list[str | dict[str, Any]],
        *,
        chunk: GenerationChunk | ChatGenerationChunk | None = None,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        """Publish one token; past the limit, only note that the server ignored it."""
        if not isinstance(token, str):  # content blocks; chat completions send plain strings
            token = "".join(p if isinstance(p, str) else str(p.get("text", "")) for p in token)
        if not token:
            return
        if self.watchdog is not None:
            self.watchdog.alive()
        if self.seam is None or self.seam.open:
            self._publish(token)
        else:
            for part in self.seam.feed(token):
                self._publish(part)
        stream = self.stream
        if stream.backlogged:
            if stream.outage:
                raise BacklogError(
                    f"Redis is away and {stream.backlog:,} tokens are held back for it: "
                    "the attempt ends here, to go on once Redis is back"
                )
            await stream.drain()

    def flush(self) -> None:
        """Publish what the seam still holds (the attempt is over)."""
        if self.seam is not None:
            for part in self.seam.flush():
                self._publish(part)

    def _publish(self, token: str) -> None:
        stream = self.stream
        if stream.tokens >= self.limit:
            self.over_limit = True
            return
        first = stream.first_token_at is None
        stream.add(token)
        if first and stream.first_token_at is not None:
            log.info(
                "job.first_token", ttft_ms=round((stream.first_token_at - self.started) * 1000, 3)
            )
