"""Streaming a chat model through LangChain callbacks: every handler gets every token, once.

The real `ChatOpenAI` over real HTTP to the scripted server, driven by `stream_chat` as the
worker drives it.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from langchain_core.callbacks import AsyncCallbackHandler, BaseCallbackHandler
from langchain_core.messages import HumanMessage
from langchain_openai import ChatOpenAI
from support.scripted_openai import ScriptedOpenAI
from support.scripts import ScriptedLLM

from tokenrelay.worker.streaming import stream_chat

WORDS = ["Hello", ",", " world", "!"]


class Inline(AsyncCallbackHandler):
    """Like the token publisher: awaited in place, its errors raised."""

    raise_error = True
    run_inline = True

    def __init__(self, fail_at: str | None = None) -> None:
        self.tokens: list[str] = []
        self.fail_at = fail_at

    async def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        if token == self.fail_at:
            raise RuntimeError(f"refused {token!r}")
        if token:
            self.tokens.append(token)


class Recorder(BaseCallbackHandler):
    """A plain sync handler, as a tracer or a user's own handler would be."""

    def __init__(self) -> None:
        self.tokens: list[str] = []
        self.ended = 0

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        if token:
            self.tokens.append(token)

    def on_llm_end(self, response: Any, **kwargs: Any) -> None:
        self.ended += 1


def model(server: ScriptedOpenAI, name: str, **options: Any) -> ChatOpenAI:
    return ChatOpenAI(
        model=name,
        base_url=server.base_url,
        api_key="sk-x",
        streaming=True,
        **options,  # type: ignore[arg-type]  # pydantic takes a str for SecretStr
    )


def test_the_publisher_alone_gets_every_token_and_the_text_is_kept(
    llm: ScriptedLLM, llm_server: ScriptedOpenAI
) -> None:
    """With only inline handlers, each token reaches them in order, and the answer holds it."""
    inline = Inline()
    chat = model(llm_server, llm.script(WORDS))
    answer = asyncio.run(stream_chat(chat, [HumanMessage(content="hi")], [inline]))
    assert inline.tokens == WORDS
    assert (answer.text, answer.finish_reason) == ("Hello, world!", "stop")


def test_other_handlers_on_the_model_get_every_token_too(
    llm: ScriptedLLM, llm_server: ScriptedOpenAI
) -> None:
    """A sync handler on the model (a tracer) is served by LangChain's dispatch, as astream does."""
    inline, recorder = Inline(), Recorder()
    chat = model(llm_server, llm.script(WORDS), callbacks=[recorder])
    asyncio.run(stream_chat(chat, [HumanMessage(content="hi")], [inline]))
    assert inline.tokens == WORDS
    assert recorder.tokens == WORDS
    assert recorder.ended == 1


def test_a_publisher_that_refuses_a_token_stops_the_stream(
    llm: ScriptedLLM, llm_server: ScriptedOpenAI
) -> None:
    """A token that cannot be published fails the generation instead of vanishing."""
    inline = Inline(fail_at=" world")
    chat = model(llm_server, llm.script(WORDS))
    with pytest.raises(RuntimeError, match="refused ' world'"):
        asyncio.run(stream_chat(chat, [HumanMessage(content="hi")], [inline]))
    assert inline.tokens == ["Hello", ","]
