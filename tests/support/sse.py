"""A small server-sent events client for tests: events and comments, as the wire has them."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx


@dataclass(frozen=True)
class Event:
    """One event: its `id:`, `event:` and `data:`."""

    id: str | None
    event: str
    data: str

    @property
    def json(self) -> Any:
        """The data, parsed."""
        return json.loads(self.data)


@dataclass(frozen=True)
class Comment:
    """A comment line (`: ping`)."""

    text: str


def parse(lines: Iterator[str]) -> Iterator[Event | Comment]:
    """Events and comments from the lines of an event stream."""
    fields: dict[str, list[str]] = {}
    for line in lines:
        if not line:
            if "data" in fields or "event" in fields:
                ids = fields.get("id")
                yield Event(ids[-1] if ids else None, fields.get("event", ["message"])[-1],
                            "\n".join(fields.get("data", [])))  # fmt: skip
            fields = {}
        elif line.startswith(":"):
            yield Comment(line[1:].strip())
        else:
            name, _, value = line.partition(":")
            fields.setdefault(name, []).append(value[1:] if value.startswith(" ") else value)


def stream(
    url: str, *, headers: dict[str, str] | None = None, timeout: float = 30
) -> Iterator[Event | Comment]:
    """Open an event stream and give what comes until the server closes it."""
    with httpx.stream("GET", url, headers=headers, timeout=timeout) as response:
        assert response.status_code == 200, response.read().decode()
        yield from parse(response.iter_lines())


def read_all(url: str, **options: Any) -> list[Event]:
    """Every event of a stream, until the server closes it."""
    return [item for item in stream(url, **options) if isinstance(item, Event)]


def text_of(events: list[Event]) -> str:
    """The text carried by the token events."""
    return "".join(e.json["text"] for e in events if e.event == "token")
