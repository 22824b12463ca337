"""Logs: no format prints a prompt, a completion or local variables, whatever is installed."""

from __future__ import annotations

import importlib.util
import io

import pytest
import structlog
from support.scripts import ScriptedLLM
from support.workers import Workers

from tokenrelay import Relay
from tokenrelay.logs import configure


def test_rich_is_installed_so_these_tests_mean_something() -> None:
    """structlog prints locals in tracebacks only with `rich` present: the tests need it."""
    assert importlib.util.find_spec("rich") is not None


def test_the_console_format_prints_tracebacks_without_local_variables() -> None:
    """An exception logged in console format shows its traceback, not the frames' locals."""
    out = io.StringIO()
    configure("console", "info", stream=out)

    def fail(prompt: str) -> None:
        secret = prompt.upper()
        raise ValueError(f"{len(secret)} characters")

    try:
        fail("tpmorp laitnedifnoc eht"[::-1])  # spelled so that the quoted source lines hide it
    except ValueError:
        structlog.get_logger().exception("job.failed")
    text = out.getvalue()
    assert "Traceback" in text
    assert "ValueError: 23 characters" in text
    assert "confidential" not in text.lower()


@pytest.mark.parametrize("log_format", ["console", "json"])
def test_a_failed_job_leaves_its_prompt_out_of_the_log(
    log_format: str, relay: Relay, llm: ScriptedLLM, workers: Workers
) -> None:
    """A worker logging as text (with `rich` installed) or as JSON writes no part of the prompt."""
    relay.submit("a confidential prompt", model=llm.script(status=500))
    worker = workers.run_burst(env={"TOKENRELAY_LOG_FORMAT": log_format})
    text = worker.log_path.read_text()
    assert "job.failed" in text
    assert "confidential" not in text
