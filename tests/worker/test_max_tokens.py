"""max_tokens holds whatever the server: OpenAI's parameter, llama.cpp's, or neither."""

from __future__ import annotations

from support.scripted_openai import ScriptedOpenAI
from support.scripts import ScriptedLLM
from support.workers import Workers

from tokenrelay import EndEntry, Relay

TEN = [f" t{i}" for i in range(10)]


def last_request(server: ScriptedOpenAI, model: str) -> dict[str, object]:
    """The body of the last request the scripted server got for `model`."""
    return next(r for r in reversed(server.requests) if r["model"] == model)


def test_a_server_that_honours_only_legacy_max_tokens_stops_at_the_limit(
    relay: Relay, llm: ScriptedLLM, workers: Workers, llm_server: ScriptedOpenAI
) -> None:
    """Like llama.cpp's server, it ignores max_completion_tokens; the legacy field is sent too."""
    model = llm.script(TEN)  # honours only `max_tokens`
    handle = relay.submit("count", model=model, max_tokens=3)
    workers.run_burst()
    result = handle.result(timeout=10)
    assert result.text == "".join(TEN[:3])
    assert (result.end.finish_reason, result.end.tokens, result.end.completion_tokens) == (
        "length",
        3,
        3,
    )
    body = last_request(llm_server, model)
    assert body["max_tokens"] == 3
    assert body["max_completion_tokens"] == 3


def test_a_server_that_ignores_every_limit_is_stopped_by_the_worker(
    relay: Relay, llm: ScriptedLLM, workers: Workers
) -> None:
    """If the server streams past the limit anyway, the worker stops reading at max_tokens."""
    handle = relay.submit("count", model=llm.script(TEN, honor=frozenset()), max_tokens=4)
    workers.run_burst()
    result = handle.result(timeout=10)
    assert result.text == "".join(TEN[:4])
    assert (result.end.finish_reason, result.end.tokens) == ("length", 4)


def test_openai_proper_gets_only_max_completion_tokens(
    relay: Relay, llm: ScriptedLLM, workers: Workers, llm_server: ScriptedOpenAI
) -> None:
    """With the OpenAI-style setting, the deprecated max_tokens field is not sent at all."""
    model = llm.script(TEN, honor=frozenset({"max_completion_tokens"}))
    handle = relay.submit("count", model=model, max_tokens=2)
    workers.run_burst(env={"TOKENRELAY_MAX_TOKENS_PARAM": "max_completion_tokens"})
    assert handle.text(timeout=10) == "".join(TEN[:2])
    body = last_request(llm_server, model)
    assert "max_tokens" not in body
    assert body["max_completion_tokens"] == 2


def test_the_worker_default_applies_when_the_request_sets_no_limit(
    relay: Relay, llm: ScriptedLLM, workers: Workers
) -> None:
    """TOKENRELAY_MAX_TOKENS on the worker caps requests that do not choose a limit."""
    handle = relay.submit("count", model=llm.script(TEN))
    workers.run_burst(env={"TOKENRELAY_MAX_TOKENS": "5"})
    end = handle.result(timeout=10).end
    assert isinstance(end, EndEntry)
    assert end.tokens == 5
