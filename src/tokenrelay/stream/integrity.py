"""The one set of rules by which every reader decides that a job stream is intact.

The viewer, `JobHandle`, the recorder and the metrics aggregator all feed the entries they
read through a `StreamCheck`, so they agree on what a damaged stream is:

- at most one `start`, and it comes first;
- token `seq` numbers are consecutive: each entry's is the previous one's `seq + n`;
- one terminal entry (`end` or `error`), and nothing after it;
- an `end` counts every token of the stream (`end.tokens`), when read from the start.

The append scripts enforce the same rules on the writing side, so a stream breaks them only
if something other than tokenrelay wrote to it (or it was trimmed).
"""

from __future__ import annotations

from tokenrelay.errors import ProtocolError
from tokenrelay.stream.protocol import EndEntry, Record, StartEntry, TokenEntry, is_terminal


class StreamCheck:
    """Checks the records of one stream in order; raises ProtocolError at the first break.

    `from_start` says whether the reader begins at the stream's first entry (a replay) or
    somewhere in the middle (a resume, a live reader), where the first token's `seq` is
    taken as given and no `start` is expected.
    """

    def __init__(self, key: str, *, from_start: bool = True) -> None:
        self.key = key
        self.from_start = from_start
        self.started = False
        self.ended = False
        self.tokens = 0
        self.next_seq: int | None = 0 if from_start else None

    def check(self, record: Record) -> None:
        """Accept the next record, or raise ProtocolError naming what is wrong and where."""
        entry = record.entry
        if self.ended:
            raise self._broken(record, f"a {entry.kind} entry after the terminal entry")
        if isinstance(entry, StartEntry):
            if self.started or self.tokens:
                raise self._broken(record, "a second start entry, or one after the tokens")
            self.started = True
        elif isinstance(entry, TokenEntry):
            self._token(record, entry)
        elif is_terminal(entry):
            self.ended = True
            whole = self.from_start and self.started
            if whole and isinstance(entry, EndEntry) and entry.tokens != self.tokens:
                raise self._broken(
                    record,
                    f"the end entry counts {entry.tokens} tokens, the stream has {self.tokens}",
                )

    def _token(self, record: Record, entry: TokenEntry) -> None:
        if self.from_start and not self.started:
            raise self._broken(record, "a token before the start entry")
        if self.next_seq is not None and entry.seq != self.next_seq:
            what = "missing" if entry.seq > self.next_seq else "repeated"
            raise self._broken(
                record, f"token {self.next_seq} expected, got {entry.seq} (a token is {what})"
            )
        self.next_seq = entry.seq + entry.count
        self.tokens += entry.count

    def _broken(self, record: Record, what: str) -> ProtocolError:
        return ProtocolError(f"{self.key} is damaged at entry {record.id}: {what}")
