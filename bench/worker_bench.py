"""The concurrent worker against the bare client, each figure beside its baseline from the same run.

Run from the repository root: `python -m bench.worker_bench` (in `make bench`). It starts a
private redis-server, the fake model of `bench.model_server` (a process of its own) and real
worker processes, and records a section in bench/RESULTS.md:

1. one 20,000-token stream through tokenrelay vs plain `ChatOpenAI.stream()`;
2. 100, 300 and 1,000 concurrent generations at 30 tokens/s in one worker process vs the bare
   async client running the same streams in one process (memory per generation, tokens/s,
   and at 100 streams the delay from a token leaving the model to a reader having it);
3. 1,000 ten-token jobs vs 1,000 bare client calls;
4. what tokenrelay adds between `submit()` and the first token, over the model's own;
5. Redis's cost per token, with coalescing on and off, and bytes per token kept;
6. where the worker's CPU goes (py-spy, when installed).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx2
from langchain_openai import ChatOpenAI

from bench.machine import describe
from bench.model_server import token_sent_at
from bench.report import record
from bench.rig import Rig, cpu_seconds, percentile, resident_kb, rig
from tokenrelay import AsyncRelay, EndEntry, JobHandle, Relay, Settings, StartEntry, TokenEntry

QUICK = os.environ.get("BENCH_QUICK") == "1"  # small sizes, to try the benchmark itself out
ONE_STREAM_TOKENS = 2_000 if QUICK else 20_000
PACE = 30  # tokens per second of each paced stream
PACED_TOKENS = 60 if QUICK else 300  # 10 s of tokens at PACE
STREAM_COUNTS = (20, 50) if QUICK else (100, 300, 1000)
TINY_JOBS = 100 if QUICK else 1000
FIRST_TOKEN_RUNS = 10 if QUICK else 50


def _client(rig_: Rig, model: str, *, http: Any = None, max_tokens: int = 100_000) -> ChatOpenAI:
    return ChatOpenAI(
        model=model,
        base_url=rig_.model_url,
        api_key="bench",  # type: ignore[arg-type]
        streaming=True,
        max_completion_tokens=max_tokens,
        extra_body={"max_tokens": max_tokens},
        max_retries=0,
        http_async_client=http,
    )


def _tokens(handle: JobHandle, timeout: float = 600) -> int:
    return sum(
        r.entry.count for r in handle.records(timeout=timeout) if isinstance(r.entry, TokenEntry)
    )


def one_stream(rig_: Rig) -> dict[str, float]:
    """Tokens/s of one long stream, relayed and bare, alternating five times each."""
    model = f"tok{ONE_STREAM_TOKENS}-0"
    relay = rig_.relay()

    def bare() -> tuple[float, float]:
        started, cpu, count = time.perf_counter(), time.process_time(), 0
        for chunk in _client(rig_, model).stream("go"):
            count += bool(chunk.content)
        assert count == ONE_STREAM_TOKENS
        return count / (time.perf_counter() - started), (time.process_time() - cpu) / count

    def relayed(worker: int) -> tuple[float, float]:
        started, cpu = time.perf_counter(), cpu_seconds(worker)
        count = _tokens(relay.submit("go", model=model, max_tokens=ONE_STREAM_TOKENS))
        assert count == ONE_STREAM_TOKENS
        return count / (time.perf_counter() - started), (cpu_seconds(worker) - cpu) / count

    with rig_.worker() as worker:
        _tokens(relay.submit("warm up", model="tok10-0"))
        runs = [(bare(), relayed(worker.pid)) for _ in range(5)]  # interleaved: speed drifts
    return {
        "bare": statistics.median(b[0] for b, _ in runs),
        "relayed": statistics.median(r[0] for _, r in runs),
        "bare_cpu_us": statistics.median(b[1] for b, _ in runs) * 1e6,
        "worker_cpu_us": statistics.median(r[1] for _, r in runs) * 1e6,
    }


async def _bare_streams(rig_: Rig, model: str, count: int, calls: int | None = None) -> float:
    """The bare async client running `calls` streams, `count` at once, in this process."""
    limits = httpx2.Limits(max_connections=count, max_keepalive_connections=count)
    async with httpx2.AsyncClient(limits=limits, timeout=600) as http:
        llm = _client(rig_, model, http=http)
        slots = asyncio.Semaphore(count)
        totals: list[int] = []

        async def one() -> None:
            async with slots:
                totals.append(sum([bool(c.content) async for c in llm.astream("go")]))

        started = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(calls or count)))
        return sum(totals) / (time.perf_counter() - started)


def _most_at_once(relay: Relay, handles: list[JobHandle]) -> int:
    moments = []
    for handle in handles:
        entries = [r.entry for r in handle.records(timeout=60)]
        start, end = entries[0], entries[-1]
        assert isinstance(start, StartEntry)
        assert isinstance(end, EndEntry)
        assert end.duration_ms is not None
        moments += [(start.started_at, 1), (start.started_at + end.duration_ms / 1000, -1)]
    running = most = 0
    for _, change in sorted(moments):
        running += change
        most = max(most, running)
    return most


def _follow(rig_: Rig, handles: list[JobHandle]) -> list[float]:
    """Each token's delay from leaving the model to a reader having it: one reader of every
    job, as an application follows many (`AsyncRelay`: one shared XREAD for all of them)."""

    async def follow_all() -> list[float]:
        delays: list[float] = []
        async with AsyncRelay.from_env(Settings.from_env(rig_.env)) as relay:

            async def read(job_id: str) -> None:
                async for record in relay.job(job_id).arecords(timeout=600):
                    if isinstance(record.entry, TokenEntry):
                        now = time.time()
                        delays.extend(now - sent for sent in token_sent_at(record.entry.text))

            await asyncio.gather(*(read(h.job_id) for h in handles))
        return delays

    return asyncio.run(follow_all())


def many_streams(rig_: Rig, count: int) -> dict[str, float]:
    """`count` paced streams in one worker process, and the bare client doing the same."""
    model = f"tok{PACED_TOKENS}-{PACE}"
    bare = asyncio.run(_bare_streams(rig_, model, count))
    relay = rig_.relay()
    with rig_.worker(TOKENRELAY_WORKER_CONCURRENCY=str(count)) as worker:
        _tokens(relay.submit("warm up", model="tok10-0"))
        idle_kb = resident_kb(worker.pid)
        started = time.perf_counter()
        handles = relay.submit_many([{"prompt": "go", "model": model}] * count)
        peak_kb, sampling = idle_kb, True

        def sample() -> None:
            nonlocal peak_kb
            while sampling:
                peak_kb = max(peak_kb, resident_kb(worker.pid))
                time.sleep(0.2)

        sampler = threading.Thread(target=sample)
        sampler.start()
        delays = _follow(rig_, handles) if count <= 100 else []
        totals = [_tokens(h) for h in handles]
        elapsed = time.perf_counter() - started
        sampling = False
        sampler.join()
    assert totals == [PACED_TOKENS] * count
    result = {
        "bare": bare,
        "relayed": sum(totals) / elapsed,
        "at_once": _most_at_once(relay, handles),
        "kb_per_generation": (peak_kb - idle_kb) / count,
    }
    if delays:
        result |= {"p50_ms": percentile(delays, 50) * 1000, "p99_ms": percentile(delays, 99) * 1000}
    rig_.flush()
    return result


def tiny_jobs(rig_: Rig) -> dict[str, float]:
    """Ten-token jobs: jobs/s through one worker, calls/s of the bare client (100 at once)."""
    bare = asyncio.run(_bare_streams(rig_, "tok10-0", 100, calls=TINY_JOBS)) / 10
    relay = rig_.relay()
    with rig_.worker():
        _tokens(relay.submit("warm up", model="tok10-0"))
        started = time.perf_counter()
        handles = relay.submit_many([{"prompt": "go", "model": "tok10-0"}] * TINY_JOBS)
        for handle in handles:
            handle.result(timeout=600)
        relayed = TINY_JOBS / (time.perf_counter() - started)
    rig_.flush()
    return {"bare": bare, "relayed": relayed}


def first_token(rig_: Rig) -> dict[str, float]:
    """Submit-to-first-token with an idle worker waiting, against the model's own first token."""
    relay, own, through = rig_.relay(), [], []
    llm = _client(rig_, "tok1-0")
    with rig_.worker():
        _tokens(relay.submit("warm up", model="tok1-0"))
        for _ in range(FIRST_TOKEN_RUNS):
            started = time.perf_counter()
            next(c for c in llm.stream("go") if c.content)
            own.append(time.perf_counter() - started)
            time.sleep(0.05)  # the worker is idle again, waiting on the queue
            started = time.perf_counter()
            handle = relay.submit("go", model="tok1-0")
            next(r for r in handle.records(timeout=60) if isinstance(r.entry, TokenEntry))
            through.append(time.perf_counter() - started)
            handle.result(timeout=60)
    rig_.flush()
    return {
        "model_ms": statistics.median(own) * 1000,
        "relayed_ms": statistics.median(through) * 1000,
        "added_ms": (statistics.median(through) - statistics.median(own)) * 1000,
    }


def redis_cost(rig_: Rig, rate: int, per_entry: int) -> dict[str, float]:
    """Redis commands, pipelines and CPU per token for 10 streams at `rate` tokens/s each."""
    streams, seconds = 10, (10 if rate < 10 else 3)
    count = rate * seconds
    relay = rig_.relay()
    env = {"TOKENRELAY_TOKENS_PER_ENTRY": str(per_entry), "TOKENRELAY_HEARTBEAT_INTERVAL": "1"}
    with rig_.worker(**env) as worker:
        _tokens(relay.submit("warm up", model="tok10-0"))
        name = next(iter(_worker_names(rig_)))
        before_stats = _worker_writes(rig_, name)
        rig_.redis.config_resetstat()
        cpu_before = _redis_cpu(rig_)
        handles = relay.submit_many([{"prompt": "go", "model": f"tok{count}-{rate}"}] * streams)
        total = sum(_tokens(h) for h in handles)
        cpu = _redis_cpu(rig_) - cpu_before
        calls = sum(v["calls"] for v in rig_.redis.info("commandstats").values())
        time.sleep(1.5)  # one heartbeat: the worker's own counters reach its stats hash
        writes = _worker_writes(rig_, name) - before_stats
        kept = sum(rig_.redis.memory_usage(h.stream_key) or 0 for h in handles)
        del worker
    rig_.flush()
    return {
        "tokens": total,
        "commands_per_token": calls / total,
        "pipelines_per_token": writes / total,
        "redis_cpu_us_per_token": cpu / total * 1e6,
        "bytes_per_token": kept / total,
    }


def _worker_names(rig_: Rig) -> list[str]:
    from rq import Worker
    from rq.serializers import JSONSerializer

    return [w.name for w in Worker.all(connection=rig_.redis, serializer=JSONSerializer)]


def _worker_writes(rig_: Rig, name: str) -> float:
    value = rig_.redis.hget(f"tokenrelay:worker:{name}", "stream_writes")
    return float(value or 0)


def _redis_cpu(rig_: Rig) -> float:
    info = rig_.redis.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def profile(rig_: Rig, count: int = 300) -> Counter[str]:
    """Where a worker's loop thread spends its time with `count` paced streams (py-spy)."""
    spy = Path(sys.executable).with_name("py-spy")
    if not spy.exists():
        return Counter()
    relay = rig_.relay()
    with rig_.worker(TOKENRELAY_WORKER_CONCURRENCY=str(count)) as worker:
        handles = relay.submit_many(
            [{"prompt": "go", "model": f"tok{PACED_TOKENS}-{PACE}"}] * count
        )
        time.sleep(3)
        out = Path(tempfile.gettempdir()) / f"tokenrelay-profile-{worker.pid}.txt"
        subprocess.run(
            [
                str(spy),
                "record",
                "-p",
                str(worker.pid),
                "-d",
                "5",
                "-f",
                "raw",
                "--threads",
                "-o",
                str(out),
            ],
            capture_output=True,
            check=False,
        )
        for handle in handles:
            _tokens(handle)
    rig_.flush()
    return _by_package(out)


_PACKAGES = (
    ("tokenrelay/", "tokenrelay"),
    ("openai/", "openai (client, chunk parsing)"),
    ("httpx2", "httpx2/httpcore2 (HTTP)"),
    ("httpcore2", "httpx2/httpcore2 (HTTP)"),
    ("langchain", "LangChain (callbacks, messages)"),
    ("pydantic", "pydantic"),
    ("redis/", "redis-py"),
    ("rq/", "RQ"),
    ("json", "json"),
    ("structlog", "structlog"),
    ("asyncio", "asyncio (loop, tasks, transports)"),
    ("selectors", "waiting for I/O"),
)


def _by_package(raw: Path) -> Counter[str]:
    """py-spy's raw stacks of the main thread, by the innermost package each sample was in."""
    share: Counter[str] = Counter()
    if not raw.exists():
        return share
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if "MainThread" not in frames[0]:
            continue
        where = next(
            (label for frame in reversed(frames) for key, label in _PACKAGES if key in frame),
            "other",
        )
        share[where] += int(count)
    raw.unlink()
    return share


def _ratio(result: dict[str, float]) -> str:
    return f"{result['relayed'] / result['bare']:.2f}x"


def main() -> None:
    """Run every benchmark and record a Markdown section in bench/RESULTS.md."""
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = []
    with rig() as rig_:
        redis_version = rig_.redis.info("server")["redis_version"]
        stream = one_stream(rig_)
        lines.append(
            f"| 1. one {ONE_STREAM_TOKENS:,}-token stream | ≥ 0.95x | "
            f"{stream['relayed']:,.0f} tok/s ({_ratio(stream)}); the worker's CPU "
            f"{stream['worker_cpu_us']:.0f} µs/token | {stream['bare']:,.0f} tok/s; the client's "
            f"CPU {stream['bare_cpu_us']:.0f} µs/token |"
        )
        for count in STREAM_COUNTS:
            many = many_streams(rig_, count)
            latency = (
                f"; token → reader p50 {many['p50_ms']:.1f} ms, p99 {many['p99_ms']:.1f} ms"
                if "p99_ms" in many
                else ""
            )
            lines.append(
                f"| 2. {count:,} streams at {PACE} tok/s, one process | "
                f"all in flight; < 2 MB each; ≥ 0.9x{'; p99 < 20 ms' if latency else ''} | "
                f"{many['at_once']:.0f} at once, {many['kb_per_generation'] / 1024:.2f} MB each, "
                f"{many['relayed']:,.0f} tok/s ({_ratio(many)}){latency} | "
                f"{many['bare']:,.0f} tok/s |"
            )
        tiny = tiny_jobs(rig_)
        lines.append(
            f"| 3. {TINY_JOBS:,} ten-token jobs | ≥ 200 jobs/s and ≥ 0.5x | "
            f"{tiny['relayed']:,.0f} jobs/s ({_ratio(tiny)}) | {tiny['bare']:,.0f} calls/s |"
        )
        first = first_token(rig_)
        lines.append(
            f"| 4. submit → first token, median of {FIRST_TOKEN_RUNS} | added < 10 ms | "
            f"{first['relayed_ms']:.1f} ms (adds {first['added_ms']:.1f} ms) | "
            f"{first['model_ms']:.1f} ms (the model's own) |"
        )
        costs = [
            (rate, label, redis_cost(rig_, rate, per_entry))
            for rate in (1, 100, 1000)
            for label, per_entry in (("on", 0), ("off", 1))
        ]
        shares = profile(rig_)
    out = [f"## Concurrent worker: {when}\n", describe(redis_version) + "\n"]
    out += [
        "| benchmark | target | tokenrelay | baseline (same run) |",
        "|---|---|---|---|",
        *lines,
    ]
    out += [
        "",
        "Redis per token, 10 streams at each rate (5; coalescing off: one token an entry):",
        "",
    ]
    out += [
        "| tokens/s a stream | coalescing | commands | pipelines | Redis CPU | bytes kept |",
        "|---|---|---|---|---|---|",
    ]
    for rate, label, cost in costs:
        out.append(
            f"| {rate} | {label} | {cost['commands_per_token']:.2f} | "
            f"{cost['pipelines_per_token']:.3f} | {cost['redis_cpu_us_per_token']:.1f} µs | "
            f"{cost['bytes_per_token']:.0f} |"
        )
    if shares:
        total = sum(shares.values())
        out += [
            "",
            "Where the worker's loop thread spends its time, 300 paced streams (6, py-spy, 5 s):",
            "",
        ]
        out += [f"- {label}: {count / total:.0%}" for label, count in shares.most_common()]
    record("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
