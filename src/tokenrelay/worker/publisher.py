"""The LangChain callback handler that publishes every token into the job's stream."""

from __future__ import annotations

from typing import Any
from uuid import UUID

import structlog
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.outputs import ChatGenerationChunk, GenerationChunk

from tokenrelay.stream.writer import StreamWriter

log = structlog.get_logger()


class TokenPublisher(BaseCallbackHandler):
    """Publishes each new token as it is generated, up to `limit` tokens.

    `raise_error` makes LangChain re-raise what this handler raises, so a token
    that could not be written fails the job instead of vanishing.
    """

    raise_error = True

    def __init__(self, writer: StreamWriter, limit: int, started: float) -> None:
        self.writer = writer
        self.limit = limit
        self.started = started
        self.over_limit = False

    def on_llm_new_token(
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
        if self.writer.tokens >= self.limit:
            self.over_limit = True
            return
        self.writer.token(token)
        if self.writer.tokens == 1 and self.writer.first_token_at is not None:
            ttft_ms = (self.writer.first_token_at - self.started) * 1000
            log.info("job.first_token", ttft_ms=round(ttft_ms, 3))
