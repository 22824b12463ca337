"""Batches of prompts from a JSON Lines file, for `tokenrelay submit --file`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenrelay.errors import InvalidRequestError
from tokenrelay.producer.request import SUBMIT_FIELDS, shown


def _not_json(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def load_batch(path: Path) -> list[dict[str, Any]]:
    """Every line of the file as `submit` arguments; a line is a JSON string or object.

    Raises InvalidRequestError naming the first bad line; blank lines are skipped.
    """
    try:
        raw = path.read_bytes()
    except OSError as exc:  # missing, a directory, unreadable
        raise InvalidRequestError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    try:
        content = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        where = raw.count(b"\n", 0, exc.start) + 1
        raise InvalidRequestError(f"{path}:{where}: not valid UTF-8 (byte {exc.start})") from None
    items = []
    for number, line in enumerate(content.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line, parse_constant=_not_json)
        except json.JSONDecodeError as exc:
            raise InvalidRequestError(f"{path}:{number}: not JSON ({exc.msg})") from None
        except RecursionError:
            raise InvalidRequestError(f"{path}:{number}: nested too deeply") from None
        except ValueError as exc:
            raise InvalidRequestError(f"{path}:{number}: {exc}") from None
        if isinstance(value, str):
            value = {"prompt": value}
        if not isinstance(value, dict):
            raise InvalidRequestError(f"{path}:{number}: expected a string or an object")
        unknown = set(value) - SUBMIT_FIELDS
        if unknown:
            raise InvalidRequestError(
                f"{path}:{number}: unknown field {shown(sorted(unknown)[0])} "
                f"(allowed: {', '.join(sorted(SUBMIT_FIELDS))})"
            )
        items.append(value)
    if not items:
        raise InvalidRequestError(f"{path}: no prompts in the file")
    return items
