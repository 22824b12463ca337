"""Logging configuration, called once by an entry point (the CLI); library code only logs.

Pretty lines on a terminal, JSON lines otherwise. RQ's own stdlib logging goes
through the same renderer, so an operator's log is one format.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

from tokenrelay.settings import LogFormat

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}


def configure(fmt: LogFormat = "auto", level: str = "info", stream: Any = None) -> None:
    """Route structlog and stdlib logging to `stream` (stderr) as JSON or console lines."""
    stream = stream or sys.stderr
    as_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
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
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(_LEVELS.get(level, logging.ERROR))
    # One line per HTTP request to the model adds nothing to job.started/job.finished.
    for noisy in ("httpx", "httpx2", "openai"):
        logging.getLogger(noisy).setLevel(max(root.level, logging.WARNING))
