"""The ops page in a real Chromium: the operator's facts, live, behind an API key."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from playwright.sync_api import Page, expect
from support.gateway import API_KEY, GatewayProcess
from support.scripted_openai import ScriptedOpenAI
from support.scripts import ScriptedLLM
from support.workers import Workers

from tokenrelay import Relay

Snap = Callable[[Page, str], Path]


def test_the_ops_page_shows_queues_workers_and_jobs_in_flight_live(
    page: Page,
    snap: Snap,
    gateway: GatewayProcess,
    relay: Relay,
    llm: ScriptedLLM,
    workers: Workers,
    llm_server: ScriptedOpenAI,
) -> None:
    """With a key: queue depth, the worker and its job, the job in flight; then it updates."""
    running = relay.submit("x", model=llm.script(["a", "b", "c"], stall_after=2))
    workers.start("--name", "ops-worker", "--concurrency", "1")
    assert llm_server.wait_stalled(30)
    relay.submit_many(["q1", "q2"])
    page.goto(gateway.url + "/ops")
    page.fill("#api-key", API_KEY)
    page.click("#key-form button")
    expect(page.locator("#queues")).to_contain_text("tokenrelay2", timeout=30_000)
    expect(page.locator("#workers")).to_contain_text("ops-worker")
    expect(page.locator("#workers")).to_contain_text(running.job_id)
    expect(page.locator("#in-flight")).to_contain_text(running.job_id)
    snap(page, "ops")
    relay.job(running.job_id).cancel()
    expect(page.locator("#in-flight")).not_to_contain_text(running.job_id, timeout=30_000)
    llm_server.release()
