"""A fast OpenAI-compatible streaming chat server for the benchmarks, in a process of its own.

`python -m bench.model_server PORT` serves POST /v1/chat/completions (streamed or not) on
127.0.0.1 with HTTP/1.1 keep-alive, on one asyncio loop, so that thousands of paced streams
cost it little and the benchmark measures tokenrelay, not the fake model. The model name says
what to send: `tok{COUNT}-{RATE}` streams COUNT tokens at RATE tokens/s (0: as fast as it can);
`tok{COUNT}-{RATE}-stall{K}` stops after K tokens and keeps the connection open, silent (a
stalled model), for the first request that names it (the next ones answer in full). Each
token is ` {seq}@{unix time it was sent}`, so a reader can tell how long it took to come.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
from typing import Any

_MODEL = re.compile(r"tok(\d+)-(\d+(?:\.\d+)?)(?:-stall(\d+))?")
_STALLED: set[str] = set()  # the models whose one stall has happened
_LENGTH = re.compile(rb"(?i)content-length:\s*(\d+)")
_CREATED = 1_700_000_000


def token_sent_at(text: str) -> list[float]:
    """The send times carried by the tokens in `text` (one entry may hold several tokens)."""
    return [float(part.split("@", 1)[1]) for part in text.split() if "@" in part]


def _chunk(model: str, delta: dict[str, Any], finish: str | None) -> bytes:
    body = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": _CREATED,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    data = b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"
    return b"%X\r\n%s\r\n" % (len(data), data)


async def _answer(writer: asyncio.StreamWriter, body: dict[str, Any]) -> None:
    model = str(body.get("model"))
    match = _MODEL.fullmatch(model)
    count, rate = (int(match[1]), float(match[2])) if match else (10, 0.0)
    stall_at = int(match[3]) if match and match[3] and model not in _STALLED else None
    limit = body.get("max_tokens") or body.get("max_completion_tokens")
    count = min(count, int(limit)) if isinstance(limit, int) else count
    if not body.get("stream"):
        text = "".join(f" {i}@{time.time():.6f}" for i in range(count))
        message = {"role": "assistant", "content": text}
        reply = json.dumps(
            {
                "id": "chatcmpl-bench",
                "object": "chat.completion",
                "created": _CREATED,
                "model": model,
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                "usage": {
                    "prompt_tokens": 1,
                    "completion_tokens": count,
                    "total_tokens": count + 1,
                },
            }
        ).encode()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n")
        writer.write(b"Content-Length: %d\r\n\r\n" % len(reply) + reply)
        return
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n")
    writer.write(b"Transfer-Encoding: chunked\r\n\r\n")
    writer.write(_chunk(model, {"role": "assistant", "content": ""}, None))
    started = time.monotonic()
    for seq in range(count):
        if seq == stall_at:
            _STALLED.add(model)
            await writer.drain()
            await asyncio.Event().wait()  # silent until the client gives up and hangs up
        if rate:
            wait = started + seq / rate - time.monotonic()
            if wait > 0:
                await writer.drain()
                await asyncio.sleep(wait)
        writer.write(_chunk(model, {"content": f" {seq}@{time.time():.6f}"}, None))
        if not rate and seq % 64 == 0:
            await writer.drain()
    writer.write(_chunk(model, {}, "stop"))
    options = body.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage"):
        usage = {"prompt_tokens": 1, "completion_tokens": count, "total_tokens": count + 1}
        data = b"data: " + json.dumps({"id": "chatcmpl-bench", "object": "chat.completion.chunk",
                                      "created": _CREATED, "model": model, "choices": [],
                                      "usage": usage}).encode() + b"\n\n"  # fmt: skip
        writer.write(b"%X\r\n%s\r\n" % (len(data), data))
    done = b"data: [DONE]\n\n"
    writer.write(b"%X\r\n%s\r\n0\r\n\r\n" % (len(done), done))
    await writer.drain()


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = _LENGTH.search(head)
            size = int(length[1]) if length else 0
            body = json.loads(await reader.readexactly(size)) if size else {}
            if head.startswith(b"GET"):
                models = json.dumps({"object": "list", "data": []}).encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(models))
                writer.write(models)
                continue
            await _answer(writer, body)
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def _main(port: int) -> None:
    server = await asyncio.start_server(_serve, "127.0.0.1", port, backlog=4096, limit=2**20)
    async with server:
        print("ready", flush=True)
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(_main(int(sys.argv[1])))
