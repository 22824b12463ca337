"""What one client may ask of the gateway: a bounded request body, a few open streams."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from starlette.requests import Request


class BodyError(Exception):
    """A request body the gateway refuses; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    """The request's body as a JSON object, read no further than `limit` bytes."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "application/json":
        raise BodyError(415, "unsupported_media_type", "send the request as application/json")
    too_big = BodyError(413, "too_large", f"the request body is over the limit of {limit:,} bytes")
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise too_big if declared.isdigit() else BodyError(400, "bad_request", "bad Content-Length")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_big
    try:
        value = json.loads(body.decode("utf-8"), parse_constant=_no_constants)
    except (UnicodeDecodeError, ValueError) as exc:
        raise BodyError(400, "malformed", f"the body is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise BodyError(400, "malformed", "the body must be a JSON object")
    return value


class StreamLimit:
    """Counts the event streams open per client address, up to a limit."""

    def __init__(self, per_client: int) -> None:
        self.per_client = per_client
        self.open: Counter[str] = Counter()

    def acquire(self, address: str) -> bool:
        """Count one more stream for the address; False (and nothing counted) if it is full."""
        if self.open[address] >= self.per_client:
            return False
        self.open[address] += 1
        return True

    def release(self, address: str) -> None:
        """One stream of the address closed."""
        self.open[address] -= 1
        if self.open[address] <= 0:
            del self.open[address]
