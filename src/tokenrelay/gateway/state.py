"""What one gateway process holds: its settings, Redis clients, shared reader and credentials."""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass, field

import structlog
from redis import asyncio as aioredis
from starlette.requests import Request

from tokenrelay.connection import async_client_for, client_for
from tokenrelay.gateway.auth import ApiKeys, ReadTokens
from tokenrelay.gateway.limits import StreamLimit
from tokenrelay.gateway.sse import Frames
from tokenrelay.producer.relay import Relay
from tokenrelay.settings import Settings
from tokenrelay.stream.hub import StreamHub

log = structlog.get_logger()


@dataclass
class Gateway:
    """The gateway's parts, made at start-up (`open`) and closed at shutdown (`close`)."""

    settings: Settings
    relay: Relay
    client: aioredis.Redis
    hub: StreamHub
    keys: ApiKeys
    tokens: ReadTokens
    streams: StreamLimit
    frames: Frames = field(default_factory=Frames)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.get_running_loop)

    @classmethod
    def open(cls, settings: Settings) -> Gateway:
        """Connect and start the shared reader (inside the event loop that serves)."""
        secret = settings.gateway_secret.reveal().encode()
        if not secret:
            secret = secrets.token_bytes(32)
            log.warning(
                "gateway.ephemeral_secret",
                detail="TOKENRELAY_GATEWAY_SECRET is not set: read tokens are signed with a "
                "random secret, so they work on this process only and until it restarts",
            )
        client = async_client_for(settings)
        hub = StreamHub(
            client,
            outage_limit=settings.redis_outage_limit,
            queue_size=settings.reader_queue,
            name="tokenrelay-gateway",
        )
        hub.start()
        return cls(
            settings=settings,
            relay=Relay(client_for(settings), settings),
            client=client,
            hub=hub,
            keys=ApiKeys(settings.gateway_api_keys),
            tokens=ReadTokens(secret, settings.gateway_token_ttl),
            streams=StreamLimit(settings.gateway_streams_per_client),
        )

    async def close(self) -> None:
        """Stop the shared reader and release the connections."""
        await self.hub.close()
        await self.client.aclose()
        await self.client.connection_pool.disconnect()  # a pool of our own: aclose leaves it
        await asyncio.to_thread(self.relay.close)


def gateway_of(request: Request) -> Gateway:
    """The gateway serving this request."""
    gateway: Gateway = request.app.state.gateway
    return gateway


def bearer(request: Request, *, in_query: bool = True) -> str | None:
    """The credential of a request: `Authorization: Bearer X`, else (with `in_query`, for read
    tokens: EventSource cannot send headers) `?token=X`. API keys are taken from the header
    only, never from a URL that proxies log and browsers keep in their history."""
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return (request.query_params.get("token") or None) if in_query else None


def client_address(request: Request) -> str:
    """The client's address (behind a proxy: the one uvicorn's --forwarded-allow-ips trusts)."""
    return request.client.host if request.client else "unknown"
