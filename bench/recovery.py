"""How long tokenrelay takes to recover from each fault, with its shipped settings.

Run from the repository root: `python -m bench.recovery` (in `make bench`). Real processes
throughout: a private redis-server with its append-only file on, the fake model of
`bench.model_server`, and worker processes. Each fault is the real thing, and each figure is
read from the stream as a reader sees it:

1. Redis stopped for 5 s and for 30 s mid-stream and started again on the same port: from
   Redis answering again to the next token a reader has, and whether the worker lived on.
2. A worker SIGKILLed mid-stream, with an idle worker alive: from the kill to the next token.
3. A model that stalls mid-answer: from its last token to the new attempt (the stall timeout),
   and to the next token.

Records a section in bench/RESULTS.md.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from datetime import UTC, datetime

from bench.machine import describe
from bench.report import record
from bench.rig import Rig, rig
from tokenrelay import Relay, Settings, TokenEntry
from tokenrelay.connection import connect
from tokenrelay.dev.redis_server import RedisServer
from tokenrelay.stream.protocol import AttemptEntry, Record

#: Paced long enough to outlast every fault.
PACED = "tok3000-20"


def _first(records: Iterator[Record], kind: type) -> tuple[Record, float]:
    """The next record of `kind`, and when (time.monotonic()) the reader had it."""
    for found in records:
        if isinstance(found.entry, kind):
            return found, time.monotonic()
    raise RuntimeError(f"the stream ended without a {kind.__name__}")


def _tokens(records: Iterator[Record], count: int) -> None:
    seen = 0
    while seen < count:
        found, _ = _first(records, TokenEntry)
        assert isinstance(found.entry, TokenEntry)
        seen += found.entry.count


def redis_outage(rig_: Rig, seconds: float) -> dict[str, float]:
    """A Redis of its own, with AOF, stopped mid-stream for `seconds`."""
    with RedisServer(appendonly=True) as server:
        env = {**rig_.env, "TOKENRELAY_REDIS_URL": server.url}
        client = connect(server.url)
        relay = Relay(client, Settings.from_env(env))
        with Rig(client, server.url, rig_.model_url, env).worker() as worker:
            handle = relay.submit("go", model=PACED, max_tokens=3000)
            records = iter(handle.records(timeout=600))
            _tokens(records, 20)
            server.stop(keep_data=True)
            time.sleep(seconds)  # the outage
            server.start()
            back = time.monotonic()
            _, resumed = _first(records, TokenEntry)
            alive = worker.poll() is None
            handle.cancel()
        client.close()
    return {"first_token_after_s": resumed - back, "worker_alive": float(alive)}


def dead_worker(rig_: Rig) -> dict[str, float]:
    """SIGKILL a worker mid-stream while another, idle, is alive."""
    relay = rig_.relay()
    with rig_.worker() as doomed:
        handle = relay.submit("go", model=PACED, max_tokens=3000)
        records = iter(handle.records(timeout=600))
        _tokens(records, 20)
        with rig_.worker():
            killed = time.monotonic()
            doomed.send_signal(signal.SIGKILL)
            doomed.wait()
            _, attempt_at = _first(records, AttemptEntry)
            _, token_at = _first(records, TokenEntry)
            handle.cancel()
    rig_.flush()
    return {"attempt_s": attempt_at - killed, "next_token_s": token_at - killed}


def stalled_model(rig_: Rig) -> dict[str, float]:
    """A model that goes silent after 20 tokens, with the shipped stall timeout."""
    relay = rig_.relay()
    with rig_.worker():
        handle = relay.submit("go", model="tok200-20-stall20", max_tokens=200)
        records = iter(handle.records(timeout=600))
        _tokens(records, 20)
        last = time.monotonic()
        _, attempt_at = _first(records, AttemptEntry)
        _, token_at = _first(records, TokenEntry)
        handle.cancel()
    rig_.flush()
    return {"attempt_s": attempt_at - last, "next_token_s": token_at - last}


def main() -> None:
    """Run every fault once and record a section in bench/RESULTS.md."""
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    with rig() as rig_:
        version = rig_.redis.info("server")["redis_version"]
        short, long = redis_outage(rig_, 5), redis_outage(rig_, 30)
        dead = dead_worker(rig_)
        stall = stalled_model(rig_)
    rows = [
        f"| Redis stopped 5 s mid-stream (AOF), restarted | {short['first_token_after_s']:.2f} s "
        f"from Redis back to the next token a reader has; worker alive: "
        f"{bool(short['worker_alive'])} |",
        f"| Redis stopped 30 s mid-stream (AOF), restarted | {long['first_token_after_s']:.2f} s "
        f"from Redis back to the next token a reader has; worker alive: "
        f"{bool(long['worker_alive'])} |",
        f"| worker SIGKILLed mid-stream, an idle worker alive | {dead['attempt_s']:.1f} s to the "
        f"new attempt, {dead['next_token_s']:.1f} s to the next token |",
        f"| model silent mid-answer | {stall['attempt_s']:.1f} s from its last token to the new "
        f"attempt, {stall['next_token_s']:.1f} s to the next token |",
    ]
    record(
        "\n".join(
            [
                f"## Recovery times, shipped settings: {when}\n",
                describe(version) + "\n",
                "`python -m bench.recovery`: lease 10 s, takeover 5 s after it lapses, stall "
                "timeout 20 s, a 20 tokens/s stream from the fake model.\n",
                "| fault | recovery |",
                "|---|---|",
                *rows,
            ]
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
