"""Who may do what: API keys, configured as their hashes, and signed, expiring read tokens.

An API key lets its holder submit, cancel and see the operator's status. The gateway keeps
only SHA-256 hashes of the keys (TOKENRELAY_GATEWAY_API_KEYS), so its configuration leaks
no key; keys must therefore be long random strings (`tokenrelay hash-key` makes one), for
which a fast hash is as good as a slow one.

A read token lets its holder watch one job and nothing else, until it expires:
`v1.JOB_ID.EXPIRES.SIGNATURE`, the signature an HMAC-SHA256 of the rest under the gateway's
secret (TOKENRELAY_GATEWAY_SECRET). Every gateway with the same secret accepts it, so a link
can be shared with viewers without sharing a key.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections.abc import Sequence

from tokenrelay.stream.keys import JOB_ID_PATTERN

_VERSION = "v1"


def hash_key(key: str) -> str:
    """How an API key is configured: `sha256:` and its hex digest."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A fresh API key: 256 random bits."""
    return "trk_" + secrets.token_urlsafe(32)


class ApiKeys:
    """The configured API keys, by hash; a gateway without any accepts no submissions."""

    def __init__(self, hashes: Sequence[str]) -> None:
        self._hashes = tuple(hashes)

    @property
    def enabled(self) -> bool:
        """Whether any key is configured."""
        return bool(self._hashes)

    def accepts(self, key: str | None) -> bool:
        """Whether `key` is one of the configured keys (compared in constant time)."""
        if not key or not self._hashes:
            return False
        digest = hash_key(key).encode()
        matches = [hmac.compare_digest(digest, known.encode()) for known in self._hashes]
        return any(matches)


class ReadTokens:
    """Mints and checks read tokens under one secret."""

    def __init__(self, secret: bytes, ttl: int) -> None:
        self._secret = secret
        self.ttl = ttl

    def _signature(self, payload: str) -> str:
        digest = hmac.new(self._secret, payload.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def mint(self, job_id: str, now: float | None = None) -> tuple[str, int]:
        """A token for `job_id`, and when it expires (Unix seconds)."""
        expires = int(now if now is not None else time.time()) + self.ttl
        payload = f"{_VERSION}.{job_id}.{expires}"
        return f"{payload}.{self._signature(payload)}", expires

    def allows(self, token: str | None, job_id: str, now: float | None = None) -> bool:
        """Whether `token` is a valid, unexpired token for exactly `job_id`."""
        if not token or len(token) > 400:
            return False
        parts = token.split(".")
        if len(parts) != 4 or parts[0] != _VERSION or not parts[2].isdigit():
            return False
        _, token_job, expires, signature = parts
        expected = self._signature(f"{_VERSION}.{token_job}.{expires}")
        if not hmac.compare_digest(signature.encode(), expected.encode()):
            return False
        valid_job = JOB_ID_PATTERN.fullmatch(token_job) is not None and token_job == job_id
        return valid_job and int(expires) > (now if now is not None else time.time())
