"""What the relay itself costs: per-token appends, end-to-end throughput, fan-out, batch submit.

Run from the repository root: `python -m bench.relay_overhead` (or `make bench`). It
starts a private redis-server and the scripted OpenAI-compatible server from the
tests (tokens as fast as the worker reads them), so it measures tokenrelay and
Redis, not a model. It prints a Markdown section for bench/RESULTS.md.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from redis import Redis

from bench.machine import describe
from tokenrelay import Relay, Settings, StartEntry, TokenEntry
from tokenrelay.connection import connect
from tokenrelay.dev.redis_server import RedisServer
from tokenrelay.stream.writer import StreamWriter

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from support.scripted_openai import Script, ScriptedOpenAI

APPENDS = 20_000
STREAM_TOKENS = 5_000
PACED_TOKENS = 1_000
PACE = 0.005  # seconds between tokens: 200 tokens/s, a fast hosted model
READERS = 50
BATCH = 10_000


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) of values."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q / 100))]


def bench_appends(client: Redis) -> dict[str, float]:
    """Sequential token appends by one writer: the per-token cost on the worker's hot path."""
    writer = StreamWriter(client, "bench-appends", ttl=600)
    start = StartEntry("bench-appends", "m", 1, None, time.time(), "bench", APPENDS, 1)
    writer.start(replace(start, writer=writer.writer_token))
    started = time.perf_counter()
    for i in range(APPENDS):
        writer.token(f" tok{i}")
    elapsed = time.perf_counter() - started
    return {"us_per_token": elapsed / APPENDS * 1e6, "tokens_per_s": APPENDS / elapsed}


def run_worker(env: dict[str, str]) -> None:
    """Run a burst worker until the queue is empty."""
    command = [sys.executable, "-m", "tokenrelay", "worker", "--burst"]
    subprocess.run(command, env=env, capture_output=True, check=True)


def bench_throughput(relay: Relay, env: dict[str, str]) -> dict[str, float]:
    """One job of STREAM_TOKENS tokens, as fast as the server sends them, through a real worker."""
    handle = relay.submit("go", model="bench-fast", max_tokens=STREAM_TOKENS)
    run_worker(env)
    end = handle.result(timeout=10).end
    assert end.tokens == STREAM_TOKENS
    return {"tokens_per_s": STREAM_TOKENS / ((end.duration_ms or 0) / 1000)}


def bench_fan_out(relay: Relay, env: dict[str, str]) -> dict[str, float]:
    """READERS readers (threads of one process) follow one job paced like a fast model."""
    handle = relay.submit("go", model="bench-paced", max_tokens=PACED_TOKENS)
    delays: list[list[float]] = [[] for _ in range(READERS)]

    def read(index: int) -> None:
        for record in handle.records(timeout=300):
            if isinstance(record.entry, TokenEntry):
                written = int(record.id.split("-")[0]) / 1000  # the entry id's milliseconds
                delays[index].append(time.time() - written)

    readers = [threading.Thread(target=read, args=(i,)) for i in range(READERS)]
    for reader in readers:
        reader.start()
    run_worker(env)
    for reader in readers:
        reader.join()
    assert all(len(d) == PACED_TOKENS for d in delays)
    everything = [d for reader_delays in delays for d in reader_delays]
    return {
        "delivery_ms_p50": percentile(everything, 50) * 1000,
        "delivery_ms_p99": percentile(everything, 99) * 1000,
    }


def bench_submit(relay: Relay) -> dict[str, float]:
    """submit_many of BATCH prompts, pipelined 500 per round trip."""
    started = time.perf_counter()
    relay.submit_many([f"prompt number {i}" for i in range(BATCH)])
    elapsed = time.perf_counter() - started
    return {"jobs_per_s": BATCH / elapsed}


def main() -> None:
    """Run every benchmark and print a Markdown section."""
    scripts = {
        "bench-fast": Script(tokens=[f" t{i}" for i in range(STREAM_TOKENS)]),
        "bench-paced": Script(tokens=[f" t{i}" for i in range(PACED_TOKENS)], token_delay=PACE),
    }
    with RedisServer() as redis_server, ScriptedOpenAI(scripts) as llm:
        client = connect(redis_server.url)
        env = {
            **os.environ,
            "TOKENRELAY_REDIS_URL": redis_server.url,
            "OPENAI_BASE_URL": llm.base_url,
            "TOKENRELAY_LOG_LEVEL": "warning",
        }
        relay = Relay(client, Settings.from_env(env))
        appends = bench_appends(client)
        client.flushdb()
        throughput = bench_throughput(relay, env)
        client.flushdb()
        fan_out = bench_fan_out(relay, env)
        client.flushdb()
        submit = bench_submit(relay)
        when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        print(f"## {when}\n\n{describe(client.info('server')['redis_version'])}\n")
        print("| benchmark | result |\n|---|---|")
        print(
            f"| token append, one writer ({APPENDS:,} appends) | "
            f"{appends['us_per_token']:.0f} µs/token ({appends['tokens_per_s']:,.0f} tokens/s) |\n"
            f"| one job, {STREAM_TOKENS:,} tokens, server → worker → Redis | "
            f"{throughput['tokens_per_s']:,.0f} tokens/s |\n"
            f"| {READERS} readers of one job at {1 / PACE:.0f} tokens/s (XADD → reader) | "
            f"p50 {fan_out['delivery_ms_p50']:.1f} ms, p99 {fan_out['delivery_ms_p99']:.1f} ms |\n"
            f"| submit_many, {BATCH:,} prompts | {submit['jobs_per_s']:,.0f} jobs/s |"
        )


if __name__ == "__main__":
    main()
