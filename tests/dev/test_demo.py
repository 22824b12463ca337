"""The demo: it starts what is missing, streams one generation, and stops what it started."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from support.scripts import ScriptedLLM
from support.sse import read_all, text_of

from tokenrelay import Settings
from tokenrelay.dev.demo import run_demo
from tokenrelay.dev.processes import free_port


def listening(port: int) -> bool:
    """Whether something accepts connections on 127.0.0.1:port."""
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_the_demo_command_streams_a_generation_with_its_consumers(
    env: dict[str, str], llm: ScriptedLLM, tmp_path: Path
) -> None:
    """`tokenrelay demo` prints the text, the recorder's transcript, a metric and a summary."""
    model = llm.script(["Streams ", "are ", "durable ", "logs."])
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "tokenrelay",
            "demo",
            "What is a stream?",
            "--max-tokens",
            "10",
            "--transcripts",
            str(tmp_path),
        ],
        env={**env, "TOKENRELAY_MODEL": model},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "Streams are durable logs." in done.stdout
    assert "finished (stop): 4 tokens" in done.stderr
    assert "open this link in two browser tabs" in done.stderr
    [transcript] = tmp_path.glob("*.txt")
    assert transcript.read_text() == "Streams are durable logs."
    assert f'tokenrelay_jobs_finished_total{{model="{model}"}} 1.0' in done.stderr


def test_the_demo_link_shows_the_generation_while_the_demo_stays_up(
    env: dict[str, str], llm: ScriptedLLM, tmp_path: Path
) -> None:
    """With --stay, the printed link's job streams from the gateway until Ctrl-C stops all."""
    model = llm.script(["Open ", "me ", "twice."])
    demo = subprocess.Popen(
        [sys.executable, "-m", "tokenrelay", "demo", "Hi", "--stay",
         "--transcripts", str(tmp_path)],
        env={**env, "TOKENRELAY_MODEL": model}, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert demo.stderr is not None
    lines = []
    for line in demo.stderr:
        lines.append(line)
        if "Ctrl-C stops everything" in line:
            break
    err = "".join(lines)
    link = err.split("open this link in two browser tabs to watch it:\n[demo]     ")[1].split()[0]
    base, _, fragment = link.partition("/watch/")
    job_id, _, token = fragment.partition("#token=")
    events = read_all(f"{base}/v1/jobs/{job_id}/events?token={token}")
    assert text_of(events) == "Open me twice."
    key = err.split("with the API key ")[1].split()[0]
    more = httpx.post(
        f"{base}/v1/jobs", json={"prompt": "x"}, headers={"Authorization": f"Bearer {key}"}
    )
    assert more.status_code == 201
    demo.send_signal(signal.SIGINT)
    assert demo.wait(timeout=60) == 0
    demo.stderr.close()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{base}/healthz", timeout=2)  # the gateway was stopped with the rest


def test_the_demo_starts_a_private_redis_when_none_is_configured_or_running(
    settings: Settings, llm: ScriptedLLM, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """With no Redis URL and nothing on the default address, it runs its own and stops it."""
    nobody_home = free_port()
    demo_settings = Settings(
        openai_base_url=settings.openai_base_url,
        openai_api_key=settings.openai_api_key,
        model=llm.script(["private ", "redis"]),
        llm_max_retries=0,
    )
    code = run_demo(
        demo_settings,
        prompt="hi",
        max_tokens=5,
        transcripts=tmp_path,
        default_redis_url=f"redis://127.0.0.1:{nobody_home}/0",
    )
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "private redis" in out.out
    assert "started a private one at redis://127.0.0.1:" in out.err
    port = int(out.err.split("started a private one at redis://127.0.0.1:")[1].split("/")[0])
    assert not listening(port)


def test_with_no_model_configured_the_demo_runs_the_local_model_and_stops_it(
    env: dict[str, str], tmp_path: Path
) -> None:
    """No API key and no base URL: the demo serves the bundled model, streams it, stops it."""
    offline = {k: v for k, v in env.items() if not k.startswith("OPENAI_")}
    done = subprocess.run(
        [sys.executable, "-m", "tokenrelay", "demo", "What is the capital of France?",
         "--max-tokens", "16", "--transcripts", str(tmp_path)],
        env=offline, capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "starting the local gemma-3-270m" in done.stderr
    answer = done.stdout.split("> What is the capital of France?", 1)[1].strip()
    assert answer
    assert "###" not in answer
    assert "<start_of" not in answer
    assert "finished (" in done.stderr
    started = next(json.loads(line) for line in done.stderr.splitlines() if '"llm.started"' in line)
    assert not Path(f"/proc/{started['pid']}").exists()  # the model server was stopped


def test_a_model_server_that_dies_is_reported_with_its_signal_and_log(
    env: dict[str, str], tmp_path: Path
) -> None:
    """The local model crashing (a SIGSEGV sent to it here) is said plainly, with its log."""
    offline = {k: v for k, v in env.items() if not k.startswith("OPENAI_")}
    demo = subprocess.Popen(
        [sys.executable, "-m", "tokenrelay", "demo", "Write a long story.",
         "--max-tokens", "400", "--transcripts", str(tmp_path)],
        env=offline, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert demo.stderr is not None
    lines = []
    for line in demo.stderr:
        lines.append(line)
        if '"llm.started"' in line:
            os.kill(json.loads(line)["pid"], signal.SIGSEGV)
            break
    rest = demo.communicate(timeout=180)[1]
    err = "".join(lines) + rest
    assert demo.returncode == 1, err
    assert "the local model server died: it was killed by signal 11 (SIGSEGV)" in err
    assert "its log ends:" in err
