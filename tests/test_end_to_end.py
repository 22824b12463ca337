"""End to end: a prompt submitted, a worker process streaming it, readers following it."""

from __future__ import annotations

from conftest import ScriptedLLM, Workers

from tokenrelay import EndEntry, Relay, StartEntry, TokenEntry


def test_a_submitted_prompt_streams_its_scripted_text(
    relay: Relay, llm: ScriptedLLM, workers: Workers
) -> None:
    """A burst worker runs the job and the stream holds start, the tokens in order, and end."""
    model = llm.script(["Hello", ",", " world", "!"])
    handle = relay.submit("Say hello", model=model)
    workers.run_burst()
    entries = [entry for _, entry in handle.records(timeout=10)]
    assert isinstance(entries[0], StartEntry)
    assert entries[0].model == model
    assert [e.text for e in entries if isinstance(e, TokenEntry)] == ["Hello", ",", " world", "!"]
    assert isinstance(entries[-1], EndEntry)
    assert entries[-1].finish_reason == "stop"
    assert handle.text(timeout=10) == "Hello, world!"
