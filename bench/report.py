"""Recording a benchmark's results: printed, and added to bench/RESULTS.md (newest first)."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")
_FIRST_SECTION = "\n## "


def record(section: str) -> None:
    """Print `section` (Markdown, starting with `## `) and put it at the top of RESULTS.md."""
    print(section)
    text = RESULTS.read_text()
    head, found, rest = text.partition(_FIRST_SECTION)
    RESULTS.write_text(
        f"{head}\n{section.rstrip()}\n{found}{rest}" if found else f"{text}\n{section}"
    )
