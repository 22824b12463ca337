"""`tokenrelay status`: the operator's view of a known state."""

from __future__ import annotations

import json
import subprocess
import sys

from redis import Redis
from support.scripts import ScriptedLLM
from support.streams import redis_major, wait_for_tokens
from support.workers import Workers

from tokenrelay import Relay
from tokenrelay.consumer.group import GroupConsumer
from tokenrelay.status import collect_status, render


def status_json(env: dict[str, str]) -> dict[str, object]:
    """The output of `tokenrelay status --json`."""
    done = subprocess.run(
        [sys.executable, "-m", "tokenrelay", "status", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    loaded: dict[str, object] = json.loads(done.stdout)
    return loaded


def test_status_json_reports_queues_workers_jobs_failures_and_lag(
    env: dict[str, str], relay: Relay, llm: ScriptedLLM, workers: Workers, redis_client: Redis
) -> None:
    """A failed job, a job streaming on a worker, two queued, and a consumer behind by six."""
    failed = relay.submit("fails", model=llm.script(status=500))
    workers.run_burst()
    GroupConsumer(redis_client, "recorder", "r").ensure_group()
    running = relay.submit("runs", model=llm.script(["a", "b", "c", "d"], stall_after=3))
    worker = workers.start("--name", "w-1", "--concurrency", "1")  # the next jobs wait
    wait_for_tokens(running, 3)
    queued = relay.submit_many(["q1", "q2"])
    status = status_json(env)
    assert status["queues"] == {"tokenrelay": 2}
    [live] = [w for w in status["workers"] if w["name"] == "w-1"]  # type: ignore[attr-defined]
    assert live["state"] == "busy"
    assert live["jobs"] == [running.job_id]
    [flight] = status["in_flight"]  # type: ignore[misc]
    assert flight["job_id"] == running.job_id
    assert flight["tokens"] == 3
    assert flight["worker"] == "w-1"
    assert flight["age_s"] >= 0
    [failure] = status["recent_failures"]  # type: ignore[misc]
    assert (failure["job_id"], failure["error_type"]) == (failed.job_id, "OpenAIAPIError")
    [consumer] = status["consumers"]  # type: ignore[misc]
    # failed: submitted, started, failed; running: submitted, started; queued: two submitted
    lag = 7 if redis_major(redis_client) >= 7 else None  # Redis 6 cannot count lag
    assert (consumer["group"], consumer["lag"], consumer["pending"]) == ("recorder", lag, 0)
    assert worker.process.poll() is None
    assert len(queued) == 2


def test_the_status_screen_names_every_section(relay: Relay, redis_client: Redis) -> None:
    """The text view shows queues, workers, jobs in flight, failures and consumers."""
    relay.submit("q")
    screen = render(collect_status(redis_client, ["tokenrelay"]))
    for heading in ("queues", "workers (", "in flight (0)", "recent failures (0)", "consumers"):
        assert heading in screen
    assert "tokenrelay  1" in screen
