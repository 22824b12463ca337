"""The gateway's access checks: an API key to submit and operate, a read token to watch.

Each returns None when the request may go on, or the refusal to send. A refusal says what is
missing or wrong and nothing about the job: whether it exists is only told to those who may
watch it.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from tokenrelay.gateway.responses import error
from tokenrelay.gateway.state import bearer, gateway_of

_CHALLENGE = {"WWW-Authenticate": "Bearer"}


def needs_key(request: Request) -> Response | None:
    """Refuse a request that does not carry one of the gateway's API keys."""
    gateway = gateway_of(request)
    if not gateway.keys.enabled:
        return error(
            403,
            "forbidden",
            "this gateway accepts no API keys (TOKENRELAY_GATEWAY_API_KEYS is empty): "
            "it serves read tokens only",
        )
    credential = bearer(request, in_query=False)
    if credential is None:
        return error(
            401, "unauthorized", "an API key is required: Authorization: Bearer KEY", _CHALLENGE
        )
    if not gateway.keys.accepts(credential):
        return error(401, "unauthorized", "the API key is not valid", _CHALLENGE)
    return None


def needs_reader(request: Request, job_id: str) -> Response | None:
    """Refuse a request that carries neither a valid read token for `job_id` nor an API key."""
    gateway = gateway_of(request)
    credential = bearer(request)
    if credential is None:
        return error(
            401,
            "unauthorized",
            "a read token is required: ?token=TOKEN or Authorization: Bearer TOKEN",
            _CHALLENGE,
        )
    if gateway.tokens.allows(credential, job_id):
        return None
    key = bearer(request, in_query=False)
    if key is not None and gateway.keys.accepts(key):
        return None
    return error(403, "forbidden", "the token does not give access to this job, or has expired")
