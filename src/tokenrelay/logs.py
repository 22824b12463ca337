"""Logging configuration, called once by an entry point (the CLI); library code only logs.

Pretty lines on a terminal, JSON lines otherwise. RQ's own stdlib logging goes
through the same renderer, so an operator's log is one format.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from typing import Any

import structlog

from tokenrelay.settings import LogFormat


class _Redact:
    """The last processor: blanks secrets out of the rendered line."""

    def __init__(self, secrets: Sequence[str]) -> None:
        self.secrets = secrets

    def __call__(self, logger: Any, name: str, line: Any) -> str:
        # Typed Any: structlog types processors as taking the event dict; after the renderer,
        # what arrives is the rendered string.
        text = str(line)
        for secret in self.secrets:
            text = text.replace(secret, "**********")
        return text


_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}


def configure(
    fmt: LogFormat = "auto",
    level: str = "info",
    stream: Any = None,
    secrets: Sequence[str] = (),
) -> None:
    """Route structlog and stdlib logging to `stream` (stderr) as JSON or console lines.

    Every rendered line has `secrets` blanked out, tracebacks included: a server may quote
    the API key it was sent in an error message.
    """
    stream = stream or sys.stderr
    as_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    # Tracebacks are plain in both formats: structlog's default console formatter, with
    # `rich` installed, prints each frame's local variables, and a job's locals hold its prompt.
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(
            colors=stream.isatty(), exception_formatter=structlog.dev.plain_traceback
        )
    )
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                # The console renderer draws tracebacks itself; JSON wants them as a string.
                *([structlog.processors.format_exc_info] if as_json else []),
                renderer,
                _Redact([s for s in secrets if s]),
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(_LEVELS.get(level, logging.ERROR))
    # One line per HTTP request to the model adds nothing to job.started/job.finished.
    for noisy in ("httpx", "httpx2", "openai"):
        logging.getLogger(noisy).setLevel(max(root.level, logging.WARNING))
