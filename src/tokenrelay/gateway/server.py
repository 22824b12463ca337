"""Running the gateway on uvicorn, with a shutdown that tells open streams to reconnect.

uvicorn waits for open responses to end before it shuts the application down, and an event
stream does not end by itself: so the first SIGTERM or SIGINT also sets the gateway's
`stopping` event, on which every open stream sends a `reconnect` event and closes.
"""

from __future__ import annotations

from types import FrameType

import uvicorn

from tokenrelay.gateway.app import create_app
from tokenrelay.gateway.state import Gateway
from tokenrelay.settings import Settings

#: Seconds open responses get to end after the shutdown signal, before they are cut.
SHUTDOWN_GRACE = 10


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, gateways: list[Gateway]) -> None:
        super().__init__(config)
        self.gateways = gateways

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        for gateway in self.gateways:
            loop = gateway.loop
            loop.call_soon_threadsafe(gateway.stopping.set)
        super().handle_exit(sig, frame)


def serve(settings: Settings, *, host: str | None = None, port: int | None = None) -> None:
    """Serve the gateway until SIGTERM or SIGINT (the CLI's `tokenrelay serve`)."""
    gateways: list[Gateway] = []
    config = uvicorn.Config(
        create_app(settings, started=gateways),
        host=host or settings.gateway_host,
        port=port or settings.gateway_port,
        log_config=None,  # the CLI configured logging (structlog); uvicorn's lines go through it
        access_log=False,  # an access log would hold the read tokens of `?token=`
        timeout_graceful_shutdown=SHUTDOWN_GRACE,
        server_header=False,
    )
    _Server(config, gateways).run()
