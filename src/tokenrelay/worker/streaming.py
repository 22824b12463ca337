"""Streaming a chat model through LangChain's callbacks, in memory that does not grow per token.

`BaseChatModel.astream()` keeps every chunk object it yields (a few kilobytes each) to build
the final message for `on_llm_end`: 338 MB for a 100,000-token answer. This does what it does
for a plain chat-model stream (the run's start, a callback per token, its end or error) but
keeps only the text, so a generation costs its text and no more.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from langchain_core.callbacks import (
    AsyncCallbackHandler,
    AsyncCallbackManager,
    AsyncCallbackManagerForLLMRun,
    BaseCallbackHandler,
)
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, LLMResult

from tokenrelay.stream.text import TextBuffer

#: The longest a stream reads chunks without letting the loop run other tasks, in seconds. A
#: fast model's chunks arrive buffered, and reading a buffered chunk never waits: one busy
#: stream would otherwise hold the loop until its buffer ran dry.
TURN = 0.002


@dataclass
class StreamedAnswer:
    """What the model sent: its text, how it finished, and its usage, if any."""

    answer: TextBuffer = field(default_factory=TextBuffer)
    finish_reason: str | None = None
    usage: dict[str, int] | None = None

    def add(self, text: str) -> None:
        """Keep one more piece of the text."""
        self.answer.add(text)

    @property
    def text(self) -> str:
        """The text so far."""
        return str(self.answer)

    def message(self) -> AIMessage:
        """The whole answer as one message, for the run's `on_llm_end`."""
        metadata = {"finish_reason": self.finish_reason} if self.finish_reason else {}
        return AIMessage(content=self.text, response_metadata=metadata, usage_metadata=self.usage)


async def stream_chat(
    llm: BaseChatModel,
    messages: Sequence[BaseMessage],
    callbacks: Sequence[BaseCallbackHandler],
    *,
    enough: Callable[[], bool] = lambda: False,
) -> StreamedAnswer:
    """Stream the model's answer, calling `callbacks` as `llm.astream` would; what it sent.

    Stops reading (and closes the HTTP stream) as soon as `enough()` is true after a token:
    a token limit the server ignored. Cancelling it cancels the request.
    """
    params = llm._get_invocation_params()  # what LangChain's own astream reports
    manager = AsyncCallbackManager.configure(
        list(callbacks), llm.callbacks, llm.verbose, None, llm.tags, None, llm.metadata
    )
    (run,) = await manager.on_chat_model_start(
        llm._serialized, [list(messages)], invocation_params=params, batch_size=1
    )
    answer, result = StreamedAnswer(), LLMResult(generations=[[]])
    new_token = _token_event(run)
    loop = asyncio.get_running_loop()
    turn_ends = loop.time() + TURN
    chunks: Any = llm._astream(list(messages))  # an async generator: closing it ends the request
    try:
        async for chunk in chunks:
            if loop.time() >= turn_ends:  # let the other generations and the writer run
                await asyncio.sleep(0)
                turn_ends = loop.time() + TURN
            message: Any = chunk.message
            await new_token(message.content, chunk=chunk)
            # `astream()` merges generation_info into the message's metadata; _astream does not.
            info = chunk.generation_info or message.response_metadata
            reason = info.get("finish_reason")
            answer.finish_reason = str(reason) if reason else answer.finish_reason
            if message.usage_metadata:
                answer.usage = dict(message.usage_metadata)
            if chunk.text:
                answer.add(chunk.text)
            if enough():
                break
    except BaseException as exc:
        await run.on_llm_error(exc, response=result)
        raise
    finally:
        await chunks.aclose()
    result.generations[0].append(ChatGeneration(message=answer.message()))
    await run.on_llm_end(result)
    return answer


def _token_event(run: AsyncCallbackManagerForLLMRun) -> Callable[..., Awaitable[None]]:
    """How each token reaches the run's handlers.

    When every handler is an async one that LangChain would await in place and let raise
    (`run_inline`, `raise_error`: the token publisher), they are called directly: LangChain's
    dispatch adds an `asyncio.gather` of nothing per token. Any other handler (a tracer, a
    sync one) gets the run's own dispatch, exactly as `astream` gives it.
    """
    handlers = [h for h in run.handlers if not h.ignore_llm]
    if not all(
        isinstance(h, AsyncCallbackHandler) and h.run_inline and h.raise_error for h in handlers
    ):
        return run.on_llm_new_token
    run_id, parent, tags = run.run_id, run.parent_run_id, run.tags

    async def direct(token: str, *, chunk: Any) -> None:
        for handler in handlers:
            await handler.on_llm_new_token(
                token, chunk=chunk, run_id=run_id, parent_run_id=parent, tags=tags
            )

    return direct
