"""The gateway's ASGI application: its routes, and its start-up and shutdown."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import structlog
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tokenrelay.gateway import jobs, pages, watch
from tokenrelay.gateway.responses import json_response
from tokenrelay.gateway.state import Gateway, gateway_of
from tokenrelay.settings import Settings

log = structlog.get_logger()


async def health(request: Request) -> Response:
    """GET /healthz: the process serves (and how many streams it reads)."""
    return json_response({"status": "ok", "watched": gateway_of(request).hub.watched})


ROUTES = [
    Route("/healthz", health),
    Route("/v1/jobs", jobs.submit, methods=["POST"]),
    Route("/v1/jobs/{job_id}", jobs.job_status),
    Route("/v1/jobs/{job_id}/cancel", jobs.cancel, methods=["POST"]),
    Route("/v1/jobs/{job_id}/events", watch.events),
    Route("/v1/status", jobs.ops_status),
    Route("/", pages.watch_page),
    Route("/watch/{job_id}", pages.watch_page),
    Route("/ops", pages.ops_page),
    Route("/static/{name}", pages.static),
]


def create_app(settings: Settings, *, started: list[Gateway] | None = None) -> Starlette:
    """The gateway app for `settings`; `started` receives its `Gateway` once it is up."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        gateway = Gateway.open(settings)
        app.state.gateway = gateway
        if started is not None:
            started.append(gateway)
        log.info(
            "gateway.started",
            submit=gateway.keys.enabled,
            api_keys=len(settings.gateway_api_keys),
        )
        try:
            yield
        finally:
            gateway.stopping.set()
            await gateway.close()

    return Starlette(routes=ROUTES, lifespan=lifespan)
