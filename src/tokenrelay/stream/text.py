"""The text a stream spells: the one rule for every reader that assembles it.

Token entries add to the text; an `attempt` entry with the `restart` policy starts it over
(its new attempt generates the answer from the beginning); with `continue` the text goes on.
The worker (to continue a failed attempt) and `JobHandle` build a job's text with a
`Transcript`; the recorder, which writes the text to a file as it reads it instead of holding
it, and the viewer, which prints it, apply the same rule through `starts_over`.
"""

from __future__ import annotations

from tokenrelay.stream.protocol import AttemptEntry, Entry, Policy, TokenEntry

#: Text pieces are joined into one string every this many, so that a long text costs its
#: characters and not a Python object per token.
_JOIN_EVERY = 256


class TextBuffer:
    """A text built piece by piece, in memory that grows with its characters alone."""

    def __init__(self, text: str = "") -> None:
        self._parts = [text] if text else []

    def add(self, piece: str) -> None:
        """Append one piece."""
        self._parts.append(piece)
        if len(self._parts) >= _JOIN_EVERY:
            self._parts[:] = ["".join(self._parts)]

    def clear(self) -> None:
        """Start over, empty."""
        self._parts.clear()

    def __str__(self) -> str:
        return "".join(self._parts)


def starts_over(entry: Entry) -> bool:
    """Whether the entry voids the text before it (a new attempt with the `restart` policy)."""
    return isinstance(entry, AttemptEntry) and entry.policy == Policy.RESTART


class Transcript:
    """The text of one stream so far, and how many tokens it holds."""

    def __init__(self) -> None:
        self._text = TextBuffer()
        self.tokens = 0
        self.restarts = 0

    def add(self, entry: Entry) -> None:
        """Take the next entry of the stream (entries but tokens and restarts are ignored)."""
        if isinstance(entry, TokenEntry):
            self._text.add(entry.text)
            self.tokens += entry.count
        elif starts_over(entry):
            self._text.clear()
            self.tokens = 0
            self.restarts += 1

    @property
    def text(self) -> str:
        """The text so far."""
        return str(self._text)
