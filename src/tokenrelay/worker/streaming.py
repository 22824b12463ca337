"""Streaming a chat model through LangChain's callbacks, in memory that does not grow per token.

`BaseChatModel.stream()` keeps every chunk object it yields (a few kilobytes each) to build
the final message for `on_llm_end`: 338 MB for a 100,000-token answer. This does what it
does for a plain chat-model stream (the run's start, a callback per token, its end or
error) but keeps only the text, so a generation costs its text and no more.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any

from langchain_core.callbacks import BaseCallbackHandler, CallbackManager
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, LLMResult

#: Text pieces are joined into one string every this many, so that an answer costs its text
#: and not a Python object per token.
_JOIN_EVERY = 256


@dataclass
class StreamedAnswer:
    """What the model sent: its text, how it finished, and its usage, if any."""

    parts: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    usage: dict[str, int] | None = None

    def add(self, text: str) -> None:
        """Keep one more piece of the text."""
        self.parts.append(text)
        if len(self.parts) >= _JOIN_EVERY:
            self.parts[:] = ["".join(self.parts)]

    @property
    def text(self) -> str:
        """The text so far."""
        return "".join(self.parts)

    def message(self) -> AIMessage:
        """The whole answer as one message, for the run's `on_llm_end`."""
        metadata = {"finish_reason": self.finish_reason} if self.finish_reason else {}
        return AIMessage(
            content=self.text,
            response_metadata=metadata,
            usage_metadata=self.usage,
        )


def stream_chat(
    llm: BaseChatModel,
    messages: Sequence[BaseMessage],
    callbacks: Sequence[BaseCallbackHandler],
    answer: StreamedAnswer,
) -> Generator[str, None, None]:
    """Yield each text delta of the model's answer, calling `callbacks` as `llm.stream` would.

    Fills `answer` as it goes. Closing the iterator early (a token limit) ends the HTTP
    stream and the run (`on_llm_end` with the text so far).
    """
    params = llm._get_invocation_params()
    manager = CallbackManager.configure(
        list(callbacks), llm.callbacks, llm.verbose, None, llm.tags, None, llm.metadata
    )
    (run,) = manager.on_chat_model_start(
        llm._serialized,
        [list(messages)],
        invocation_params=params,
        batch_size=1,
    )
    ended = LLMResult(generations=[[]])
    try:
        chunks: Any = llm._stream(list(messages))  # a generator: closing it ends the HTTP stream
        with closing(chunks):
            for chunk in chunks:
                message: Any = chunk.message
                run.on_llm_new_token(message.content, chunk=chunk)
                # `stream()` merges generation_info into the message's metadata; _stream does not.
                info = chunk.generation_info or message.response_metadata
                reason = info.get("finish_reason")
                answer.finish_reason = str(reason) if reason else answer.finish_reason
                if message.usage_metadata:
                    answer.usage = dict(message.usage_metadata)
                if chunk.text:
                    answer.add(chunk.text)
                    yield chunk.text
    except GeneratorExit:  # the caller stopped reading (a token limit): the run ends here
        ended.generations[0].append(ChatGeneration(message=answer.message()))
        run.on_llm_end(ended)
        raise
    except BaseException as exc:
        run.on_llm_error(exc, response=ended)
        raise
    ended.generations[0].append(ChatGeneration(message=answer.message()))
    run.on_llm_end(ended)
