"""The gateway under a thousand viewers: one job watched by 1,000 clients, and 100 jobs by 10 each.

Run from the repository root: `python -m bench.gateway_bench` (in `make bench`; BENCH_QUICK=1
for small sizes). It starts a private redis-server, the fake model of `bench.model_server`
(paced at 20 tokens/s), a worker and one `tokenrelay serve` process, and connects the
clients from this process (raw sockets, `bench.sse_clients`). It records in bench/RESULTS.md:

1. one job, 20 tokens/s, watched by a few clients and then by 1,000: whether every client got
   the exact text; the delay from XADD (the entry id's time) to a client having the event,
   p50 and p99; Redis commands per token (all of them, and the gateway's XREADs), which must
   not grow with the clients; the gateway's memory per connected client;
2. 100 jobs at 20 tokens/s at once, 10 clients each: the same figures.
"""

from __future__ import annotations

import asyncio
import os
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import httpx

from bench.machine import describe
from bench.report import record
from bench.rig import Rig, percentile, resident_kb, rig
from bench.sse_clients import Client, open_clients
from tokenrelay.dev.processes import free_port, stop_process
from tokenrelay.gateway.auth import ReadTokens, hash_key

QUICK = os.environ.get("BENCH_QUICK") == "1"
PACE = 20  # tokens per second of each job
TOKENS = 100 if QUICK else 400  # 5 s (quick) or 20 s of tokens at PACE
CLIENTS = 100 if QUICK else 1000
FEW = 10
JOBS = 10 if QUICK else 100
SECRET = "bench-signing-secret-0123456789abcdef0123"
KEY = "trk_bench-key"


@contextmanager
def gateway(rig_: Rig) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """A `tokenrelay serve` process on a free port, ready."""
    port = free_port()
    env = {
        **rig_.env,
        "TOKENRELAY_GATEWAY_SECRET": SECRET,
        "TOKENRELAY_GATEWAY_API_KEYS": hash_key(KEY),
        "TOKENRELAY_GATEWAY_STREAMS_PER_CLIENT": str(CLIENTS * 2),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "tokenrelay", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).raise_for_status()
            break
        except httpx.TransportError:
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError("the gateway did not start") from None
            time.sleep(0.1)
    try:
        yield process, port
    finally:
        stop_process(process, grace=30)


def commands(rig_: Rig) -> dict[str, int]:
    """Redis's command counts so far, by command."""
    stats: Any = rig_.redis.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


def watch(rig_: Rig, port: int, gateway_pid: int, per_job: int, jobs: int) -> dict[str, float]:
    """Submit `jobs` paced jobs, connect `per_job` clients to each, then start a worker."""
    relay = rig_.relay()
    model = f"tok{TOKENS}-{PACE}"
    handles = [relay.submit("go", model=model, max_tokens=TOKENS) for _ in range(jobs)]
    tokens = ReadTokens(SECRET.encode(), ttl=3600)

    async def run() -> dict[str, float]:
        rss_before = resident_kb(gateway_pid)
        clients: dict[str, list[Client]] = {}
        for handle in handles:
            path = f"/v1/jobs/{handle.job_id}/events?token={tokens.mint(handle.job_id)[0]}"
            clients[handle.job_id] = await open_clients("127.0.0.1", port, path, per_job)
        await asyncio.sleep(1)  # let the gateway settle before its memory is read
        rss_after = resident_kb(gateway_pid)
        before = commands(rig_)
        with rig_.worker():
            every = [c for group in clients.values() for c in group]
            await asyncio.wait_for(asyncio.gather(*(c.ended.wait() for c in every)), 600)
        after = commands(rig_)
        for client in every:
            client.close()
        texts = {h.job_id: h.text(timeout=60) for h in handles}
        exact = sum("".join(c.text) == texts[job] for job, group in clients.items() for c in group)
        delays = [d for c in every for d in c.delays_ms]
        count = len(every)
        return {
            "clients": count,
            "exact": exact,
            "p50": percentile(delays, 50),
            "p99": percentile(delays, 99),
            "commands": sum(after.values()) - sum(before.values()),
            "xread": after.get("xread", 0) - before.get("xread", 0),
            "tokens": TOKENS * jobs,
            "kb_per_client": (rss_after - rss_before) / count,
        }

    return asyncio.run(run())


def _row(name: str, result: dict[str, float]) -> str:
    per_token = result["commands"] / result["tokens"]
    xread = result["xread"] / result["tokens"]
    return (
        f"| {name} | {result['exact']:,.0f} of {result['clients']:,.0f} | "
        f"{result['p50']:.1f} ms | {result['p99']:.1f} ms | {per_token:.2f} ({xread:.2f} XREAD) | "
        f"{result['kb_per_client']:.1f} kB |"
    )


def _more_open_files() -> None:
    """Raise this process's open-file limit (the gateway it starts inherits it): every client
    is a socket here and one in the gateway."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = CLIENTS * 2 + 1024
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))


def main() -> None:
    _more_open_files()
    started = datetime.now(UTC)
    with rig() as rig_, gateway(rig_) as (process, port):
        version = str(rig_.redis.info("server")["redis_version"])
        few = watch(rig_, port, process.pid, FEW, 1)
        many = watch(rig_, port, process.pid, CLIENTS, 1)
        spread = watch(rig_, port, process.pid, CLIENTS // JOBS, JOBS)
    mode = " (quick mode: BENCH_QUICK=1, small sizes)" if QUICK else ""
    out = [
        f"## Gateway{mode}: {started:%Y-%m-%d %H:%M} UTC",
        "",
        describe(version),
        "",
        f"One gateway process; jobs of {TOKENS} tokens at {PACE} tokens/s from the fake model, "
        "one worker; clients are raw sockets in the benchmark's process (`bench.sse_clients`). "
        "Delay: from the XADD of an entry (its id's time) to a client having the event.",
        "",
        "| clients | exact text | delay p50 | delay p99 | Redis commands per token | "
        "gateway memory per client |",
        "|---|---|---|---|---|---|",
        _row(f"{FEW} on one job", few),
        _row(f"{CLIENTS:,} on one job", many),
        _row(f"{CLIENTS:,} over {JOBS} jobs ({CLIENTS // JOBS} each)", spread),
        "",
        "Redis commands per token count every command Redis ran while the jobs streamed: most "
        "are the worker's own (its appends, leases, RQ's bookkeeping); the gateway's part is "
        "its XREADs (one read brings the new entries of every watched stream) and, per stream, "
        "an existence check when it idles. Each client costs a few commands when it joins "
        "(not counted here: they connect before the job starts), none per token. Memory per "
        "client: the gateway's resident memory with the clients connected, less before, over "
        "their number (the rows run in order, and a later row reuses memory an earlier one "
        "freed, so the first row with many clients is the one to read).",
    ]
    record("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
