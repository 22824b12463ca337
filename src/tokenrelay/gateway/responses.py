"""What the gateway answers besides events: JSON bodies and errors, pages, their headers."""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse, Response

#: On every response: no caching of job data, no sniffing, no referrer (links carry tokens).
COMMON_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

#: The pages' Content-Security-Policy: our own scripts and styles only, no inline code, no
#: frames, and Trusted Types required, so that no string can ever become HTML in the page.
PAGE_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'; "
    "require-trusted-types-for 'script'; trusted-types 'none'"
)


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A JSON response with the common headers."""
    return JSONResponse(body, status, headers={**COMMON_HEADERS, **(headers or {})})


def error(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> Response:
    """A JSON error: `{"error": {"type": kind, "message": message}}`."""
    return json_response({"error": {"type": kind, "message": message}}, status, headers)


def page(body: bytes, media_type: str) -> Response:
    """A page or one of its files, under the pages' Content-Security-Policy."""
    headers = {**COMMON_HEADERS, "Content-Security-Policy": PAGE_POLICY}
    return Response(body, media_type=media_type, headers=headers)
