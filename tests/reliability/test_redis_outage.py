"""A Redis outage mid-stream is ridden out by every long-running process, and nothing is lost.

Redis is a real `redis-server` of the test's own, stopped mid-generation and started again on
the same port. Attached meanwhile: a worker, a recorder, the metrics consumer, three
`tokenrelay watch` viewers and a `JobHandle.tokens()` reader in this process. With persistence
(AOF) every one of them ends with the scripted text, once; without it, the data is gone but
every process lives on and the next job works.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis import Redis
from support.scripts import ScriptedLLM
from support.streams import terminal_entries, wait_for_tokens
from support.waiting import wait_until
from support.workers import WorkerProcess, Workers

from tokenrelay import EndEntry, JobHandle, Relay, Settings, StreamExpiredError
from tokenrelay.connection import connect
from tokenrelay.dev.processes import free_port
from tokenrelay.dev.redis_server import RedisServer
from tokenrelay.stream.protocol import AttemptEntry

WORDS = [f" w{i}" for i in range(60)]
TEXT = "".join(WORDS)


class Attached:
    """The processes that follow one job through the outage, and what they saw."""

    def __init__(self, workers: Workers, handle: JobHandle, transcripts: Path) -> None:
        self.metrics_port = free_port()
        self.worker = workers.start()
        self.recorder = workers.command("record", "--dir", str(transcripts), "--name", "rec")
        self.metrics = workers.command(
            "metrics", "--port", str(self.metrics_port), "--interval", "0", "--name", "m"
        )
        self.viewers = [workers.command("watch", handle.job_id) for _ in range(3)]
        self.read: list[str] = []
        self.read_error: Exception | None = None
        self.reader = threading.Thread(target=self._read, args=(handle,), daemon=True)
        self.reader.start()
        self.transcripts = transcripts

    def _read(self, handle: JobHandle) -> None:
        try:
            self.read.extend(handle.tokens(timeout=180))
        except Exception as exc:  # what the reader was told, for the test to look at
            self.read_error = exc

    def long_running(self) -> list[WorkerProcess]:
        return [self.worker, self.recorder, self.metrics]

    def finished_jobs(self) -> float:
        """What the metrics endpoint counts as finished, over every model."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as reply:
            lines = reply.read().decode().splitlines()
        counts = [line for line in lines if line.startswith("tokenrelay_jobs_finished_total{")]
        return sum(float(line.rsplit(" ", 1)[1]) for line in counts)


@pytest.fixture
def clients() -> Iterator[list[Redis]]:
    """The test's own clients of its Redis, closed when it ends."""
    opened: list[Redis] = []
    yield opened
    for client in opened:
        client.close()


@pytest.fixture
def persistent_redis() -> Iterator[RedisServer]:
    """A Redis of this test's own that keeps its data across a restart (AOF)."""
    with RedisServer(appendonly=True) as server:
        yield server


@pytest.fixture
def volatile_redis() -> Iterator[RedisServer]:
    """A Redis of this test's own that keeps nothing across a restart."""
    with RedisServer() as server:
        yield server


def on(server: RedisServer, env: dict[str, str], workers: Workers, clients: list[Redis]) -> Relay:
    """Point the test's processes (and a producer) at `server`."""
    env["TOKENRELAY_REDIS_URL"] = server.url
    workers.env["TOKENRELAY_REDIS_URL"] = server.url
    clients.append(connect(server.url))
    return Relay(clients[-1], Settings.from_env(env))


def outage(server: RedisServer, seconds: float) -> None:
    """Stop Redis for `seconds`, then start it again on the same port."""
    server.stop(keep_data=True)
    time.sleep(seconds)  # the outage itself: what the test is about, not a wait for a result
    server.start()


def logged(process: WorkerProcess, event: str) -> list[dict[str, object]]:
    return [line for line in process.logs() if line["event"] == event]


@pytest.mark.parametrize("seconds", [5, 30])
@pytest.mark.timeout(240)
def test_every_process_rides_out_a_redis_outage_mid_stream_and_all_agree(
    persistent_redis: RedisServer,
    env: dict[str, str],
    llm: ScriptedLLM,
    workers: Workers,
    clients: list[Redis],
    tmp_path: Path,
    seconds: float,
) -> None:
    """Stopped for 5 s (and 30 s) mid-stream: every reader gets the whole text, once."""
    relay = on(persistent_redis, env, workers, clients)
    handle = relay.submit("tell me", model=llm.script(WORDS, token_delay=0.1))
    attached = Attached(workers, handle, tmp_path / "transcripts")
    wait_for_tokens(handle, 15)

    outage(persistent_redis, seconds)

    for viewer in attached.viewers:
        assert viewer.wait(timeout=120) == 0, viewer.log_path.read_text()
        assert viewer.output() == TEXT + "\n"
    attached.reader.join(timeout=60)
    assert attached.read_error is None
    assert "".join(attached.read) == TEXT
    client = relay.redis
    assert [type(e) for e in terminal_entries(client, handle.job_id)] == [EndEntry]
    transcript = attached.transcripts / f"{handle.job_id}.txt"
    wait_until(transcript.exists, timeout=60, what="the recorder's transcript")
    assert transcript.read_text() == TEXT
    wait_until(lambda: attached.finished_jobs() == 1, timeout=60, what="metrics count the job")

    for process in attached.long_running():
        assert process.process.poll() is None, process.log_path.read_text()[-2000:]
        assert len(logged(process, "redis.unavailable")) == 1  # once, however long it lasts
        [back] = logged(process, "redis.recovered")
        assert float(str(back["outage_s"])) >= seconds * 0.8
    after = relay.submit("and again", model=llm.script(["still", " here"]))
    assert after.text(timeout=60) == "still here"
    wait_until(lambda: attached.finished_jobs() == 2, timeout=60, what="metrics count the next")


@pytest.mark.timeout(240)
def test_without_persistence_data_is_lost_but_every_process_lives_and_the_next_job_works(
    volatile_redis: RedisServer,
    env: dict[str, str],
    llm: ScriptedLLM,
    workers: Workers,
    clients: list[Redis],
    tmp_path: Path,
) -> None:
    """Redis comes back empty: readers of the lost job are told it is gone; nothing hangs."""
    relay = on(volatile_redis, env, workers, clients)
    handle = relay.submit("tell me", model=llm.script(WORDS, token_delay=0.1))
    attached = Attached(workers, handle, tmp_path / "transcripts")
    wait_for_tokens(handle, 15)

    outage(volatile_redis, 3)

    for viewer in attached.viewers:
        assert viewer.wait(timeout=120) == 1
        assert "is gone" in viewer.log_path.read_text()
    attached.reader.join(timeout=60)
    assert isinstance(attached.read_error, StreamExpiredError)
    for process in attached.long_running():
        assert process.process.poll() is None, process.log_path.read_text()[-2000:]

    after = relay.submit("and again", model=llm.script(["still", " here"]))
    assert after.text(timeout=60) == "still here"
    transcript = attached.transcripts / f"{after.job_id}.txt"
    wait_until(transcript.exists, timeout=60, what="the recorder records the next job")
    assert transcript.read_text() == "still here"
    wait_until(lambda: attached.finished_jobs() >= 1, timeout=60, what="metrics count it")
    status = json.loads((tmp_path / "transcripts" / f"{after.job_id}.json").read_text())
    assert status["status"] == "finished"


@pytest.mark.timeout(120)
def test_past_the_outage_limit_viewers_give_up_clearly_and_the_job_is_taken_over_after(
    persistent_redis: RedisServer,
    env: dict[str, str],
    llm: ScriptedLLM,
    workers: Workers,
    clients: list[Redis],
) -> None:
    """An outage longer than TOKENRELAY_REDIS_OUTAGE_LIMIT: a viewer exits 1 saying why; the
    worker lives on, and its job, given up for the outage, is taken over once Redis is back."""
    short = {
        "TOKENRELAY_REDIS_OUTAGE_LIMIT": "1.5",
        "TOKENRELAY_LEASE_TTL": "1.5",
        "TOKENRELAY_TAKEOVER_AFTER": "0.5",
    }
    relay = on(persistent_redis, env, workers, clients)
    handle = relay.submit("tell me", model=llm.script(WORDS, token_delay=0.1))
    worker = workers.start(env=short)
    viewer = workers.command("watch", handle.job_id, env=short)
    wait_for_tokens(handle, 10)

    outage(persistent_redis, 4)

    assert viewer.wait(timeout=60) == 1
    assert "unreachable for" in viewer.log_path.read_text()
    assert handle.text(timeout=60) == TEXT
    stream = [r.entry for r in handle.records(timeout=5)]
    assert any(isinstance(e, AttemptEntry) and e.reason == "WorkerLost" for e in stream)
    assert worker.process.poll() is None
    assert logged(worker, "worker.job_left_to_takeover")
