"""Shared reads and rough clients: one Redis read for many clients, slow and gone clients,
shutdown, and a Redis outage under open streams."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from redis import Redis
from support.gateway import GatewayProcess, start_gateway
from support.scripted_openai import ScriptedOpenAI
from support.scripts import ScriptedLLM
from support.sse import Event, parse, read_all, stream, text_of
from support.workers import Workers

from tokenrelay import EndEntry, StartEntry
from tokenrelay.connection import connect
from tokenrelay.dev.redis_server import RedisServer
from tokenrelay.stream.writer import StreamWriter

WORDS = [f" w{i}" for i in range(40)]


def wait_until(condition: Any, timeout: float = 30, what: str = "the condition") -> None:
    """Poll `condition()` until it is true, failing after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout} s"
        time.sleep(0.05)


def commands(client: Redis, name: str) -> int:
    """How many times Redis has run the command `name` so far."""
    stats: Any = client.info("commandstats")
    return int(stats.get(f"cmdstat_{name}", {}).get("calls", 0))


def test_many_clients_of_one_job_cost_redis_one_blocked_read(
    env: dict[str, str],
    tmp_path: Path,
    llm: ScriptedLLM,
    workers: Workers,
    llm_server: ScriptedOpenAI,
    redis_client: Redis,
) -> None:
    """Forty clients on one job: one XREAD blocked in Redis, and XREADs that do not grow."""
    gateway = start_gateway(env, tmp_path / "gw.log", TOKENRELAY_GATEWAY_STREAMS_PER_CLIENT="50")
    created = gateway.submit(prompt="x", model=llm.script(WORDS, stall_after=1, token_delay=0.02))
    workers.start()
    url = f"{gateway.url}{created['events_url']}"
    clients, texts, joined = 40, [], threading.Barrier(41)

    def follow() -> None:
        items = stream(url)
        seen = []
        for item in items:
            if isinstance(item, Event):
                seen.append(item)
                if item.event == "token":
                    joined.wait(timeout=60)
                    break
        seen += [e for e in items if isinstance(e, Event)]
        texts.append(text_of(seen))

    threads = [threading.Thread(target=follow) for _ in range(clients)]
    for thread in threads:
        thread.start()
    joined.wait(timeout=60)  # every client has the first token: all follow the live stream
    listed = redis_client.client_list()
    readers = [c for c in listed if c["name"] == "tokenrelay-gateway"]
    blocked = [c for c in listed if c["cmd"] == "xread"]
    assert len(readers) == 1
    assert [c["name"] for c in blocked] == ["tokenrelay-gateway"]
    before = commands(redis_client, "xread")
    llm_server.release()
    for thread in threads:
        thread.join(timeout=60)
    reads = commands(redis_client, "xread") - before
    gateway.stop()
    assert texts == ["".join(WORDS)] * clients
    assert reads <= len(WORDS) + 5  # about one per entry, not one per entry per client


def raw_events_request(url: str, path: str, receive_buffer: int) -> socket.socket:
    """A GET of an event stream on a socket with a small receive buffer, nothing read yet."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.connect((host, int(port)))
    sock.sendall(
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n\r\n".encode()
    )
    return sock


def write_big_stream(client: Redis, job_id: str, tokens: int, size: int) -> str:
    """A whole stream of `tokens` tokens of `size` characters each; its text."""
    writer = StreamWriter(client, job_id, ttl=600)
    writer.start(StartEntry(job_id, "m", 1, 1.0, 2.0, "w", tokens, 3, writer.writer_token))
    parts = [f"{i:06d}" + "x" * (size - 6) for i in range(tokens)]
    for part in parts:
        writer.token(part)
    writer.close(EndEntry("stop", tokens))
    return "".join(parts)


def read_raw(sock: socket.socket, timeout: float = 60) -> bytes:
    """Everything the server sends until it closes the connection."""
    sock.settimeout(timeout)
    chunks = []
    while chunk := sock.recv(1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def decode_chunked(raw: bytes) -> list[str]:
    """The lines of a chunked HTTP/1.1 response body."""
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    data = bytearray()
    while body:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        data += body[:size]
        body = body[size + 2 :]
    return data.decode().split("\n")


def test_a_slow_client_is_told_to_reconnect_and_resumes_without_a_gap(
    env: dict[str, str], tmp_path: Path, redis_client: Redis
) -> None:
    """A client that stops reading overflows its small queue, gets `reconnect`, and resumes."""
    gateway = start_gateway(env, tmp_path / "gw.log", TOKENRELAY_READER_QUEUE="8")
    try:
        writer = StreamWriter(redis_client, "slow", ttl=600)
        writer.start(StartEntry("slow", "m", 1, 1.0, 2.0, "w", 10, 3, writer.writer_token))
        path = "/v1/jobs/slow/events?token="
        sock = raw_events_request(gateway.url, path + _token(gateway, "slow"), 4096)
        wait_until(lambda: gateway_watches(gateway) == 1, what="the client's subscription")
        parts = [f"{i:06d}" + "x" * 8000 for i in range(1000)]  # 8 MB: more than buffers hold
        for part in parts:
            writer.token(part)
        writer.close(EndEntry("stop", len(parts)))
        with sock:
            first = list(parse(iter(decode_chunked(read_raw(sock)))))
        events = [e for e in first if isinstance(e, Event)]
        assert events[-1].event == "reconnect"
        assert events[-1].json["reason"] == "lagged"
        last_id = events[-1].json["after"]
        assert last_id == [e for e in events if e.event == "token"][-1].id
        rest = read_all(
            f"{gateway.url}{path}{_token(gateway, 'slow')}", headers={"Last-Event-ID": last_id}
        )
        assert text_of(events) + text_of(rest) == "".join(parts)
        assert rest[-1].event == "end"
        assert any(line["event"] == "gateway.client_lagged" for line in gateway.logs())
    finally:
        gateway.stop()


def test_a_client_that_never_reads_is_dropped_after_the_send_timeout(
    env: dict[str, str], tmp_path: Path, redis_client: Redis
) -> None:
    """A half-open client (nothing read) is cut off when a send blocks past the timeout."""
    gateway = start_gateway(env, tmp_path / "gw.log", TOKENRELAY_GATEWAY_SEND_TIMEOUT="1")
    try:
        writer = StreamWriter(redis_client, "stuck", ttl=600)
        writer.start(StartEntry("stuck", "m", 1, 1.0, 2.0, "w", 10, 3, writer.writer_token))
        path = "/v1/jobs/stuck/events?token=" + _token(gateway, "stuck")
        with raw_events_request(gateway.url, path, 4096):
            wait_until(lambda: gateway_watches(gateway) == 1, what="the client's subscription")
            for i in range(1000):
                writer.token(f"{i:06d}" + "x" * 8000)

            def dropped() -> bool:
                return any(line["event"] == "gateway.client_dropped" for line in gateway.logs())

            wait_until(dropped, what="the drop of the client")
            wait_until(lambda: gateway_watches(gateway) == 0, what="the end of its subscription")
    finally:
        gateway.stop()


def _token(gateway: GatewayProcess, job_id: str) -> str:
    from support.gateway import SECRET

    from tokenrelay.gateway.auth import ReadTokens

    return ReadTokens(SECRET.encode(), ttl=600).mint(job_id)[0]


def gateway_watches(gateway: GatewayProcess) -> int:
    """How many streams the gateway's shared reader reads now."""
    watched: int = httpx.get(f"{gateway.url}/healthz", timeout=10).json()["watched"]
    return watched


def test_shutdown_tells_open_streams_to_reconnect(
    gateway: GatewayProcess, llm: ScriptedLLM, workers: Workers, llm_server: ScriptedOpenAI
) -> None:
    """On SIGTERM every open stream gets `reconnect` (reason shutdown) and the gateway exits."""
    created = gateway.submit(prompt="x", model=llm.script(["a", "b"], stall_after=1))
    workers.start()
    items = stream(f"{gateway.url}{created['events_url']}")
    seen = []
    for item in items:
        if isinstance(item, Event):
            seen.append(item)
            if item.event == "token":
                break
    started = time.monotonic()
    gateway.process.terminate()
    seen += [e for e in items if isinstance(e, Event)]
    assert seen[-1].event == "reconnect"
    assert seen[-1].json == {"reason": "shutdown", "after": seen[-2].id}
    gateway.process.wait(timeout=30)
    assert time.monotonic() - started < 10
    llm_server.release()


def test_open_streams_ride_out_a_redis_restart(
    env: dict[str, str], tmp_path: Path, llm: ScriptedLLM, workers: Workers
) -> None:
    """Redis stopped for 3 s mid-stream: the client still gets every word once, in order."""
    with RedisServer(appendonly=True) as server:
        own = {**env, "TOKENRELAY_REDIS_URL": server.url}
        gateway = start_gateway(own, tmp_path / "gw.log")
        client = connect(server.url)
        try:
            words = [f" r{i}" for i in range(60)]
            created = gateway.submit(prompt="x", model=llm.script(words, token_delay=0.05))
            workers.start(env=own)
            items = stream(f"{gateway.url}{created['events_url']}", timeout=120)
            seen = []
            for item in items:
                if isinstance(item, Event):
                    seen.append(item)
                    if len(text_of(seen).split()) >= 10:
                        break
            server.stop(keep_data=True)
            time.sleep(3)  # the outage itself: Redis is away this long
            server.start()
            seen += [e for e in items if isinstance(e, Event)]
            assert text_of(seen) == "".join(words)
            assert seen[-1].event == "end"
            ids = [e.id for e in seen]
            assert len(ids) == len(set(ids))
            outage = [
                line["event"] for line in gateway.logs() if line["event"].startswith("redis.")
            ]
            assert "redis.unavailable" in outage
            assert "redis.recovered" in outage
        finally:
            gateway.stop()
            client.close()
