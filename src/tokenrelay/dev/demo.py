"""The demo: start whatever is missing (Redis, a model, a worker, the consumers, the gateway),
run one generation, show it live in the terminal and give the link that shows it in a browser."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from types import FrameType
from typing import IO

import redis

from tokenrelay.connection import connect
from tokenrelay.consumer.viewer import view
from tokenrelay.dev.local_model import MODEL_NAME, LocalModelServer
from tokenrelay.dev.processes import free_port, stop_process
from tokenrelay.dev.redis_server import RedisServer
from tokenrelay.errors import ConfigurationError, LocalModelError, RedisUnavailableError
from tokenrelay.gateway.auth import ReadTokens, hash_key, new_key
from tokenrelay.producer.relay import Relay
from tokenrelay.settings import DEFAULT_REDIS_URL, Settings, redact_url
from tokenrelay.stream.protocol import EndEntry
from tokenrelay.terminal import printable

_CONSUMER_WAIT = 10.0
_GATEWAY_WAIT = 30.0
_FINISHED = "tokenrelay_jobs_finished_total"


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _say(text: str) -> None:
    print(f"[demo] {text}", file=sys.stderr, flush=True)


def _redis_url(settings: Settings, stack: ExitStack, default_url: str) -> str:
    """The configured Redis, else one on the default address, else a private one."""
    if settings.redis_url:
        _say(f"redis: using {redact_url(settings.redis_url)} (TOKENRELAY_REDIS_URL)")
        return settings.redis_url
    try:
        connect(default_url).close()
    except RedisUnavailableError:
        server = stack.enter_context(RedisServer())
        _say(f"redis: none configured or running, started a private one at {server.url}")
        return server.url
    _say(f"redis: using the one running at {default_url}")
    return default_url


def _local_model(stack: ExitStack) -> LocalModelServer:
    """The local model server, started for the demo and stopped with it."""
    _say(f"model: no OPENAI_API_KEY or OPENAI_BASE_URL set, starting the local {MODEL_NAME}")
    try:
        server = stack.enter_context(LocalModelServer())
    except (ConfigurationError, LocalModelError) as exc:
        raise type(exc)(
            f"{exc}\nor set OPENAI_API_KEY (for OpenAI) or OPENAI_BASE_URL "
            "(for any OpenAI-compatible server: vLLM, llama.cpp, Ollama)"
        ) from None
    _say(f"model: {server.model} at {server.base_url} (llama.cpp, on this machine)")
    return server


def _llm_environment(settings: Settings, server: LocalModelServer | None) -> dict[str, str]:
    """The environment that points workers at a model: the configured one, else the local one."""
    if server is not None:
        return {
            "OPENAI_BASE_URL": server.base_url,
            "OPENAI_API_KEY": "",
            "TOKENRELAY_MODEL": server.model,
        }
    where = settings.openai_base_url or "the OpenAI API"
    _say(f"model: {settings.model} at {where}")
    return {
        "OPENAI_BASE_URL": settings.openai_base_url or "",
        "OPENAI_API_KEY": settings.openai_api_key.reveal(),
        "TOKENRELAY_MODEL": settings.model,
    }


@contextmanager
def _child(
    what: str, args: list[str], env: dict[str, str], log_file: IO[str]
) -> Iterator[subprocess.Popen[bytes]]:
    """A `tokenrelay ARGS` child process logging to `log_file`, stopped gracefully on exit."""
    process = subprocess.Popen(
        [sys.executable, "-m", "tokenrelay", "--log-format", "json", *args],
        env=env,
        stdout=log_file,
        stderr=log_file,
    )
    _say(f"{what}: started (pid {process.pid})")
    try:
        yield process
    finally:
        stop_process(process, grace=30)


def _gateway_port(settings: Settings) -> int:
    """The configured gateway port if it is free, else a free one."""
    with socket.socket() as sock:
        try:
            sock.bind((settings.gateway_host, settings.gateway_port))
        except OSError:
            return free_port()
    return settings.gateway_port


def _wait_for_gateway(url: str, process: subprocess.Popen[bytes]) -> None:
    """Wait until the gateway answers, or say it did not start."""
    deadline = time.monotonic() + _GATEWAY_WAIT
    while time.monotonic() < deadline and process.poll() is None:
        with suppress(OSError):
            # S310: the URL is our own gateway's, on this machine.
            urllib.request.urlopen(f"{url}/healthz", timeout=2).close()  # noqa: S310
            return
        time.sleep(0.1)
    raise ConfigurationError(f"the gateway did not start at {url}: see the log above")


def _gateway(
    settings: Settings, stack: ExitStack, env: dict[str, str], log_file: IO[str]
) -> tuple[str, ReadTokens, str]:
    """The gateway, with a fresh API key and signing secret; its URL, token maker and key."""
    key, secret = new_key(), secrets.token_hex(32)
    port = _gateway_port(settings)
    gateway_env = {
        **env,
        "TOKENRELAY_GATEWAY_API_KEYS": hash_key(key),
        "TOKENRELAY_GATEWAY_SECRET": secret,
    }
    args = ["serve", "--host", settings.gateway_host, "--port", str(port)]
    process = stack.enter_context(_child("gateway", args, gateway_env, log_file))
    url = f"http://{settings.gateway_host}:{port}"
    _wait_for_gateway(url, process)
    return url, ReadTokens(secret.encode(), settings.gateway_token_ttl), key


def _stay(url: str, key: str) -> None:
    """Keep everything up for the browser until Ctrl-C (or SIGTERM)."""
    _say(f"everything stays up: submit more at {url}/ with the API key {key}")
    _say(f"the ops page: {url}/ops (same key). Ctrl-C stops everything.")
    with suppress(KeyboardInterrupt):
        while True:
            time.sleep(3600)


def _consumers_report(job_id: str, transcripts: Path, metrics_url: str) -> None:
    """Wait briefly for the recorder and the aggregator to see the job; say what they saw."""
    deadline = time.monotonic() + _CONSUMER_WAIT
    meta = transcripts / f"{job_id}.json"
    finished = ""
    while time.monotonic() < deadline and not (meta.exists() and finished):
        with suppress(OSError):
            # S310: the URL is our own metrics consumer's, on loopback.
            body = urllib.request.urlopen(metrics_url, timeout=2).read().decode()  # noqa: S310
            finished = next((line for line in body.splitlines() if line.startswith(_FINISHED)), "")
        time.sleep(0.2)
    if meta.exists():
        _say(f"recorder: wrote {meta} and {meta.with_suffix('.txt')}")
    if finished:
        _say(f"metrics: {metrics_url} says {finished}")


def _summary(end: EndEntry) -> str:
    seconds = (end.duration_ms or 0) / 1000
    rate = f", {end.tokens / seconds:.1f} tokens/s" if seconds else ""
    ttft = f", first token after {end.ttft_ms:.0f} ms" if end.ttft_ms is not None else ""
    return f"finished ({end.finish_reason}): {end.tokens} tokens in {seconds:.2f} s{ttft}{rate}"


def run_demo(
    settings: Settings,
    *,
    prompt: str,
    max_tokens: int,
    transcripts: Path = Path("transcripts"),
    default_redis_url: str = DEFAULT_REDIS_URL,
    stay: bool = False,
) -> int:
    """Run the demo end to end; stops everything it started (with `stay`, on Ctrl-C once the
    generation is over, so that the browser can go on using the gateway). The exit code."""
    # SIGTERM and SIGHUP unwind like Ctrl-C, so that everything started here is stopped.
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupt)
    with ExitStack() as stack:
        url = _redis_url(settings, stack, default_redis_url)
        server = None if settings.llm_configured else _local_model(stack)
        env = {**os.environ, **_llm_environment(settings, server), "TOKENRELAY_REDIS_URL": url}
        log_file = stack.enter_context(
            tempfile.NamedTemporaryFile("w", prefix="tokenrelay-demo-", suffix=".log", delete=False)
        )
        _say(f"logs of the worker, the consumers and the gateway: {log_file.name}")
        port = free_port()
        stack.enter_context(_child("worker", ["worker"], env, log_file))
        recorder = ["record", "--dir", str(transcripts)]
        stack.enter_context(_child("recorder", recorder, env, log_file))
        metrics = ["metrics", "--port", str(port), "--interval", "0"]
        stack.enter_context(_child("metrics", metrics, env, log_file))
        site, tokens, key = _gateway(settings, stack, env, log_file)
        relay = stack.enter_context(Relay(connect(url), settings.with_overrides(redis_url=url)))
        handle = relay.submit(prompt, max_tokens=max_tokens)
        token, _ = tokens.mint(handle.job_id)
        _say(f"job {handle.job_id} submitted; open this link in two browser tabs to watch it:")
        _say(f"    {site}/watch/{handle.job_id}#token={token}")
        print(f"\n> {prompt}\n", flush=True)
        try:
            entry = view(handle, sys.stdout, timeout=settings.job_timeout)
        except (KeyboardInterrupt, redis.ConnectionError):
            handle.cancel()
            raise
        print(flush=True)
        _consumers_report(handle.job_id, transcripts, f"http://127.0.0.1:{port}/metrics")
        if isinstance(entry, EndEntry):
            _say(_summary(entry))
        else:
            _say(f"failed: {entry.error_type}: {printable(entry.message)}")
            if server is not None:
                server.check_alive()  # a crashed model server says how it died, with its log
        if stay:
            _stay(site, key)
        return 0 if isinstance(entry, EndEntry) else 1
    raise AssertionError("unreachable")  # pragma: no cover
