"""A deterministic OpenAI-compatible chat server that tests drive over real HTTP.

Each model name selects a `Script` that says which tokens to stream and how the
stream ends, so the real `openai` and `langchain_openai` clients can be run
against clean finishes, truncation, server errors, cut and dropped streams, and
streams that stall until the test lets them continue.
"""

from __future__ import annotations

import contextlib
import copy
import json
import socket
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Literal, Self

__all__ = ["Attempt", "Script", "ScriptedOpenAI"]

# Fixed so that two runs of the same script produce byte-identical responses.
_CREATED = 1_700_000_000
_HOST = "127.0.0.1"


@dataclass(frozen=True)
class Attempt:
    """What goes wrong with one request of a script (requests are counted per model).

    Attributes:
        status: Anything but 200 answers with that status and a JSON error.
        retry_after: With a status, the `Retry-After` header to send (seconds).
        fault: "cut" ends the response cleanly after `after` tokens, with no finish reason;
            "drop" closes the connection after `after` tokens.
        after: How many tokens are sent before the fault or the stall.
        stall: After `after` tokens, send nothing more until `release()` or `stop()`.
    """

    status: int = 200
    retry_after: float | None = None
    fault: Literal["cut", "drop"] | None = None
    after: int = 0
    stall: bool = False


@dataclass(frozen=True)
class Script:
    """How the server answers chat completions for one model.

    Attributes:
        tokens: Content deltas, streamed one chunk each, in order.
        finish_reason: Sent in a final empty-delta chunk; None never sends one.
        fault: "cut" ends the HTTP response cleanly after the tokens, with no
            finish_reason chunk and no `data: [DONE]`; "drop" closes the
            connection mid-body, without the terminating chunk.
        status: Anything but 200 answers with that status and a JSON error.
        stall_after: After this many tokens, block until `release()` or `stop()`.
        token_delay: Seconds to wait before each token; `stop()` cuts it short.
        error_message: The message of a non-200 reply; `{api_key}` becomes the key sent.
        honor: Request parameters that cap the token count. The default mimics
            llama.cpp's server: legacy `max_tokens` is honoured, while
            `max_completion_tokens` is ignored. A capped reply sends the first
            N tokens and finish_reason "length".
        attempts: What goes wrong with the first requests for this model, one `Attempt`
            each (the rest are answered cleanly). A request that carries part of the
            script's text as the assistant's last message (a worker continuing a
            generation) is answered with the rest of it.
    """

    tokens: Sequence[str]
    finish_reason: str | None = "stop"
    fault: Literal["cut", "drop"] | None = None
    status: int = 200
    stall_after: int | None = None
    token_delay: float = 0.0
    honor: frozenset[str] = frozenset({"max_tokens"})
    error_message: str = "scripted failure"
    attempts: Sequence[Attempt] = ()


class ScriptedOpenAI:
    """An OpenAI-compatible server on a free loopback port, answering from scripts.

    Stalls work in rounds: `release()` lets every stream stalled so far continue
    and re-arms `wait_stalled()`, and a stream that stalls afterwards waits for
    the next `release()`.
    """

    def __init__(self, scripts: Mapping[str, Script] | None = None) -> None:
        self._scripts: dict[str, Script] = dict(scripts or {})
        self._lock = threading.Lock()
        self._requests: list[dict[str, Any]] = []
        self._completions = 0
        self._attempts: dict[str, int] = {}
        self._gate = threading.Condition()
        self._release_round = 0
        self._stalled = threading.Event()
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def add(self, model: str, script: Script) -> None:
        """Answer requests for `model` from `script`."""
        with self._lock:
            self._scripts[model] = script

    def start(self) -> None:
        """Bind a free loopback port and serve on a daemon thread."""
        if self._server is not None:
            raise RuntimeError("ScriptedOpenAI is already running")
        self._stopping.clear()
        self._stalled.clear()
        server = _Server(partial(_Handler, owner=self))
        # serve_forever notices shutdown() only between polls; the default 0.5 s slows every stop.
        serve = partial(server.serve_forever, poll_interval=0.02)
        thread = threading.Thread(target=serve, name="scripted-openai", daemon=True)
        thread.start()
        self._server, self._thread = server, thread

    def stop(self) -> None:
        """Release stalls, close every connection and join all threads; idempotent."""
        with self._gate:
            self._stopping.set()
            self._gate.notify_all()
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        self._server = self._thread = None
        server.shutdown()
        server.abort_connections()
        server.server_close()
        thread.join()

    def release(self) -> None:
        """Let every currently stalled stream continue."""
        with self._gate:
            self._release_round += 1
            self._stalled.clear()
            self._gate.notify_all()

    def wait_stalled(self, timeout: float) -> bool:
        """Block until some stream has reached its stall point; False on timeout."""
        return self._stalled.wait(timeout)

    @property
    def base_url(self) -> str:
        """The OpenAI base URL, e.g. "http://127.0.0.1:PORT/v1"."""
        if self._server is None:
            raise RuntimeError("ScriptedOpenAI is not running")
        return f"http://{_HOST}:{self._server.server_port}/v1"

    @property
    def requests(self) -> list[dict[str, Any]]:
        """Copies of the JSON bodies received on /chat/completions, oldest first."""
        with self._lock:
            return copy.deepcopy(self._requests)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # The methods below are called by request handlers on their own threads.

    def _record(self, body: dict[str, Any]) -> None:
        with self._lock:
            self._requests.append(copy.deepcopy(body))

    def _script_for(self, model: object) -> Script | None:
        with self._lock:
            return self._scripts.get(model) if isinstance(model, str) else None

    def _attempt_for(self, model: str, script: Script) -> Attempt | None:
        """The scripted trouble of this request for `model` (the n-th request gets the n-th)."""
        with self._lock:
            count = self._attempts.get(model, 0)
            self._attempts[model] = count + 1
        return script.attempts[count] if count < len(script.attempts) else None

    def _model_ids(self) -> list[str]:
        with self._lock:
            return list(self._scripts)

    def _next_completion_id(self) -> str:
        with self._lock:
            self._completions += 1
            return f"chatcmpl-scripted-{self._completions}"

    def _stall(self) -> None:
        with self._gate:
            round_at_stall = self._release_round
            self._stalled.set()
            self._gate.wait_for(
                lambda: self._release_round != round_at_stall or self._stopping.is_set()
            )

    def _pause(self, seconds: float) -> None:
        if seconds > 0:
            self._stopping.wait(seconds)


class _Server(ThreadingHTTPServer):
    """A threading HTTP server whose stop can abort and join open connections.

    ThreadingHTTPServer uses daemon threads and never joins them, so a handler
    could outlive `stop()`; this server keeps each handler thread with its socket.
    """

    daemon_threads = True
    request_queue_size = 1024  # the listen backlog: many workers' requests arrive at once

    def __init__(self, handler: partial[_Handler]) -> None:
        self._live_lock = threading.Lock()
        self._live: dict[threading.Thread, socket.socket] = {}
        super().__init__((_HOST, 0), handler)

    def process_request(
        self, request: socket.socket | tuple[bytes, socket.socket], client_address: Any
    ) -> None:
        assert isinstance(request, socket.socket)  # TCP servers always get a socket
        thread = threading.Thread(
            target=self._serve_connection, args=(request, client_address), daemon=True
        )
        # Registered before start so that a stop racing this request still joins it.
        with self._live_lock:
            self._live[thread] = request
        thread.start()

    def abort_connections(self) -> None:
        """Shut down every open connection and wait for its handler to finish."""
        with self._live_lock:
            live = dict(self._live)
        for request in live.values():
            with contextlib.suppress(OSError):
                request.shutdown(socket.SHUT_RDWR)
        for thread in live:
            thread.join()

    def _serve_connection(self, request: socket.socket, client_address: Any) -> None:
        try:
            self.process_request_thread(request, client_address)
        finally:
            with self._live_lock:
                self._live.pop(threading.current_thread(), None)


class _Handler(BaseHTTPRequestHandler):
    """Serves /v1/models and /v1/chat/completions from the owner's scripts."""

    protocol_version = "HTTP/1.1"

    def __init__(self, *args: Any, owner: ScriptedOpenAI, **kwargs: Any) -> None:
        # Set before super().__init__, which handles the whole request.
        self._owner = owner
        super().__init__(*args, **kwargs)

    def log_message(self, format: str, *args: Any) -> None:
        """Keep test output free of per-request access logs."""

    def handle(self) -> None:
        # A client that hangs up mid-response is normal in these tests.
        with contextlib.suppress(ConnectionError):
            super().handle()

    def do_GET(self) -> None:
        if self.path.rstrip("/") != "/v1/models":
            self._send_json(404, _error("no such route", "invalid_request_error", "not_found"))
            return
        models = [_model_entry(model) for model in self._owner._model_ids()]
        self._send_json(200, {"object": "list", "data": models})

    def do_POST(self) -> None:
        if self.path.rstrip("/") != "/v1/chat/completions":
            self._send_json(404, _error("no such route", "invalid_request_error", "not_found"))
            return
        body = self._read_json()
        if body is None:
            self._send_json(400, _error("body is not a JSON object", "invalid_request_error"))
            return
        self._owner._record(body)
        self._answer(body)

    def _answer(self, body: dict[str, Any]) -> None:
        script = self._owner._script_for(body.get("model"))
        attempt = self._owner._attempt_for(str(body.get("model")), script) if script else None
        if script is None:
            message = f"The model {body.get('model')!r} does not exist"
            self._send_json(404, _error(message, "invalid_request_error", "model_not_found"))
        elif attempt is not None and attempt.status != 200:
            headers = (
                {} if attempt.retry_after is None else {"Retry-After": f"{attempt.retry_after:g}"}
            )
            error = _error(
                "scripted trouble", "rate_limit_error" if attempt.status == 429 else "server_error"
            )
            self._send_json(attempt.status, error, headers)
        elif attempt is not None and body.get("stream") is True:
            self._troubled_stream(script, attempt, body)
        elif script.status != 200:
            # Like servers that quote the key they were sent ("Incorrect API key provided: …").
            key = self.headers.get("Authorization", "").removeprefix("Bearer ")
            message = script.error_message.replace("{api_key}", key)
            self._send_json(script.status, _error(message, "server_error"))
        elif body.get("stream") is True:
            self._stream(script, body)
        else:
            self._complete(script, body)

    def _stream(self, script: Script, body: dict[str, Any]) -> None:
        tokens, finish_reason = _planned_reply(script, body)
        chunk = partial(_chunk, self._owner._next_completion_id(), str(body["model"]))
        self._start_event_stream()
        self._send_event(chunk({"role": "assistant", "content": ""}, None))
        for sent, token in enumerate(tokens):
            self._stall_if_due(script, sent)
            self._owner._pause(script.token_delay)
            self._send_event(chunk({"content": token}, None))
        self._stall_if_due(script, len(tokens))
        if script.fault == "drop":
            self._drop()
            return
        if script.fault is None:
            self._end_events(chunk, finish_reason, body, len(tokens))
        self._write_chunk(b"")

    def _troubled_stream(self, script: Script, attempt: Attempt, body: dict[str, Any]) -> None:
        """A stream that goes wrong after `attempt.after` tokens, as the attempt says."""
        tokens, finish_reason = _planned_reply(script, body)
        chunk = partial(_chunk, self._owner._next_completion_id(), str(body["model"]))
        self._start_event_stream()
        self._send_event(chunk({"role": "assistant", "content": ""}, None))
        for token in tokens[: attempt.after]:
            self._owner._pause(script.token_delay)
            self._send_event(chunk({"content": token}, None))
        if attempt.stall:
            self._owner._stall()
            return
        if attempt.fault == "drop":
            self._drop()
            return
        if attempt.fault is None:  # only a stall was scripted, and released: go on cleanly
            for token in tokens[attempt.after :]:
                self._send_event(chunk({"content": token}, None))
            self._end_events(chunk, finish_reason, body, len(tokens))
        self._write_chunk(b"")

    def _end_events(
        self,
        chunk: partial[dict[str, Any]],
        finish_reason: str | None,
        body: dict[str, Any],
        sent: int,
    ) -> None:
        if finish_reason is not None:
            self._send_event(chunk({}, finish_reason))
        if _wants_usage(body):
            usage_chunk = chunk({}, None) | {"choices": []}
            usage_chunk["usage"] = _usage(_prompt_tokens(body), sent)
            self._send_event(usage_chunk)
        self._write_chunk(b"data: [DONE]\n\n")

    def _complete(self, script: Script, body: dict[str, Any]) -> None:
        if script.fault == "drop":
            self._drop()
            return
        tokens, finish_reason = _planned_reply(script, body)
        if script.fault == "cut":
            finish_reason = None
        completion = _completion(
            self._owner._next_completion_id(),
            str(body["model"]),
            "".join(tokens),
            finish_reason,
            _usage(_prompt_tokens(body), len(tokens)),
        )
        self._send_json(200, completion)

    def _stall_if_due(self, script: Script, sent: int) -> None:
        if script.stall_after == sent:
            self._owner._stall()

    def _read_json(self) -> dict[str, Any] | None:
        try:
            length = int(self.headers.get("Content-Length", "0"))
            parsed = json.loads(self.rfile.read(length))
        except ValueError:
            return None
        return parsed if isinstance(parsed, dict) else None

    def _send_json(
        self, status: int, payload: dict[str, Any], headers: Mapping[str, str] | None = None
    ) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _start_event_stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        # One request per connection: no idle keep-alive handler can block stop().
        self.send_header("Connection", "close")
        self.end_headers()

    def _send_event(self, payload: dict[str, Any]) -> None:
        # ensure_ascii keeps any str, even a lone surrogate, encodable as an escape.
        self._write_chunk(b"data: " + json.dumps(payload).encode() + b"\n\n")

    def _write_chunk(self, data: bytes) -> None:
        self.wfile.write(b"%X\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _drop(self) -> None:
        # A FIN in the middle of a chunked body: the client sees an incomplete message.
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)


def _continued_from(tokens: Sequence[str], body: dict[str, Any]) -> int:
    """How many of the script's tokens the request's last assistant message already holds.

    A worker continuing a cut-off generation sends the text so far as the assistant's
    message; if it is exactly the script's first k tokens, the reply starts at token k.
    """
    messages = body.get("messages")
    if not isinstance(messages, list):
        return 0
    spoken = [m for m in messages if isinstance(m, dict) and m.get("role") == "assistant"]
    partial = _message_text(spoken[-1]) if spoken else ""
    if not partial:
        return 0
    text = ""
    for count, token in enumerate(tokens, start=1):
        text += token
        if text == partial:
            return count
        if not partial.startswith(text):
            return 0
    return 0


def _planned_reply(script: Script, body: dict[str, Any]) -> tuple[list[str], str | None]:
    """The tokens to send and the finish_reason, after any continuation and token cap."""
    tokens = list(script.tokens)[_continued_from(script.tokens, body) :]
    caps = [body[name] for name in script.honor if isinstance(body.get(name), int)]
    cap = min(caps, default=None)
    if cap is not None and cap < len(tokens):
        return tokens[: max(cap, 0)], "length"
    return tokens, script.finish_reason


def _wants_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def _prompt_tokens(body: dict[str, Any]) -> int:
    """Whitespace-separated words across all message contents."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        return 0
    return sum(len(_message_text(m).split()) for m in messages if isinstance(m, dict))


def _message_text(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text") for p in content if isinstance(p, dict)]
        return " ".join(text for text in parts if isinstance(text, str))
    return ""


def _chunk(
    completion_id: str, model: str, delta: dict[str, Any], finish_reason: str | None
) -> dict[str, Any]:
    return {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": _CREATED,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }


def _completion(
    completion_id: str,
    model: str,
    text: str,
    finish_reason: str | None,
    usage: dict[str, int],
) -> dict[str, Any]:
    message = {"role": "assistant", "content": text, "refusal": None}
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": _CREATED,
        "model": model,
        "choices": [
            {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
        ],
        "usage": usage,
    }


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _model_entry(model: str) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": _CREATED, "owned_by": "scripted"}


def _error(message: str, kind: str, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "code": code}}
