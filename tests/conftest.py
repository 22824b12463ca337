"""Fixtures that start the real parts: a private redis-server, a scripted model server, workers,
the gateway.

Point the tests at an existing Redis with `--redis-url` (or TOKENRELAY_TEST_REDIS_URL);
its database is flushed before and after every test, so never point it at data you keep.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis import Redis
from support.gateway import GatewayProcess, start_gateway
from support.scripted_openai import ScriptedOpenAI
from support.scripts import SECRET_KEY, ScriptedLLM
from support.workers import Workers

from tokenrelay import Relay, Settings
from tokenrelay.connection import connect
from tokenrelay.dev.redis_server import RedisServer


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--redis-url",
        default=os.environ.get("TOKENRELAY_TEST_REDIS_URL"),
        help="use this Redis instead of starting one (it is flushed by every test)",
    )


@pytest.fixture(autouse=True)
def _no_leaks() -> Iterator[None]:
    """Collect garbage after each test, so that a connection a test leaves open fails that
    test (with the filterwarnings=error setting), not whichever test the collector next runs in."""
    yield
    gc.collect()


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


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server of this test's own, for tests that stop, freeze or restart it."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def env(redis_url: str, redis_client: Redis, llm_server: ScriptedOpenAI) -> dict[str, str]:
    """The environment every tokenrelay process of a test runs with (on a flushed database)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("TOKENRELAY_", "OPENAI_"))}
    return {
        **base,
        "TOKENRELAY_REDIS_URL": redis_url,
        "OPENAI_BASE_URL": llm_server.base_url,
        "OPENAI_API_KEY": SECRET_KEY,
        "TOKENRELAY_LOG_FORMAT": "json",
        "TOKENRELAY_LLM_MAX_RETRIES": "0",
        # One attempt per job: the terminal paths of a single attempt, each as it ends.
        # Retries, continuation and takeovers are tested under tests/reliability.
        "TOKENRELAY_MAX_ATTEMPTS": "1",
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


@pytest.fixture
def workers(env: dict[str, str], tmp_path: Path) -> Iterator[Workers]:
    """A factory of worker processes, all killed at the end of the test."""
    pool = Workers(env, tmp_path)
    yield pool
    pool.stop_all()


@pytest.fixture
def gateway(env: dict[str, str], tmp_path: Path) -> Iterator[GatewayProcess]:
    """A `tokenrelay serve` process on the test's Redis (pings every second), stopped after."""
    process = start_gateway(env, tmp_path / "gateway.log")
    yield process
    process.stop()
