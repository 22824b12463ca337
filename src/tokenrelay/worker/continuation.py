"""Continuing a cut-off answer: the request that asks for the rest, and the seam's repair.

When an attempt fails after streaming part of the answer, the next one sends the same
messages, then the text so far as the assistant's message, then an instruction to go on
from exactly there. Models mostly do; some first repeat the last few words. `Seam` holds
back the first characters of the new attempt until it can tell, and drops a repeated
passage (at least `MIN_OVERLAP` characters that the text so far ends with), so readers see
one text with no passage twice.
"""

from __future__ import annotations

from collections.abc import Sequence

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage

#: The instruction that follows the partial answer.
CONTINUE = (
    "Your answer above was cut off. Continue it exactly where it stops, mid-word if it stops "
    "mid-word. Do not repeat any of it and do not add anything before the continuation."
)

#: The shortest repeated passage that is dropped: shorter matches are too likely to be the
#: text going on by itself ("the" after "the").
MIN_OVERLAP = 8

#: The most characters of a new attempt held back while looking for a repeat.
MAX_HOLD = 400


def continuation(messages: Sequence[BaseMessage], partial: str) -> list[BaseMessage]:
    """The messages that ask the model to go on from `partial`."""
    if not partial:
        return list(messages)
    return [*messages, AIMessage(content=partial), HumanMessage(content=CONTINUE)]


def overlap(before: str, after: str) -> int:
    """The length of the longest passage of at least MIN_OVERLAP characters that `before` ends
    with and `after` begins with; 0 if there is none."""
    longest = min(len(before), len(after), MAX_HOLD)
    for size in range(longest, MIN_OVERLAP - 1, -1):
        if before.endswith(after[:size]):
            return size
    return 0


class Seam:
    """Passes a continuation's tokens on, minus a passage it repeats from the text so far.

    `feed` takes each new token and returns the tokens to publish now: none while the
    start of the continuation could still be a repeat, then the held tokens with the repeat
    cut off, then every token as it comes. `flush` releases what is held when the attempt
    ends. The cost is a delay of the continuation's first characters, never of later ones.
    """

    def __init__(self, before: str) -> None:
        self._tail = before[-MAX_HOLD:]
        self._held: list[str] = []
        self._size = 0
        self.open = not before  # nothing to repeat: pass everything through
        self.dropped = 0  # characters dropped as repeated

    def feed(self, token: str) -> list[str]:
        """The tokens to publish now that `token` arrived."""
        if self.open:
            return [token]
        self._held.append(token)
        self._size += len(token)
        held = "".join(self._held)
        if self._size < MAX_HOLD and held in self._tail[:-1]:
            return []  # it could be the start of a repeat longer than itself: wait and see
        if self._size < MAX_HOLD and self._tail.endswith(held) and self._size < MIN_OVERLAP:
            return []  # too short yet to tell a repeat from the text going on
        return self.flush()

    def flush(self) -> list[str]:
        """Release the held tokens, without the passage they repeat."""
        if self.open:
            return []
        self.open = True
        cut = overlap(self._tail, "".join(self._held))
        self.dropped = cut
        out = []
        for token in self._held:
            if cut >= len(token):
                cut -= len(token)
                continue
            out.append(token[cut:])
            cut = 0
        self._held = []
        return out
