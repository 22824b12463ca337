"""The transcript recorder: one complete transcript per ended job, across crashes and peers."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from redis import Redis
from support.scripts import ScriptedLLM
from support.streams import redis_major
from support.workers import Workers

from tokenrelay import JobHandle, Relay, Settings, TokenEntry
from tokenrelay.consumer.group import Delivery, GroupConsumer
from tokenrelay.consumer.recorder import Recorder, write_once
from tokenrelay.stream.events import group_lags
from tokenrelay.stream.keys import RECORDER_GROUP, consumer_stats, stream_state
from tokenrelay.stream.protocol import Event, LifecycleEvent, parse_event


def record_once(env: dict[str, str], directory: Path, name: str = "catch-up") -> str:
    """Run `tokenrelay record --once`; its log."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "tokenrelay",
            "record",
            "--dir",
            str(directory),
            "--once",
            "--name",
            name,
            "--claim-after",
            "0",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stderr


def stream_text(handle: JobHandle) -> bytes:
    """The job's text as its stream holds it."""
    records = handle.records(timeout=5)
    return "".join(r.entry.text for r in records if isinstance(r.entry, TokenEntry)).encode()


def transcripts(directory: Path) -> dict[str, dict[str, Any]]:
    """The metadata of every transcript in `directory`, by job id."""
    return {p.stem: json.loads(p.read_text()) for p in directory.glob("*.json")}


def assert_complete(directory: Path, handles: list[JobHandle]) -> None:
    """Every job has exactly one transcript pair whose text is byte-identical to its stream."""
    assert sorted(p.name for p in directory.iterdir()) == sorted(
        f"{h.job_id}{suffix}" for h in handles for suffix in (".json", ".txt")
    )
    for handle in handles:
        text = (directory / f"{handle.job_id}.txt").read_bytes()
        assert text == stream_text(handle)
        meta = json.loads((directory / f"{handle.job_id}.json").read_text())
        assert meta["text_bytes"] == len(text)


def test_finished_failed_and_cancelled_jobs_each_get_a_transcript(
    env: dict[str, str], relay: Relay, llm: ScriptedLLM, workers: Workers, tmp_path: Path
) -> None:
    """The text file holds the stream's text; the metadata says how the job ended."""
    ok = relay.submit("hello", model=llm.script(["Hi", " there", " ✓"]), max_tokens=9)
    bad = relay.submit("oops", model=llm.script(["par", "tial"], fault="cut"))
    cancelled = relay.submit("never", model=llm.script(["x"]))
    cancelled.cancel()
    workers.run_burst()
    directory = tmp_path / "transcripts"
    record_once(env, directory)
    assert_complete(directory, [ok, bad, cancelled])
    meta = transcripts(directory)
    assert (directory / f"{ok.job_id}.txt").read_text() == "Hi there ✓"
    assert meta[ok.job_id]["status"] == "finished"
    assert meta[ok.job_id]["finish_reason"] == "stop"
    assert meta[ok.job_id]["model"].endswith("-1")
    assert meta[ok.job_id]["prompt_chars"] == 5
    assert meta[ok.job_id]["max_tokens"] == 9
    assert meta[ok.job_id]["usage"]["completion_tokens"] == 3
    assert meta[ok.job_id]["timings_ms"]["time_to_first_token"] > 0
    first, *_, last = list(ok.records(timeout=5))
    assert (meta[ok.job_id]["first_entry_id"], meta[ok.job_id]["last_entry_id"]) == (
        first.id,
        last.id,
    )
    assert meta[bad.job_id]["status"] == "failed"
    assert meta[bad.job_id]["error"]["type"] == "TruncatedStreamError"
    assert (directory / f"{bad.job_id}.txt").read_text() == "partial"
    assert meta[cancelled.job_id]["status"] == "cancelled"
    assert meta[cancelled.job_id]["tokens"] == 0


def test_a_recorder_killed_mid_run_resumes_and_loses_or_doubles_nothing(
    env: dict[str, str], relay: Relay, llm: ScriptedLLM, workers: Workers, tmp_path: Path
) -> None:
    """SIGKILL a recorder while jobs stream, start it again: every job has one exact transcript."""
    directory = tmp_path / "t"
    command = [
        sys.executable,
        "-m",
        "tokenrelay",
        "record",
        "--dir",
        str(directory),
        "--name",
        "rec-1",
    ]
    handles = [
        relay.submit(f"p{i}", model=llm.script([f"job {i}", " says", " hi"], token_delay=0.02))
        for i in range(12)
    ]
    recorder = subprocess.Popen(command, env=env, stderr=subprocess.DEVNULL)
    for _ in range(2):
        workers.start()
    handles[3].text(timeout=60)  # jobs are streaming and some have ended
    recorder.send_signal(signal.SIGKILL)
    recorder.wait()
    restarted = subprocess.Popen(command, env=env, stderr=subprocess.DEVNULL)
    for handle in handles:
        handle.text(timeout=60)
    record_once(env, directory, name="rec-1")  # as the restarted one would, to the end
    restarted.send_signal(signal.SIGTERM)
    assert restarted.wait(timeout=30) == 0
    assert_complete(directory, handles)


def test_two_recorders_share_the_work_and_write_each_job_once(
    env: dict[str, str], relay: Relay, llm: ScriptedLLM, workers: Workers, tmp_path: Path
) -> None:
    """Two recorders in one group: each ended job is written once, by one of them."""
    directory = tmp_path / "shared"
    recorders = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tokenrelay",
                "record",
                "--dir",
                str(directory),
                "--name",
                f"rec-{i}",
            ],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    handles = [
        relay.submit(f"p{i}", model=llm.script([f"t{i}"], token_delay=0.05)) for i in range(10)
    ]
    workers.start()
    workers.start()
    for handle in handles:
        handle.text(timeout=60)
    record_once(env, directory, name="rec-0")
    logs = []
    for recorder in recorders:
        recorder.send_signal(signal.SIGINT)
        _, err = recorder.communicate(timeout=30)
        assert recorder.returncode == 0
        logs += [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    written = [line["job_id"] for line in logs if line["event"] == "transcript.written"]
    assert sorted(written) == sorted({*written})  # no job written twice
    assert_complete(directory, handles)


def test_a_crash_between_writing_and_acknowledging_rewrites_nothing(
    relay: Relay, llm: ScriptedLLM, workers: Workers, redis_client: Redis, tmp_path: Path
) -> None:
    """Files written but the event not acknowledged: the redelivery keeps the files as they are."""
    handle = relay.submit("hi", model=llm.script(["stable"]))
    workers.run_burst()
    directory = tmp_path / "t"
    recorder = Recorder(redis_client, directory)
    [(entry_id, fields)] = [
        (i, f)
        for i, f in redis_client.xrange("tokenrelay:events")
        if parse_event(f).event is Event.FINISHED
    ]
    with redis_client.pipeline() as never_executed:  # the process dies before EXEC
        recorder(Delivery(entry_id.decode(), parse_event(fields)), never_executed)
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in directory.iterdir()}
    GroupConsumer(redis_client, RECORDER_GROUP, "r").run_until_idle(recorder)
    after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in directory.iterdir()}
    assert before == after
    assert sorted(before) == [f"{handle.job_id}.json", f"{handle.job_id}.txt"]


def test_an_expired_stream_is_reported_not_skipped_silently(
    env: dict[str, str],
    relay: Relay,
    llm: ScriptedLLM,
    workers: Workers,
    redis_client: Redis,
    tmp_path: Path,
) -> None:
    """A job whose stream is gone before the recorder reads it is logged and counted."""
    handle = relay.submit("hi", model=llm.script(["gone"]))
    workers.run_burst()
    redis_client.delete(handle.stream_key)  # as if its TTL ran out
    log = record_once(env, tmp_path / "t")
    missing = [json.loads(line) for line in log.splitlines() if "stream_missing" in line]
    assert [m["job_id"] for m in missing] == [handle.job_id]
    assert redis_client.hget(consumer_stats(RECORDER_GROUP), "streams_missing") == b"1"
    assert list((tmp_path / "t").iterdir()) == []


def test_lifecycle_events_trimmed_before_reading_are_reported(
    relay: Relay, redis_client: Redis, tmp_path: Path
) -> None:
    """Events dropped by the lifecycle stream's MAXLEN before a recorder read them are counted."""
    consumer = GroupConsumer(redis_client, RECORDER_GROUP, "r")
    consumer.ensure_group()
    relay.submit_many(["a", "b", "c"])
    redis_client.xtrim("tokenrelay:events", maxlen=1, approximate=False)
    version = redis_major(redis_client)
    lost = consumer.check_trimmed()
    assert lost == (2 if version >= 7 else 0)  # Redis 6 does not count what it trimmed
    if lost:
        assert redis_client.hget(consumer_stats(RECORDER_GROUP), "events_trimmed") == b"2"
        assert consumer.check_trimmed() == 0  # reported once
    assert consumer.run_until_idle(Recorder(redis_client, tmp_path)) == 1


def test_events_trimmed_after_a_group_has_read_some_are_reported_once(
    relay: Relay, redis_client: Redis, tmp_path: Path
) -> None:
    """A group that fell behind and lost events to trimming counts exactly those, once."""
    consumer = GroupConsumer(redis_client, RECORDER_GROUP, "r")
    recorder = Recorder(redis_client, tmp_path)
    relay.submit_many(["a", "b"])
    assert consumer.run_until_idle(recorder) == 2
    relay.submit_many(["c", "d", "e", "f", "g"])
    redis_client.xtrim("tokenrelay:events", maxlen=2, approximate=False)  # c, d, e: unread
    version = redis_major(redis_client)
    assert consumer.run_until_idle(recorder) == 2
    trimmed = redis_client.hget(consumer_stats(RECORDER_GROUP), "events_trimmed")
    assert trimmed == (b"3" if version >= 7 else None)
    assert consumer.check_trimmed() == 0
    [lag] = [g for g in group_lags(redis_client) if g.group == RECORDER_GROUP]
    assert lag.lag in (0, None)


def test_a_recorder_stops_cleanly_on_sigterm(env: dict[str, str], tmp_path: Path) -> None:
    """SIGTERM ends an idle recorder promptly with exit code 0."""
    recorder = subprocess.Popen(
        [sys.executable, "-m", "tokenrelay", "record", "--dir", str(tmp_path)],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert recorder.stderr is not None
    while "consumer.started" not in recorder.stderr.readline():
        pass
    recorder.send_signal(signal.SIGTERM)
    _, rest = recorder.communicate(timeout=10)
    assert recorder.returncode == 0
    assert "consumer.stopped" in rest


def deliver(redis_client: Redis, recorder: Recorder, event: Event, job_id: str) -> None:
    """Hand the recorder one end-of-job event, as its consumer group would, and commit."""
    delivery = Delivery("1-0", LifecycleEvent(event, job_id, 1.0))
    with redis_client.pipeline() as pipe:
        recorder(delivery, pipe)
        pipe.execute()


def test_a_job_id_that_is_not_a_file_name_is_refused(redis_client: Redis, tmp_path: Path) -> None:
    """An event naming `../x` (anyone who can write to Redis could add one) writes nothing."""
    recorder = Recorder(redis_client, tmp_path / "t")
    deliver(redis_client, recorder, Event.FAILED, "../escaped")
    assert list(tmp_path.rglob("*escaped*")) == []
    assert redis_client.hget(consumer_stats(RECORDER_GROUP), "events_malformed") == b"1"


def test_a_malformed_stream_is_counted_and_does_not_stop_the_recorder(
    redis_client: Redis, tmp_path: Path
) -> None:
    """A stream entry that breaks the protocol is reported, and the event is acknowledged."""
    redis_client.xadd("tokenrelay:{bad}:tokens", {"kind": "telemetry"})
    recorder = Recorder(redis_client, tmp_path / "t")
    deliver(redis_client, recorder, Event.FINISHED, "bad")
    assert redis_client.hget(consumer_stats(RECORDER_GROUP), "streams_malformed") == b"1"
    assert list((tmp_path / "t").iterdir()) == []


def test_a_job_id_used_again_after_expiry_gets_its_own_transcript(
    relay: Relay, llm: ScriptedLLM, workers: Workers, redis_client: Redis, tmp_path: Path
) -> None:
    """When a caller reuses an expired job's id, the new job is recorded beside the old one."""
    recorder = Recorder(redis_client, tmp_path / "t")
    consumer = GroupConsumer(redis_client, RECORDER_GROUP, "r")
    first = relay.submit("one", model=llm.script(["first"]), job_id="reused")
    workers.run_burst()
    consumer.run_until_idle(recorder)
    redis_client.delete(first.stream_key, stream_state("reused"), "rq:job:reused")  # expired
    second = relay.submit("two", model=llm.script(["second"]), job_id="reused")
    workers.run_burst()
    consumer.run_until_idle(recorder)
    start_id = next(iter(second.records(timeout=5))).id
    assert (tmp_path / "t" / "reused.txt").read_text() == "first"
    assert (tmp_path / "t" / f"reused.{start_id}.txt").read_text() == "second"


def test_write_once_never_replaces_a_file(tmp_path: Path) -> None:
    """The first write creates the file; a second one with other content changes nothing."""
    target = tmp_path / "a.txt"
    assert write_once(target, b"first")
    assert not write_once(target, b"second")
    assert target.read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_a_stopped_recorder_never_slows_the_workers_it_only_builds_lag(
    env: dict[str, str], relay: Relay, llm: ScriptedLLM, workers: Workers,
    redis_client: Redis, tmp_path: Path,
) -> None:  # fmt: skip
    """SIGSTOP a recorder: jobs still finish, its lag shows, and after SIGCONT it catches up."""
    directory = tmp_path / "t"
    recorder = subprocess.Popen(
        [sys.executable, "-m", "tokenrelay", "record", "--dir", str(directory), "--name", "slow"],
        env=env, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert recorder.stderr is not None
    while "consumer.started" not in recorder.stderr.readline():
        pass
    recorder.send_signal(signal.SIGSTOP)
    handles = [relay.submit(f"p{i}", model=llm.script([f"t{i}"])) for i in range(5)]
    workers.run_burst()
    assert [h.text(timeout=5) for h in handles] == [f"t{i}" for i in range(5)]
    [lag] = [g for g in group_lags(redis_client) if g.group == RECORDER_GROUP]
    # submitted, started and finished for each job, all unread (Redis 6 cannot count lag)
    assert lag.lag == (15 if redis_major(redis_client) >= 7 else None)
    assert lag.pending == 0
    recorder.send_signal(signal.SIGCONT)
    for handle in handles:
        while not (directory / f"{handle.job_id}.json").exists():
            recorder.stderr.readline()  # wait on its log lines, not on a clock
    recorder.send_signal(signal.SIGTERM)
    recorder.communicate(timeout=30)
    assert_complete(directory, handles)


def test_events_the_hard_cap_drops_before_a_group_read_them_are_counted(
    redis_client: Redis, settings: Settings, tmp_path: Path
) -> None:
    """With the lifecycle stream at its hard cap, unread events it drops are counted and logged."""
    from structlog.testing import capture_logs

    consumer = GroupConsumer(redis_client, RECORDER_GROUP, "r")
    consumer.ensure_group()
    capped = Relay(redis_client, settings.with_overrides(events_max_len=100))
    for _ in range(10):
        capped.submit_many(["x"] * 100)
    length = redis_client.xlen("tokenrelay:events")
    assert length < 1000  # the cap bit (XADD MAXLEN ~ trims whole nodes, so about 100 stay)
    with capture_logs() as logs:
        handled = consumer.run_until_idle(Recorder(redis_client, tmp_path))
    assert handled == length
    if redis_major(redis_client) >= 7:  # Redis 6 does not count what it trims
        lost = int(redis_client.hget(consumer_stats(RECORDER_GROUP), "events_trimmed") or 0)
        assert lost == 1000 - length
        assert [e["events"] for e in logs if e["event"] == "consumer.events_trimmed_unread"] == [
            lost
        ]
