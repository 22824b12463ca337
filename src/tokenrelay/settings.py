"""Settings, read from the environment in one place and nowhere else.

Entry points (the CLI, the demo, `Relay.from_env`) call `Settings.from_env()`;
library code receives a `Settings` (or the values it needs) as a parameter.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit, urlunsplit

from tokenrelay.errors import ConfigurationError

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"

T = TypeVar("T")

MaxTokensParam = Literal["auto", "both", "max_completion_tokens"]
RetryPolicyName = Literal["continue", "restart"]
LogFormat = Literal["auto", "json", "console"]


class Secret:
    """A string that never shows itself in a repr, a log line or an error message."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The secret itself, for the one place that must send it."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')" if self._value else "Secret('')"

    __str__ = __repr__

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def redact_url(url: str) -> str:
    """The URL with any password replaced, fit for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:" if parts.username else ":"
    return urlunsplit(parts._replace(netloc=f"{user}****@{netloc}"))


def _shown(raw: str) -> str:
    """A setting's raw value fit for an error message: any password out, long ones cut."""
    text = redact_url(raw) if "://" in raw else raw
    return repr(text if len(text) <= 80 else f"{text[:77]}...")


def _env(name: str, default: T, cast: Callable[[str], T] | None = None) -> Any:
    """A dataclass field read from the environment variable `name` (see `Settings.from_env`)."""
    return field(default=default, metadata={"env": name, "cast": cast})


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value <= 0:
        raise ValueError(f"must be a positive integer, got {value}")
    return value


def _positive_float(raw: str) -> float:
    value = float(raw)
    if not 0 < value < math.inf:
        raise ValueError(f"must be a positive number, got {value}")
    return value


def _non_negative_int(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise ValueError(f"must not be negative, got {value}")
    return value


def _non_negative_float(raw: str) -> float:
    value = float(raw)
    if not 0 <= value < math.inf:
        raise ValueError(f"must be a number, not negative, got {value}")
    return value


def _choice(*allowed: str) -> Callable[[str], str]:
    def cast(raw: str) -> str:
        if raw not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}, got {raw!r}")
        return raw

    return cast


def _optional(raw: str) -> str | None:
    return raw or None


def _port(raw: str) -> int:
    value = int(raw)
    if not 0 < value < 65536:
        raise ValueError(f"must be a TCP port (1 to 65535), got {value}")
    return value


#: How an API key is configured: its SHA-256, never the key itself (`tokenrelay hash-key`).
KEY_HASH_PATTERN = re.compile(r"sha256:[0-9a-f]{64}")


def _key_hashes(raw: str) -> tuple[str, ...]:
    """Comma-separated API key hashes, each `sha256:` and 64 lowercase hex digits."""
    hashes = tuple(part.strip() for part in raw.split(",") if part.strip())
    for i, value in enumerate(hashes):
        if not KEY_HASH_PATTERN.fullmatch(value):
            raise ValueError(
                f"entry {i + 1} is not sha256:HEX (64 hex digits): give the hash of each key, "
                "made with `tokenrelay hash-key`, never the key itself"
            )
    return hashes


def _signing_secret(raw: str) -> Secret:
    if len(raw) < 32:
        raise ValueError("must be at least 32 characters (e.g. `openssl rand -hex 32`)")
    return Secret(raw)


def _redis_url(raw: str) -> str:
    """A Redis URL that redis-py would not silently misread (a database that is not a number)."""
    parts = urlsplit(raw)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ValueError("must start with redis://, rediss:// or unix://")
    if parts.scheme == "unix":
        return raw
    if not parts.hostname:
        raise ValueError("names no host")
    try:
        parts.port  # noqa: B018 (the property parses the port and raises on junk)
    except ValueError:
        raise ValueError("the port must be a number") from None
    database = parts.path.strip("/")
    if database and not database.isdigit():
        raise ValueError(f"the database (after the last /) must be a number, got {database[:20]!r}")
    return raw


_NO_KEY = Secret("")
_NO_KEYS: tuple[str, ...] = ()
_MAX_TOKENS_PARAMS = _choice("auto", "both", "max_completion_tokens")
_LOG_FORMATS = _choice("auto", "json", "console")
_LOG_LEVELS = _choice("debug", "info", "warning", "error")
_RETRY_POLICIES = _choice("continue", "restart")


@dataclass(frozen=True)
class Settings:
    """Everything tokenrelay can be configured with; each field names its environment variable."""

    redis_url: str | None = _env("TOKENRELAY_REDIS_URL", None, _redis_url)
    redis_max_connections: int = _env("TOKENRELAY_REDIS_MAX_CONNECTIONS", 1000, _positive_int)
    queue: str = _env("TOKENRELAY_QUEUE", "tokenrelay")
    openai_api_key: Secret = _env("OPENAI_API_KEY", _NO_KEY, Secret)
    openai_base_url: str | None = _env("OPENAI_BASE_URL", None, _optional)
    model: str = _env("TOKENRELAY_MODEL", "gpt-4o-mini")
    max_tokens: int = _env("TOKENRELAY_MAX_TOKENS", 512, _positive_int)
    temperature: float = _env("TOKENRELAY_TEMPERATURE", 0.7, _non_negative_float)
    max_tokens_limit: int = _env("TOKENRELAY_MAX_TOKENS_LIMIT", 32_768, _positive_int)
    max_prompt_chars: int = _env("TOKENRELAY_MAX_PROMPT_CHARS", 200_000, _positive_int)
    job_timeout: int = _env("TOKENRELAY_JOB_TIMEOUT", 600, _positive_int)
    stream_ttl: int = _env("TOKENRELAY_STREAM_TTL", 86_400, _positive_int)
    events_max_len: int = _env("TOKENRELAY_EVENTS_MAX_LEN", 1_000_000, _positive_int)
    llm_timeout: float = _env("TOKENRELAY_LLM_TIMEOUT", 60.0, _non_negative_float)
    llm_max_retries: int = _env("TOKENRELAY_LLM_MAX_RETRIES", 0, _non_negative_int)
    max_tokens_param: MaxTokensParam = _env(
        "TOKENRELAY_MAX_TOKENS_PARAM", "auto", _MAX_TOKENS_PARAMS
    )
    worker_concurrency: int = _env("TOKENRELAY_WORKER_CONCURRENCY", 100, _positive_int)
    heartbeat_interval: int = _env("TOKENRELAY_HEARTBEAT_INTERVAL", 10, _positive_int)
    maintenance_interval: int = _env("TOKENRELAY_MAINTENANCE_INTERVAL", 60, _positive_int)
    loop_lag_limit: float = _env("TOKENRELAY_LOOP_LAG_LIMIT", 0.25, _positive_float)
    tokens_per_entry: int = _env("TOKENRELAY_TOKENS_PER_ENTRY", 0, _non_negative_int)
    max_held_tokens: int = _env("TOKENRELAY_MAX_HELD_TOKENS", 10_000, _positive_int)
    lease_ttl: float = _env("TOKENRELAY_LEASE_TTL", 10.0, _positive_float)
    takeover_after: float = _env("TOKENRELAY_TAKEOVER_AFTER", 5.0, _non_negative_float)
    max_attempts: int = _env("TOKENRELAY_MAX_ATTEMPTS", 5, _positive_int)
    retry_delay: float = _env("TOKENRELAY_RETRY_DELAY", 1.0, _non_negative_float)
    retry_max_delay: float = _env("TOKENRELAY_RETRY_MAX_DELAY", 30.0, _non_negative_float)
    retry_policy: RetryPolicyName = _env("TOKENRELAY_RETRY_POLICY", "continue", _RETRY_POLICIES)
    first_token_timeout: float = _env("TOKENRELAY_FIRST_TOKEN_TIMEOUT", 30.0, _positive_float)
    stall_timeout: float = _env("TOKENRELAY_STALL_TIMEOUT", 20.0, _positive_float)
    attempt_timeout: float = _env("TOKENRELAY_ATTEMPT_TIMEOUT", 0.0, _non_negative_float)
    redis_outage_limit: float = _env("TOKENRELAY_REDIS_OUTAGE_LIMIT", 120.0, _positive_float)
    idempotency_window: int = _env("TOKENRELAY_IDEMPOTENCY_WINDOW", 86_400, _positive_int)
    stream_maxlen: int = _env("TOKENRELAY_STREAM_MAXLEN", 0, _non_negative_int)
    gateway_host: str = _env("TOKENRELAY_GATEWAY_HOST", "127.0.0.1")
    gateway_port: int = _env("TOKENRELAY_GATEWAY_PORT", 8000, _port)
    gateway_api_keys: tuple[str, ...] = _env("TOKENRELAY_GATEWAY_API_KEYS", _NO_KEYS, _key_hashes)
    gateway_secret: Secret = _env("TOKENRELAY_GATEWAY_SECRET", _NO_KEY, _signing_secret)
    gateway_token_ttl: int = _env("TOKENRELAY_GATEWAY_TOKEN_TTL", 86_400, _positive_int)
    gateway_ping_interval: float = _env("TOKENRELAY_GATEWAY_PING_INTERVAL", 15.0, _positive_float)
    gateway_send_timeout: float = _env("TOKENRELAY_GATEWAY_SEND_TIMEOUT", 30.0, _positive_float)
    reader_queue: int = _env("TOKENRELAY_READER_QUEUE", 256, _positive_int)
    gateway_streams_per_client: int = _env(
        "TOKENRELAY_GATEWAY_STREAMS_PER_CLIENT", 20, _positive_int
    )
    gateway_max_body: int = _env("TOKENRELAY_GATEWAY_MAX_BODY", 2_097_152, _positive_int)
    log_format: LogFormat = _env("TOKENRELAY_LOG_FORMAT", "auto", _LOG_FORMATS)
    log_level: str = _env("TOKENRELAY_LOG_LEVEL", "info", _LOG_LEVELS)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from the environment; an unset or empty variable keeps the default."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(f.metadata["env"], "")
            if raw == "":
                continue
            cast = f.metadata["cast"] or str
            try:
                values[f.name] = cast(raw)
            except ValueError as exc:
                raise ConfigurationError(f"{f.metadata['env']}={_shown(raw)}: {exc}") from None
        return cls(**values)

    def with_overrides(self, **changes: Any) -> Settings:
        """A copy with the given fields changed; `None` values are ignored."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    @property
    def effective_redis_url(self) -> str:
        """The Redis URL to connect to: the configured one, or the default address."""
        return self.redis_url or DEFAULT_REDIS_URL

    @property
    def llm_configured(self) -> bool:
        """Whether an LLM endpoint is configured (an API key or a base URL)."""
        return bool(self.openai_api_key) or self.openai_base_url is not None

    @property
    def send_legacy_max_tokens(self) -> bool:
        """Whether to send `max_tokens` as well as `max_completion_tokens`.

        OpenAI's own API wants only the latter; llama.cpp, and other servers that
        predate it, honour only the former.
        """
        if self.max_tokens_param == "auto":
            return self.openai_base_url is not None
        return self.max_tokens_param == "both"


def environment_variables() -> dict[str, Any]:
    """Every environment variable tokenrelay reads, with its default."""
    return {f.metadata["env"]: f.default for f in fields(Settings)}
