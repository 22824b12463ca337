"""Batches of prompts from a JSON Lines file, for `tokenrelay submit --file`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenrelay.errors import InvalidRequestError

#: The keys a batch line may carry: the keyword arguments of `Relay.submit`.
FIELDS = frozenset(
    {"prompt", "messages", "model", "max_tokens", "temperature", "job_id", "metadata"}
)


def load_batch(path: Path) -> list[dict[str, Any]]:
    """Every line of the file as `submit` arguments; a line is a JSON string or object.

    Raises InvalidRequestError naming the first bad line; blank lines are skipped.
    """
    items = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InvalidRequestError(f"{path}:{number}: not JSON ({exc.msg})") from None
            if isinstance(value, str):
                value = {"prompt": value}
            if not isinstance(value, dict):
                raise InvalidRequestError(f"{path}:{number}: expected a string or an object")
            unknown = set(value) - FIELDS
            if unknown:
                raise InvalidRequestError(
                    f"{path}:{number}: unknown field {sorted(unknown)[0]!r} "
                    f"(allowed: {', '.join(sorted(FIELDS))})"
                )
            items.append(value)
    if not items:
        raise InvalidRequestError(f"{path}: no prompts in the file")
    return items
