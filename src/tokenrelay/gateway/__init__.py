"""The browser gateway (`tokenrelay serve`): an HTTP API, server-sent event streams of jobs
shared through one reader per process, access control, and the watch and ops pages."""

from tokenrelay.gateway.app import create_app
from tokenrelay.gateway.server import serve

__all__ = ["create_app", "serve"]
