"""Continuing a cut-off answer: over any text and any cut, readers see the text once.

`Seam` passes a continuation's tokens on minus a passage it repeats from the text so far.
Properties over arbitrary texts, cut points, token splits and repeats: a continuation that
repeats the tail of the text (by at least `MIN_OVERLAP` characters) loses exactly the repeat,
and one that does not begin with such a repeat passes through unchanged.
"""

from __future__ import annotations

import itertools

from hypothesis import assume, given, settings
from hypothesis import strategies as st
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

from tokenrelay.worker.continuation import CONTINUE, MIN_OVERLAP, Seam, continuation, overlap

PROPERTIES = settings(max_examples=300, deadline=None, database=None)


@st.composite
def split(draw: st.DrawFn, text: str) -> list[str]:
    """`text` cut into non-empty tokens at arbitrary points."""
    cuts = sorted(draw(st.sets(st.integers(1, max(len(text) - 1, 1)), max_size=len(text))))
    bounds = [0, *(c for c in cuts if c < len(text)), len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds) if b > a]


def through(seam: Seam, tokens: list[str]) -> str:
    """What the seam publishes for `tokens`, then at the attempt's end."""
    out = [part for token in tokens for part in seam.feed(token)]
    return "".join(out + seam.flush())


@PROPERTIES
@given(st.data(), st.text(min_size=1), st.text(min_size=1))
def test_a_continuation_without_a_repeat_passes_through_unchanged(
    data: st.DataObject, before: str, after: str
) -> None:
    """The model went on where the text stopped: nothing is held back for good or dropped."""
    assume(overlap(before, after) == 0)
    assert through(Seam(before), data.draw(split(after))) == after


@PROPERTIES
@given(st.data(), st.text(min_size=MIN_OVERLAP), st.text())
def test_a_continuation_that_repeats_the_tail_loses_exactly_the_repeat(
    data: st.DataObject, before: str, rest: str
) -> None:
    """The model first said again the last characters of the text: readers see them once."""
    size = data.draw(st.integers(MIN_OVERLAP, min(len(before), 400)))
    repeat = before[-size:]
    assume(overlap(before, repeat + rest) == size)  # no longer repeat hides in `rest`
    assert before + through(Seam(before), data.draw(split(repeat + rest))) == before + rest


def test_nothing_before_means_nothing_is_held() -> None:
    """The first attempt has no text to repeat: every token is published as it comes."""
    seam = Seam("")
    assert seam.feed("Hello") == ["Hello"]
    assert seam.flush() == []


def test_the_continuation_request_carries_the_text_so_far_and_the_instruction() -> None:
    """The model is sent the same messages, its partial answer, and the instruction to go on."""
    messages = [SystemMessage(content="be brief"), HumanMessage(content="count")]
    assert continuation(messages, "") == messages
    assert continuation(messages, "one, two,") == [
        *messages,
        AIMessage(content="one, two,"),
        HumanMessage(content=CONTINUE),
    ]
