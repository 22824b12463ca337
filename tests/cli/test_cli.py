"""The `tokenrelay` command line, run as a user runs it: a separate process."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from redis import Redis
from support.scripted_openai import ScriptedOpenAI
from support.scripts import ScriptedLLM
from support.workers import Workers

from tokenrelay import JobState, Relay, TokenEntry
from tokenrelay.cli.parser import parser
from tokenrelay.dev.processes import free_port


def cli(
    env: dict[str, str], *args: str, stdin: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run `python -m tokenrelay ARGS` to completion."""
    return subprocess.run(
        [sys.executable, "-m", "tokenrelay", *args],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_submit_prints_the_job_id_and_queues_the_job(env: dict[str, str], relay: Relay) -> None:
    """`submit PROMPT` prints only the new job's id on stdout."""
    done = cli(env, "submit", "Explain Redis streams", "--max-tokens", "20", "--meta", "k=v")
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.strip()
    assert relay.job(job_id).status() is JobState.QUEUED


def test_submit_reads_the_prompt_from_stdin(env: dict[str, str], relay: Relay) -> None:
    """`submit -` takes the prompt from standard input."""
    done = cli(env, "submit", "-", stdin="a prompt from a pipe\n")
    assert done.returncode == 0, done.stderr
    assert relay.job(done.stdout.strip()).status() is JobState.QUEUED


def test_submit_follow_streams_the_text(
    env: dict[str, str], llm: ScriptedLLM, workers: Workers
) -> None:
    """`submit --follow` prints the id on stderr and the generated text on stdout."""
    workers.start()
    model = llm.script(["Streams ", "are ", "logs."])
    done = cli(env, "submit", "--follow", "--model", model, "--system", "be brief", "what?")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "Streams are logs.\n"
    assert len(done.stderr.strip().splitlines()[-1]) == 32  # the generated job id


def test_submit_follow_exits_non_zero_with_the_error(
    env: dict[str, str], llm: ScriptedLLM, workers: Workers
) -> None:
    """A failed generation makes `--follow` exit 1 and print the error type and message."""
    workers.start()
    done = cli(env, "submit", "-f", "--model", llm.script(status=500), "hi")
    assert done.returncode == 1
    assert "failed: OpenAIAPIError" in done.stderr
    assert "Traceback" not in done.stderr


def test_submit_file_queues_a_batch_with_progress_and_writes_the_ids(
    env: dict[str, str], relay: Relay, tmp_path: Path
) -> None:
    """`--file` takes JSON Lines (strings or objects), reports progress, and writes the ids."""
    batch = tmp_path / "prompts.jsonl"
    lines = [json.dumps(f"prompt {i}") for i in range(1200)]
    lines.append(json.dumps({"prompt": "with options", "max_tokens": 5, "job_id": "named"}))
    batch.write_text("\n".join(lines) + "\n\n")
    ids = tmp_path / "ids.txt"
    done = cli(env, "submit", "--file", str(batch), "--ids-out", str(ids))
    assert done.returncode == 0, done.stderr
    written = ids.read_text().splitlines()
    assert len(written) == 1201
    assert written[-1] == "named"
    assert relay.queue.count == 1201
    assert "submitted 1,201/1,201 (100%" in done.stderr


def test_a_bad_line_in_a_batch_file_is_named_and_nothing_is_queued(
    env: dict[str, str], redis_client: Redis, tmp_path: Path
) -> None:
    """The batch is checked first: a bad line gives exit 2, its line number, and an empty queue."""
    batch = tmp_path / "prompts.jsonl"
    batch.write_text('"fine"\n{"prompt": "x", "max_tokens": 0}\n')
    done = cli(env, "submit", "--file", str(batch))
    assert done.returncode == 2
    assert "item 1: max_tokens must be between" in done.stderr
    batch.write_text('"fine"\n{"prompt": "x", "colour": "red"}\n')
    done = cli(env, "submit", "--file", str(batch))
    assert done.returncode == 2
    assert "prompts.jsonl:2: unknown field 'colour'" in done.stderr
    assert redis_client.dbsize() == 0


def test_bad_input_exits_2_with_a_clear_message(env: dict[str, str], redis_client: Redis) -> None:
    """An invalid request is refused with exit code 2 and one line, not a traceback."""
    done = cli(env, "submit", "   ")
    assert done.returncode == 2
    assert done.stderr == (
        "tokenrelay: invalid request: the prompt is empty: "
        "give at least one non-blank user message\n"
    )
    assert redis_client.dbsize() == 0


def test_an_unreachable_redis_is_one_line_naming_the_url(env: dict[str, str]) -> None:
    """With Redis down, the command says which URL it could not reach and exits 1."""
    url = f"redis://127.0.0.1:{free_port()}/0"
    done = cli(env, "--redis-url", url, "submit", "hello")
    assert done.returncode == 1
    assert done.stderr.startswith(f"tokenrelay: cannot reach Redis at {url}")
    assert "Traceback" not in done.stderr


def test_worker_burst_drains_the_queue_and_exits(
    env: dict[str, str], relay: Relay, llm: ScriptedLLM
) -> None:
    """`worker --burst` runs every queued job, then exits 0."""
    handles = relay.submit_many([{"prompt": "p", "model": llm.script(["ok"])} for _ in range(3)])
    done = cli(env, "worker", "--burst")
    assert done.returncode == 0, done.stderr
    assert [h.text(timeout=5) for h in handles] == ["ok", "ok", "ok"]


def test_watch_prints_the_text_and_exits_0(
    env: dict[str, str], relay: Relay, llm: ScriptedLLM, workers: Workers
) -> None:
    """`watch JOB_ID` replays from the start and exits 0 on `end`."""
    handle = relay.submit("hi", model=llm.script(["one ", "two ", "three"]))
    workers.run_burst()
    done = cli(env, "watch", handle.job_id)
    assert (done.returncode, done.stdout) == (0, "one two three\n")


def test_watch_resumes_after_an_entry_id(
    env: dict[str, str], relay: Relay, llm: ScriptedLLM, workers: Workers
) -> None:
    """`watch --from ENTRY_ID` prints only what came after that entry."""
    handle = relay.submit("hi", model=llm.script(["one ", "two ", "three"]))
    workers.run_burst(env={"TOKENRELAY_TOKENS_PER_ENTRY": "1"})  # an entry per token
    first_token = next(r for r in handle.records(timeout=5) if isinstance(r.entry, TokenEntry))
    done = cli(env, "watch", handle.job_id, "--from", first_token.id)
    assert (done.returncode, done.stdout) == (0, "two three\n")


def test_watch_live_on_an_ended_job_prints_nothing_and_exits(
    env: dict[str, str], relay: Relay, llm: ScriptedLLM, workers: Workers
) -> None:
    """`watch --live` after the end has no new tokens to show, and does not hang."""
    handle = relay.submit("hi", model=llm.script(["one"]))
    workers.run_burst()
    done = cli(env, "watch", "--live", handle.job_id)
    assert (done.returncode, done.stdout) == (0, "\n")


def test_watch_exits_1_on_an_error_entry(
    env: dict[str, str], relay: Relay, llm: ScriptedLLM, workers: Workers
) -> None:
    """`watch` of a failed job prints the error and exits non-zero."""
    handle = relay.submit("hi", model=llm.script(["partial"], fault="cut"))
    workers.run_burst()
    done = cli(env, "watch", handle.job_id)
    assert done.returncode == 1
    assert done.stdout == "partial\n"
    assert f"job {handle.job_id} failed: TruncatedStreamError" in done.stderr


def test_watch_of_an_unknown_job_says_so(env: dict[str, str], redis_client: Redis) -> None:
    """A job id that does not exist is reported, instead of waiting forever."""
    done = cli(env, "watch", "nope")
    assert done.returncode == 1
    assert done.stderr == "tokenrelay: no job 'nope' (it may have expired)\n"


def test_watch_defuses_terminal_control_sequences(
    env: dict[str, str], relay: Relay, llm: ScriptedLLM, workers: Workers
) -> None:
    """Escape sequences and other controls in model output never reach the terminal raw."""
    tokens = ["\x1b[31mred", "\x1b]0;title\x07", " bell\x07", " back\x08", "\r\n", "bidi\u202e"]
    handle = relay.submit("hi", model=llm.script(tokens))
    workers.run_burst()
    done = cli(env, "watch", handle.job_id)
    assert done.returncode == 0
    assert not any(c in done.stdout for c in "\x1b\x07\x08\r\u202e")
    assert done.stdout == "\ufffd[31mred\ufffd]0;title\ufffd bell\ufffd back\ufffd\nbidi\ufffd\n"
    assert handle.text(timeout=5) == "".join(tokens)  # the stream itself is untouched


def test_several_watchers_in_separate_processes_see_the_same_text(
    env: dict[str, str],
    relay: Relay,
    llm: ScriptedLLM,
    workers: Workers,
    llm_server: ScriptedOpenAI,
) -> None:
    """Three `watch` processes, one joining mid-stream, all print the complete text."""
    words = [f" w{i}" for i in range(30)]
    handle = relay.submit("count", model=llm.script(words, stall_after=15))
    command = [sys.executable, "-m", "tokenrelay", "watch", handle.job_id]
    early = [
        subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True) for _ in range(2)
    ]
    workers.start()
    assert llm_server.wait_stalled(timeout=30)
    late = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)
    llm_server.release()
    outputs = [p.communicate(timeout=60)[0] for p in [*early, late]]
    assert outputs == ["".join(words) + "\n"] * 3


def test_ctrl_c_stops_watch_cleanly(
    env: dict[str, str], relay: Relay, llm: ScriptedLLM, workers: Workers
) -> None:
    """SIGINT during `watch` exits 130 with a short note instead of a traceback."""
    handle = relay.submit("hi", model=llm.script(["a", "b"], stall_after=1))
    workers.start()
    command = [sys.executable, "-m", "tokenrelay", "watch", handle.job_id]
    watcher = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert watcher.stdout is not None
    assert watcher.stdout.read(1) == b"a"  # it is following the job
    watcher.send_signal(signal.SIGINT)
    _, stderr = watcher.communicate(timeout=30)
    assert watcher.returncode == 130
    assert b"interrupted" in stderr
    assert b"Traceback" not in stderr


def test_cancel_ends_a_job(env: dict[str, str], relay: Relay) -> None:
    """`cancel JOB_ID` ends a queued job and says so; a second cancel says it had ended."""
    handle = relay.submit("hi")
    first = cli(env, "cancel", handle.job_id)
    assert (first.returncode, first.stdout) == (0, f"{handle.job_id}: cancelled\n")
    again = cli(env, "cancel", handle.job_id)
    assert again.stdout == f"{handle.job_id}: had already ended\n"
    assert handle.status() is JobState.CANCELLED


@pytest.mark.parametrize(
    "command",
    ["submit", "watch", "cancel", "worker", "demo", "record", "metrics", "status", "llm serve"],
)
def test_every_command_has_help(command: str) -> None:
    """Each subcommand explains itself with --help."""
    with pytest.raises(SystemExit) as exit_:
        parser().parse_args([*command.split(), "--help"])
    assert exit_.value.code == 0


def test_python_dash_m_runs_the_cli(env: dict[str, str]) -> None:
    """`python -m tokenrelay --help` lists the commands."""
    done = cli(env, "--help")
    assert done.returncode == 0
    for command in ("submit", "watch", "cancel", "worker", "demo"):
        assert command in done.stdout


def test_the_metrics_command_serves_prometheus_text_and_stops_on_sigterm(
    env: dict[str, str], relay: Relay, llm: ScriptedLLM, workers: Workers
) -> None:
    """`tokenrelay metrics` answers scrapes over HTTP and exits 0 on SIGTERM."""
    import time
    import urllib.request

    handle = relay.submit("hi", model=llm.script(["a", "b"]))
    workers.run_burst()
    port = free_port()
    command = [sys.executable, "-m", "tokenrelay", "metrics", "--port", str(port),
               "--interval", "0"]  # fmt: skip
    metrics = subprocess.Popen(command, env=env, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/metrics"
    deadline = time.monotonic() + 30
    while True:  # until the aggregator has counted the finished job
        try:
            body = urllib.request.urlopen(url, timeout=5).read().decode()
        except OSError:
            body = ""
        if 'tokenrelay_jobs_finished_total{model="' in body or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    metrics.send_signal(signal.SIGTERM)
    assert metrics.wait(timeout=30) == 0
    assert handle.result(timeout=5).end.tokens == 2
    assert "tokenrelay_jobs_finished_total" in body
    assert "tokenrelay_consumer_lag_events" in body
