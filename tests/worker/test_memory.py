"""Memory does not grow with the length of a generation, in the worker or in the recorder."""

from __future__ import annotations

import time
import tracemalloc
from pathlib import Path
from typing import Any

from redis import Redis
from support.scripts import ScriptedLLM
from support.workers import Workers

from tokenrelay import EndEntry, Relay, StartEntry, TokenEntry
from tokenrelay.consumer.group import Delivery
from tokenrelay.consumer.recorder import Recorder
from tokenrelay.stream.keys import token_stream
from tokenrelay.stream.protocol import Event, LifecycleEvent, encode


def resident_kb(pid: int) -> int:
    """The process's resident memory, in kB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def tokens_written(client: Redis, job_id: str) -> int:
    """How many tokens the job's stream holds so far."""
    last: Any = client.xrevrange(token_stream(job_id), count=1)
    fields = last[0][1] if last else {}
    return int(fields[b"seq"]) + 1 if fields.get(b"kind") == b"token" else 0


def test_the_process_running_a_job_does_not_grow_with_its_tokens(
    relay: Relay, llm: ScriptedLLM, workers: Workers, redis_client: Redis
) -> None:
    """From 4,000 to 30,000 tokens, the generating process grows by its text and no more."""
    total = 32_000
    handle = relay.submit("long", model=llm.script([" x"] * total), max_tokens=total)
    worker = workers.start()
    samples: dict[str, int] = {}
    deadline = time.monotonic() + 120
    while "late" not in samples:
        assert time.monotonic() < deadline, "the generation is too slow"
        written = tokens_written(redis_client, handle.job_id)
        pid = worker.pid
        if written >= 4_000 and "early" not in samples and pid:
            samples["early"] = resident_kb(pid)
        if written >= 30_000 and pid:
            samples["late"] = resident_kb(pid)
        time.sleep(0.05)
    result = handle.result(timeout=120)
    assert result.end.tokens == total
    growth_kb = samples["late"] - samples["early"]
    # LangChain's own stream() keeps every chunk: about 3.4 kB a token, 88 MB here. What may
    # grow is the text (52 kB) and the allocator's noise; 120 kB was measured.
    assert growth_kb < 2_000, f"grew {growth_kb} kB over 26,000 tokens"


def test_the_recorder_reads_a_long_stream_in_pages(redis_client: Redis, tmp_path: Path) -> None:
    """Recording a 100,000-token stream allocates a few MB at most, not the whole stream."""
    key, tokens = token_stream("huge"), 100_000
    with redis_client.pipeline(transaction=False) as pipe:
        start = encode(StartEntry("huge", "m", 1, 1.0, 2.0, "w", tokens, 3))
        pipe.xadd(key, start)  # type: ignore[arg-type]
        for seq in range(tokens):
            pipe.xadd(key, encode(TokenEntry(seq, f" token{seq}")))  # type: ignore[arg-type]
        pipe.xadd(key, encode(EndEntry("length", tokens)))  # type: ignore[arg-type]
        pipe.execute()
    recorder = Recorder(redis_client, tmp_path)
    tracemalloc.start()
    try:
        with redis_client.pipeline() as pipe:
            recorder(Delivery("1-0", LifecycleEvent(Event.FINISHED, "huge", 1.0)), pipe)
            pipe.execute()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    text = (tmp_path / "huge.txt").read_text()
    assert text == "".join(f" token{seq}" for seq in range(tokens))
    assert peak < 8_000_000, f"peak {peak:,} bytes"  # the whole stream parsed is ~130 MB
