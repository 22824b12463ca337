"""The one set of rules by which every reader decides that a job stream is intact.

The viewer, `JobHandle`, the recorder and the metrics aggregator all feed the entries they
read through a `StreamCheck`, so they agree on what a damaged stream is:

- at most one `start`, and it comes first;
- token `seq` numbers are consecutive: each entry's is the previous one's `seq + n`;
- an `attempt` entry goes on from the next `seq` (policy `continue`) or from 0 (`restart`,
  after which the text so far is void);
- one terminal entry (`end` or `error`), and nothing after it;
- an `end` counts every token of the stream (`end.tokens`), when read from the start.

The append scripts enforce the same rules on the writing side, so a stream breaks them only
if something other than tokenrelay wrote to it. A stream with a length cap
(TOKENRELAY_STREAM_MAXLEN) loses its oldest entries by design: there a jump forward in `seq`
is a `gap` the reader is told about (`GapEntry`), not damage.
"""

from __future__ import annotations

from tokenrelay.errors import ProtocolError
from tokenrelay.stream.protocol import (
    AttemptEntry,
    EndEntry,
    GapEntry,
    Policy,
    Record,
    StartEntry,
    TokenEntry,
    is_terminal,
)


class StreamCheck:
    """Checks the records of one stream in order; raises ProtocolError at the first break.

    `from_start` says whether the reader begins at the stream's first entry (a replay) or
    somewhere in the middle (a resume, a live reader), where the first token's `seq` is
    taken as given and no `start` is expected. `capped` says the stream has a length cap:
    its oldest entries may be gone, and `check` returns a `GapEntry` for tokens that were
    trimmed before they were read.
    """

    def __init__(self, key: str, *, from_start: bool = True, capped: bool = False) -> None:
        self.key = key
        self.from_start = from_start
        self.capped = capped
        self.started = False
        self.ended = False
        self.tokens = 0  # tokens of the text as it stands (a restart voids the ones before)
        self.gaps = 0  # tokens lost to the length cap
        self.next_seq: int | None = 0 if from_start else None

    def check(self, record: Record) -> GapEntry | None:
        """Accept the next record, or raise ProtocolError naming what is wrong and where; a
        gap (on a capped stream) that comes before the record is returned."""
        entry = record.entry
        if self.ended:
            raise self._broken(record, f"a {entry.kind} entry after the terminal entry")
        if isinstance(entry, TokenEntry):
            return self._token(record, entry)
        if isinstance(entry, StartEntry):
            if self.started or self.tokens or self.gaps:
                raise self._broken(record, "a second start entry, or one after the tokens")
            self.started = True
        elif isinstance(entry, AttemptEntry):
            return self._attempt(record, entry)
        elif is_terminal(entry):
            self.ended = True
            whole = self.from_start and self.started and not self.gaps
            if whole and isinstance(entry, EndEntry) and entry.tokens != self.tokens:
                raise self._broken(
                    record,
                    f"the end entry counts {entry.tokens} tokens, the stream has {self.tokens}",
                )
        return None

    def _token(self, record: Record, entry: TokenEntry) -> GapEntry | None:
        if self.from_start and not self.started and not self.capped:
            raise self._broken(record, "a token before the start entry")
        gap = self._advance(record, entry.seq, "")
        self.next_seq = entry.seq + entry.count
        self.tokens += entry.count
        return gap

    def _attempt(self, record: Record, entry: AttemptEntry) -> GapEntry | None:
        if entry.policy == Policy.RESTART:
            if entry.from_seq != 0:
                raise self._broken(record, "a restarted attempt that does not begin at token 0")
            self.next_seq, self.tokens = 0, 0
            return None
        gap = self._advance(record, entry.from_seq, "an attempt going on from ")
        self.next_seq = entry.from_seq
        return gap

    def _advance(self, record: Record, seq: int, what: str) -> GapEntry | None:
        """Check that `seq` comes next (`what` says what brings it); a jump forward on a capped
        stream is a gap."""
        expected = self.next_seq
        if expected is None or seq == expected:
            return None
        if seq > expected and self.capped:
            self.gaps += seq - expected
            return GapEntry(expected, seq - 1)
        missing = "missing" if seq > expected else "repeated"
        raise self._broken(
            record, f"token {expected} expected, got {what}{seq} (a token is {missing})"
        )

    def _broken(self, record: Record, what: str) -> ProtocolError:
        return ProtocolError(f"{self.key} is damaged at entry {record.id}: {what}")
