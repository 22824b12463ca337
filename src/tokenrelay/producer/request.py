"""A generation request, and the checks that refuse a bad one before anything is queued."""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tokenrelay.errors import InvalidRequestError
from tokenrelay.settings import Settings
from tokenrelay.stream.keys import JOB_ID_PATTERN

ROLES = ("system", "user", "assistant")

MAX_METADATA_BYTES = 16_384
#: How deeply metadata may nest (objects and arrays within each other).
MAX_METADATA_DEPTH = 32
MAX_TEMPERATURE = 2.0

#: The request's time limits, in seconds, each also settable per worker (TOKENRELAY_...).
TIMEOUT_FIELDS = ("timeout", "first_token_timeout", "stall_timeout", "attempt_timeout")
#: The longest time limit a request may set: a day.
MAX_TIMEOUT = 86_400

#: What an idempotency key may be: 1 to 200 printable ASCII characters, no spaces.
IDEMPOTENCY_KEY_PATTERN = re.compile(r"[!-~]{1,200}")

#: What one submission may carry (a batch line, a gateway body): `Relay.submit`'s arguments.
SUBMIT_FIELDS = frozenset(
    {
        "prompt",
        "messages",
        "model",
        "max_tokens",
        "temperature",
        "job_id",
        "metadata",
        *TIMEOUT_FIELDS,
        "idempotency_key",
    }
)

#: The fields a job payload may carry: the request's, and the producer's stream TTL.
PAYLOAD_FIELDS = frozenset(
    {"messages", "model", "max_tokens", "temperature", "metadata", *TIMEOUT_FIELDS}
)
STREAM_TTL_FIELD = "stream_ttl"
#: The longest stream TTL a worker accepts in a payload: 30 days.
MAX_STREAM_TTL = 30 * 86_400


def shown(value: object, limit: int = 40) -> str:
    """A value for an error message: its repr, cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


@dataclass(frozen=True)
class Message:
    """One chat message."""

    role: str
    content: str


@dataclass(frozen=True)
class GenerationRequest:
    """What to generate; unset options take the worker's defaults."""

    messages: tuple[Message, ...]
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    job_id: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    #: Seconds the whole job may take (RQ's job timeout), over every attempt.
    timeout: int | None = None
    #: Seconds an attempt may wait for its first token, and between two tokens.
    first_token_timeout: float | None = None
    stall_timeout: float | None = None
    #: Seconds one attempt may take in all, before it is ended and retried.
    attempt_timeout: float | None = None
    #: Submits with this key return one job (see `tokenrelay.producer.idempotency`).
    idempotency_key: str | None = None

    @property
    def prompt_chars(self) -> int:
        """The size of the prompt, in characters, over all messages."""
        return sum(len(m.content) for m in self.messages)

    def to_payload(self) -> dict[str, Any]:
        """The JSON-ready form that travels in the RQ job."""
        return {
            "messages": [{"role": m.role, "content": m.content} for m in self.messages],
            "model": self.model,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "metadata": dict(self.metadata),
            **{name: getattr(self, name) for name in TIMEOUT_FIELDS if getattr(self, name)},
        }

    def fingerprint(self) -> str:
        """A digest of what the job will generate (its payload), to tell two requests apart.

        The job id and the idempotency key are not part of it: they name the job, they do
        not change what it generates.
        """
        canonical = json.dumps(self.to_payload(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def _check_text(where: str, text: object) -> str:
    if not isinstance(text, str):
        raise InvalidRequestError(f"{where} must be a string, not {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequestError(
            f"{where} is not valid Unicode (a lone surrogate at position {exc.start})"
        ) from None
    return text


def _messages(prompt: str | None, messages: Sequence[Mapping[str, Any]] | None) -> list[Message]:
    if (prompt is None) == (messages is None):
        raise InvalidRequestError("give either a prompt or messages, not both and not neither")
    if prompt is not None:
        return [Message("user", _check_text("prompt", prompt))]
    assert messages is not None
    if isinstance(messages, (str, bytes)) or not messages:
        raise InvalidRequestError("messages must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or set(m) != {"role", "content"}:
            raise InvalidRequestError(f"messages[{i}] must have exactly the keys role and content")
        if m["role"] not in ROLES:
            raise InvalidRequestError(
                f"messages[{i}].role: unknown role {m['role']!r} "
                f"(expected one of {', '.join(ROLES)})"
            )
        out.append(Message(m["role"], _check_text(f"messages[{i}].content", m["content"])))
    return out


def _check_prompt(messages: list[Message], settings: Settings) -> None:
    if not any(m.role == "user" and m.content.strip() for m in messages):
        raise InvalidRequestError("the prompt is empty: give at least one non-blank user message")
    size = sum(len(m.content) for m in messages)
    if size > settings.max_prompt_chars:
        raise InvalidRequestError(
            f"the prompt is {size:,} characters; the limit is {settings.max_prompt_chars:,} "
            "(TOKENRELAY_MAX_PROMPT_CHARS)"
        )


def _check_options(
    model: str | None, max_tokens: int | None, temperature: float | None, settings: Settings
) -> None:
    if model is not None and not (
        isinstance(model, str)
        and 0 < len(model) <= 256
        and model.isprintable()
        and " " not in model
    ):
        raise InvalidRequestError(
            f"model must be a printable name without spaces, got {shown(model)}"
        )
    if max_tokens is not None:
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool):
            raise InvalidRequestError(f"max_tokens must be an integer, got {shown(max_tokens)}")
        if not 1 <= max_tokens <= settings.max_tokens_limit:
            raise InvalidRequestError(
                f"max_tokens must be between 1 and {settings.max_tokens_limit:,} "
                f"(TOKENRELAY_MAX_TOKENS_LIMIT), got {max_tokens:,}"
            )
    if temperature is not None:
        if not isinstance(temperature, (int, float)) or isinstance(temperature, bool):
            raise InvalidRequestError(f"temperature must be a number, got {shown(temperature)}")
        if not 0.0 <= temperature <= MAX_TEMPERATURE:  # also refuses NaN
            raise InvalidRequestError(
                f"temperature must be between 0 and {MAX_TEMPERATURE:g}, got {temperature:g}"
            )


def _check_timeout(name: str, value: object) -> float | None:
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise InvalidRequestError(f"{name} must be a number of seconds, got {shown(value)}")
    if not 0 < value <= MAX_TIMEOUT:  # also refuses NaN
        raise InvalidRequestError(
            f"{name} must be more than 0 and at most {MAX_TIMEOUT:,} seconds, got {value:g}"
        )
    return float(value)


def _check_job_id(job_id: str | None) -> None:
    if job_id is not None and not (isinstance(job_id, str) and JOB_ID_PATTERN.fullmatch(job_id)):
        raise InvalidRequestError(
            f"job_id {shown(job_id)} is not allowed: use 1 to 128 letters, digits, '_' or '-'"
        )


def _check_idempotency_key(key: str | None) -> None:
    if key is not None and not (isinstance(key, str) and IDEMPOTENCY_KEY_PATTERN.fullmatch(key)):
        raise InvalidRequestError(
            f"idempotency_key {shown(key)} is not allowed: "
            "use 1 to 200 printable ASCII characters without spaces"
        )


def _check_metadata(metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping) or not all(isinstance(k, str) for k in metadata):
        raise InvalidRequestError("metadata must be a mapping with string keys")
    _check_json(metadata, "metadata", depth=0)
    try:
        size = len(json.dumps(metadata, allow_nan=False).encode())
    except (TypeError, ValueError) as exc:
        raise InvalidRequestError(f"metadata must be JSON-serializable: {exc}") from None
    if size > MAX_METADATA_BYTES:
        raise InvalidRequestError(f"metadata is {size:,} bytes as JSON; the limit is 16,384")
    return dict(metadata)


def _check_json(value: object, where: str, depth: int) -> None:
    """Refuse what JSON cannot carry (NaN, Infinity) and nesting deeper than MAX_METADATA_DEPTH."""
    if depth > MAX_METADATA_DEPTH:
        raise InvalidRequestError(f"{where} nests deeper than {MAX_METADATA_DEPTH} levels")
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidRequestError(f"{where} holds {value!r}, which is not JSON")
    if isinstance(value, Mapping):
        for key, item in value.items():
            _check_json(item, f"{where}.{shown(key, 20)}" if depth < 3 else where, depth + 1)
    elif isinstance(value, list | tuple):
        for item in value:
            _check_json(item, where, depth + 1)


def build_request(
    prompt: str | None = None,
    *,
    messages: Sequence[Mapping[str, Any]] | None = None,
    model: str | None = None,
    max_tokens: int | None = None,
    temperature: float | None = None,
    job_id: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    timeout: float | None = None,
    first_token_timeout: float | None = None,
    stall_timeout: float | None = None,
    attempt_timeout: float | None = None,
    idempotency_key: str | None = None,
    settings: Settings,
) -> GenerationRequest:
    """A checked request; raises InvalidRequestError with a message that says what to fix."""
    checked = _messages(prompt, messages)
    _check_prompt(checked, settings)
    _check_options(model, max_tokens, temperature, settings)
    _check_job_id(job_id)
    _check_idempotency_key(idempotency_key)
    job_timeout = _check_timeout("timeout", timeout)
    return GenerationRequest(
        messages=tuple(checked),
        model=model,
        max_tokens=max_tokens,
        temperature=None if temperature is None else float(temperature),
        job_id=job_id,
        metadata=_check_metadata(metadata),
        timeout=None if job_timeout is None else math.ceil(job_timeout),
        first_token_timeout=_check_timeout("first_token_timeout", first_token_timeout),
        stall_timeout=_check_timeout("stall_timeout", stall_timeout),
        attempt_timeout=_check_timeout("attempt_timeout", attempt_timeout),
        idempotency_key=idempotency_key,
    )


def stream_ttl_of(payload: object) -> int | None:
    """The stream TTL a job's payload carries, if it is one a worker accepts (else None)."""
    ttl = payload.get(STREAM_TTL_FIELD) if isinstance(payload, Mapping) else None
    if isinstance(ttl, int) and not isinstance(ttl, bool) and 1 <= ttl <= MAX_STREAM_TTL:
        return ttl
    return None


def request_from_payload(
    payload: object, job_id: str, settings: Settings
) -> tuple[GenerationRequest, int]:
    """The request and stream TTL carried by an RQ job, checked as `submit` checks them.

    A worker runs this on every job it takes: a payload written into Redis by anything but
    tokenrelay's producer gets the same refusals (InvalidRequestError) as bad input to
    `submit`, by this worker's limits.
    """
    if not isinstance(payload, Mapping):
        raise InvalidRequestError("the job's payload is not an object")
    unknown = set(payload) - PAYLOAD_FIELDS - {STREAM_TTL_FIELD}
    if unknown:
        raise InvalidRequestError(f"the job's payload has unknown fields: {sorted(unknown)}")
    ttl = stream_ttl_of(payload)
    if ttl is None:
        raise InvalidRequestError(
            f"stream_ttl must be between 1 and {MAX_STREAM_TTL:,} seconds, "
            f"got {shown(payload.get(STREAM_TTL_FIELD))}"
        )
    messages = payload.get("messages")
    if not isinstance(messages, list):
        raise InvalidRequestError("messages must be a non-empty list of {role, content} objects")
    request = build_request(
        messages=messages,
        model=payload.get("model"),
        max_tokens=payload.get("max_tokens"),
        temperature=payload.get("temperature"),
        job_id=job_id,
        metadata=payload.get("metadata"),
        timeout=payload.get("timeout"),
        first_token_timeout=payload.get("first_token_timeout"),
        stall_timeout=payload.get("stall_timeout"),
        attempt_timeout=payload.get("attempt_timeout"),
        settings=settings,
    )
    return request, ttl
