"""What the benchmarks run on: a private Redis, the fast fake model, worker processes, readers."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from redis import Redis
from rq import Worker
from rq.serializers import JSONSerializer

from tokenrelay import Relay, Settings
from tokenrelay.connection import connect
from tokenrelay.dev.processes import free_port, stop_process
from tokenrelay.dev.redis_server import RedisServer


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) of values."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q / 100))]


def resident_kb(pid: int) -> int:
    """A process's resident memory, in kB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def cpu_seconds(pid: int) -> float:
    """A process's CPU time so far (user + system), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Rig:
    """A Redis, the fake model, and the environment a worker process runs with."""

    redis: Redis
    redis_url: str
    model_url: str
    env: dict[str, str]

    def relay(self) -> Relay:
        return Relay(self.redis, Settings.from_env(self.env))

    @contextmanager
    def worker(self, **env: str) -> Iterator[subprocess.Popen[bytes]]:
        """A `tokenrelay worker` process, registered with RQ before this yields."""
        before = {w.name for w in Worker.all(connection=self.redis, serializer=JSONSerializer)}
        process = subprocess.Popen(
            [sys.executable, "-m", "tokenrelay", "worker"],
            env={**self.env, **env},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while {
            w.name for w in Worker.all(connection=self.redis, serializer=JSONSerializer)
        } <= before:
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError("the worker did not start")
            time.sleep(0.05)
        try:
            yield process
        finally:
            stop_process(process, grace=60)

    def flush(self) -> None:
        self.redis.flushdb()


@contextmanager
def rig() -> Iterator[Rig]:
    """Start a private redis-server and the fake model server; stop both afterwards."""
    port = free_port()
    model = subprocess.Popen(
        [sys.executable, "-m", "bench.model_server", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert model.stdout is not None
    model.stdout.readline()  # "ready"
    try:
        with RedisServer() as server:
            env: dict[str, Any] = {
                **{
                    k: v
                    for k, v in os.environ.items()
                    if not k.startswith(("TOKENRELAY_", "OPENAI_"))
                },
                "TOKENRELAY_REDIS_URL": server.url,
                "OPENAI_BASE_URL": f"http://127.0.0.1:{port}/v1",
                "OPENAI_API_KEY": "bench",
                "TOKENRELAY_LOG_LEVEL": "warning",
                "TOKENRELAY_LOG_FORMAT": "json",
                "TOKENRELAY_LLM_MAX_RETRIES": "0",
                "TOKENRELAY_MAX_TOKENS_LIMIT": "100000",
            }
            yield Rig(connect(server.url), server.url, env["OPENAI_BASE_URL"], env)
    finally:
        stop_process(model)
