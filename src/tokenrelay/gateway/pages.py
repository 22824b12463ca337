"""The pages: the watch page and the ops page, static files shipped in the package (no build)."""

from __future__ import annotations

from functools import cache
from importlib import resources

from starlette.requests import Request
from starlette.responses import Response

from tokenrelay.gateway.responses import error, page

#: Every file the pages are made of, and its media type; nothing else is served.
FILES = {
    "watch.html": "text/html; charset=utf-8",
    "ops.html": "text/html; charset=utf-8",
    "watch.js": "text/javascript; charset=utf-8",
    "ops.js": "text/javascript; charset=utf-8",
    "common.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}


@cache
def _read(name: str) -> bytes:
    return (resources.files("tokenrelay.gateway") / "static" / name).read_bytes()


def _file(name: str) -> Response:
    return page(_read(name), FILES[name])


async def watch_page(request: Request) -> Response:
    """GET / and GET /watch/{job_id}: the watch page (the job and its token are read by the
    page from the URL; the token travels in the fragment, which no request carries)."""
    return _file("watch.html")


async def ops_page(request: Request) -> Response:
    """GET /ops: the operator's page."""
    return _file("ops.html")


async def static(request: Request) -> Response:
    """GET /static/{name}: one of the pages' files."""
    name = request.path_params["name"]
    if name not in FILES:
        return error(404, "not_found", "no such file")
    return _file(name)
