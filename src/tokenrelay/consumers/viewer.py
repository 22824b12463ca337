"""The console viewer: prints a job's text as it arrives, with control sequences defused."""

from __future__ import annotations

import re
from typing import TextIO

from tokenrelay.handle import JobHandle
from tokenrelay.protocol import EndEntry, ErrorEntry, TokenEntry
from tokenrelay.reader import BEGINNING

# C0 controls but tab and newline, DEL, C1 controls (ESC and CSI start terminal
# sequences), and the bidirectional overrides that can disguise text.
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """The text with every character that could drive a terminal replaced by U+FFFD."""
    return _UNSAFE.sub("\ufffd", text.replace("\r\n", "\n"))


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
