"""The scripted OpenAI server, exercised through the real ChatOpenAI client over HTTP."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from functools import reduce
from operator import add
from typing import Any

import httpx
import httpx2
import openai
import pytest
from langchain_core.messages import AIMessageChunk
from langchain_openai import ChatOpenAI
from pydantic import SecretStr
from support.scripted_openai import Script, ScriptedOpenAI

PROMPT = [("system", "You are terse."), ("user", "say hello to the world")]
PROMPT_WORDS = 8


@pytest.fixture
def server() -> Iterator[ScriptedOpenAI]:
    with ScriptedOpenAI() as running:
        yield running


def chat(server: ScriptedOpenAI, model: str, **kwargs: Any) -> ChatOpenAI:
    return ChatOpenAI(
        model=model,
        base_url=server.base_url,
        api_key=SecretStr("test-key"),
        streaming=True,
        max_retries=0,
        stream_usage=True,
        **kwargs,
    )


def stream(server: ScriptedOpenAI, model: str, **kwargs: Any) -> list[AIMessageChunk]:
    chunks = list(chat(server, model, **kwargs).stream(PROMPT))
    assert all(isinstance(chunk, AIMessageChunk) for chunk in chunks)
    return [chunk for chunk in chunks if isinstance(chunk, AIMessageChunk)]


def text_of(chunks: list[AIMessageChunk]) -> list[str]:
    return [str(chunk.content) for chunk in chunks if chunk.content]


def finish_reasons(chunks: list[AIMessageChunk]) -> list[Any]:
    return [
        c.response_metadata["finish_reason"]
        for c in chunks
        if "finish_reason" in c.response_metadata
    ]


def cause_chain(error: BaseException) -> list[type[BaseException]]:
    chain: list[type[BaseException]] = []
    current: BaseException | None = error
    while current is not None:
        chain.append(type(current))
        current = current.__cause__
    return chain


def test_tokens_arrive_in_order_with_stop_and_usage(server: ScriptedOpenAI) -> None:
    """Scripted tokens stream in order, then finish_reason "stop" and the token usage."""
    server.add("m", Script(tokens=["Hello", ",", " world", "!"]))

    chunks = stream(server, "m")
    message = reduce(add, chunks)

    assert text_of(chunks) == ["Hello", ",", " world", "!"]
    assert message.content == "Hello, world!"
    assert message.response_metadata["finish_reason"] == "stop"
    assert message.usage_metadata is not None
    assert message.usage_metadata["input_tokens"] == PROMPT_WORDS
    assert message.usage_metadata["output_tokens"] == 4
    assert message.usage_metadata["total_tokens"] == PROMPT_WORDS + 4


def test_multibyte_emoji_and_newline_tokens_arrive_identical(server: ScriptedOpenAI) -> None:
    """Non-ASCII, emoji, newline and lone-surrogate tokens arrive exactly as scripted."""
    tokens = ["naïve", " 日本語", " 🙂👍🏽", "\n", "line\r\ntwo\t", "\ud800", ""]
    server.add("m", Script(tokens=tokens))

    chunks = stream(server, "m")

    assert text_of(chunks) == [token for token in tokens if token]
    assert reduce(add, chunks).content == "".join(tokens)


def test_legacy_max_tokens_caps_the_reply(server: ScriptedOpenAI) -> None:
    """A `max_tokens` request field cuts the reply to that many tokens with finish "length"."""
    server.add("m", Script(tokens=["a", "b", "c", "d", "e"]))

    chunks = stream(server, "m", extra_body={"max_tokens": 3})
    message = reduce(add, chunks)

    assert message.content == "abc"
    assert message.response_metadata["finish_reason"] == "length"
    assert message.usage_metadata is not None
    assert message.usage_metadata["output_tokens"] == 3


def test_max_completion_tokens_is_ignored_by_default(server: ScriptedOpenAI) -> None:
    """ChatOpenAI's max_tokens goes out as max_completion_tokens, which is not honoured."""
    server.add("m", Script(tokens=["a", "b", "c", "d", "e"]))

    message = reduce(add, stream(server, "m", max_tokens=3))

    assert server.requests[0]["max_completion_tokens"] == 3
    assert "max_tokens" not in server.requests[0]
    assert message.content == "abcde"
    assert message.response_metadata["finish_reason"] == "stop"


def test_max_completion_tokens_caps_when_honoured(server: ScriptedOpenAI) -> None:
    """A script that honours max_completion_tokens caps the reply like an OpenAI server."""
    server.add("m", Script(tokens=["a", "b", "c", "d"], honor=frozenset({"max_completion_tokens"})))

    message = reduce(add, stream(server, "m", max_tokens=2))

    assert message.content == "ab"
    assert message.response_metadata["finish_reason"] == "length"


def test_error_status_raises_internal_server_error(server: ScriptedOpenAI) -> None:
    """A script with status 500 makes the client raise openai.InternalServerError."""
    server.add("m", Script(tokens=["never"], status=500))

    with pytest.raises(openai.InternalServerError, match="scripted failure"):
        stream(server, "m")


def test_cut_stream_ends_without_finish_reason(server: ScriptedOpenAI) -> None:
    """A "cut" stream ends iteration normally, with the tokens but no finish_reason or usage."""
    server.add("m", Script(tokens=["a", "b"], fault="cut"))

    chunks = stream(server, "m")

    assert text_of(chunks) == ["a", "b"]
    assert finish_reasons(chunks) == []
    assert all(chunk.usage_metadata is None for chunk in chunks)


def test_no_finish_reason_script_still_completes(server: ScriptedOpenAI) -> None:
    """finish_reason=None streams the tokens and usage but never a finish_reason."""
    server.add("m", Script(tokens=["a", "b"], finish_reason=None))

    chunks = stream(server, "m")

    assert text_of(chunks) == ["a", "b"]
    assert finish_reasons(chunks) == []
    assert reduce(add, chunks).usage_metadata is not None


def test_dropped_stream_raises_connection_error(server: ScriptedOpenAI) -> None:
    """A "drop" stream raises APIConnectionError caused by httpx2's RemoteProtocolError."""
    server.add("m", Script(tokens=["a", "b"], fault="drop"))
    received: list[str] = []

    with pytest.raises(openai.APIConnectionError) as caught:
        received.extend(str(chunk.content) for chunk in chat(server, "m").stream(PROMPT))

    assert "".join(received) == "ab"
    assert httpx2.RemoteProtocolError in cause_chain(caught.value)


def test_stall_blocks_until_release(server: ScriptedOpenAI) -> None:
    """A stream stalls after `stall_after` tokens and sends the rest only after release()."""
    server.add("m", Script(tokens=["a", "b", "c", "d"], stall_after=2))
    tokens: queue.Queue[str] = queue.Queue()
    errors: list[BaseException] = []

    def consume() -> None:
        try:
            for chunk in chat(server, "m").stream(PROMPT):
                if chunk.content:
                    tokens.put(str(chunk.content))
        except BaseException as error:
            errors.append(error)

    consumer = threading.Thread(target=consume)
    consumer.start()
    assert server.wait_stalled(timeout=30)
    assert [tokens.get(timeout=30), tokens.get(timeout=30)] == ["a", "b"]
    assert consumer.is_alive()
    assert tokens.empty()

    server.release()
    consumer.join(timeout=30)

    assert not consumer.is_alive()
    assert errors == []
    assert [tokens.get_nowait(), tokens.get_nowait()] == ["c", "d"]


def test_stop_ends_a_stalled_stream(server: ScriptedOpenAI) -> None:
    """stop() returns while a stream is stalled, and the client's stream ends."""
    server.add("m", Script(tokens=["a", "b"], stall_after=0, token_delay=3600))
    outcome: list[object] = []

    def consume() -> None:
        try:
            outcome.append(len(stream(server, "m")))
        except openai.APIConnectionError as error:
            outcome.append(error)

    consumer = threading.Thread(target=consume)
    consumer.start()
    assert server.wait_stalled(timeout=30)
    server.stop()
    consumer.join(timeout=30)

    assert not consumer.is_alive()
    assert len(outcome) == 1


def test_unknown_model_raises_not_found(server: ScriptedOpenAI) -> None:
    """A request for a model with no script makes the client raise openai.NotFoundError."""
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        stream(server, "missing")


def test_requests_are_recorded(server: ScriptedOpenAI) -> None:
    """Each chat-completion body the server receives is recorded, in order."""
    server.add("m", Script(tokens=["a"]))
    server.add("n", Script(tokens=["b"]))

    stream(server, "m")
    stream(server, "n", temperature=0.5)

    first, second = server.requests
    assert first["model"] == "m"
    assert first["stream"] is True
    assert first["stream_options"] == {"include_usage": True}
    assert first["messages"] == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "say hello to the world"},
    ]
    assert second["model"] == "n"
    assert second["temperature"] == 0.5


def test_non_streaming_request_gets_a_completion(server: ScriptedOpenAI) -> None:
    """Without stream=true the server returns one chat.completion with text and usage."""
    server.add("m", Script(tokens=["Hi", " there"]))
    model = ChatOpenAI(
        model="m", base_url=server.base_url, api_key=SecretStr("test-key"), max_retries=0
    )

    message = model.invoke(PROMPT)

    assert message.content == "Hi there"
    assert message.response_metadata["finish_reason"] == "stop"
    assert message.usage_metadata is not None
    assert message.usage_metadata["output_tokens"] == 2


def test_models_endpoint_lists_scripted_models() -> None:
    """GET /v1/models lists every scripted model, so it can serve as a readiness check."""
    with ScriptedOpenAI({"a": Script(tokens=[]), "b": Script(tokens=[])}) as server:
        response = httpx.get(f"{server.base_url}/models")

    assert response.status_code == 200
    assert response.json()["object"] == "list"
    assert [entry["id"] for entry in response.json()["data"]] == ["a", "b"]
