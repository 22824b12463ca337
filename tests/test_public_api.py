"""The public API is exactly what `tokenrelay.__all__` says."""

from __future__ import annotations

import inspect

import tokenrelay
from tokenrelay import Relay
from tokenrelay.producer.request import SUBMIT_FIELDS


def test_all_lists_every_public_name() -> None:
    """Every public name of the package is in __all__, and every name in __all__ exists."""
    public = {name for name in vars(tokenrelay) if not name.startswith("_")}
    modules = {name for name in public if type(getattr(tokenrelay, name)).__name__ == "module"}
    assert public - modules == set(tokenrelay.__all__)


def test_the_api_is_small() -> None:
    """The surface a user learns: submitting, sync and async handles, entries, settings, errors."""
    assert set(tokenrelay.__all__) == {
        "Relay",
        "AsyncRelay",
        "AsyncJobHandle",
        "submit",
        "submit_many",
        "JobHandle",
        "JobState",
        "Result",
        "Record",
        "EntryKind",
        "StartEntry",
        "TokenEntry",
        "EndEntry",
        "ErrorEntry",
        "Event",
        "LifecycleEvent",
        "Settings",
        "TokenRelayError",
        "ConfigurationError",
        "InvalidRequestError",
        "RedisUnavailableError",
        "JobNotFoundError",
        "JobFailedError",
        "StreamTimeoutError",
        "StreamExpiredError",
        "ProtocolError",
    }


def test_what_a_batch_line_or_a_gateway_body_may_carry_is_what_submit_takes() -> None:
    """One list of submit's fields, for `submit --file` and `POST /v1/jobs`: submit's own."""
    taken = set(inspect.signature(Relay.submit).parameters) - {"self"}
    assert taken == SUBMIT_FIELDS
