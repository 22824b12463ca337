"""The console viewer: prints a job's text as it arrives, with control sequences defused."""

from __future__ import annotations

from typing import TextIO

from tokenrelay.producer.handle import JobHandle
from tokenrelay.stream.protocol import EndEntry, ErrorEntry, TokenEntry
from tokenrelay.stream.reader import BEGINNING
from tokenrelay.terminal import printable


def view(
    handle: JobHandle,
    out: TextIO,
    *,
    after: str = BEGINNING,
    live: bool = False,
    timeout: float | None = None,
) -> EndEntry | ErrorEntry:
    """Print the job's text to `out` as it arrives; the terminal entry it ended with."""
    for _, entry in handle.records(after=after, live=live, timeout=timeout):
        if isinstance(entry, TokenEntry):
            out.write(printable(entry.text))
            out.flush()
        elif isinstance(entry, EndEntry | ErrorEntry):
            return entry
    raise AssertionError("read_stream ends only after a terminal entry")  # pragma: no cover
