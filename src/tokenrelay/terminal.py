"""Text that is safe to print to a terminal, whoever wrote it (a model, a submitter)."""

from __future__ import annotations

import re

# C0 controls but tab and newline, DEL, C1 controls (ESC and CSI start terminal
# sequences), and the bidirectional overrides that can disguise text.
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """The text with every character that could drive a terminal replaced by U+FFFD."""
    return _UNSAFE.sub("\ufffd", text.replace("\r\n", "\n"))
