"""The `tokenrelay` command: parses arguments, builds settings, and delegates."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from tokenrelay import logs
from tokenrelay.cli import commands
from tokenrelay.cli.commands import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE
from tokenrelay.errors import ConfigurationError, InvalidRequestError, TokenRelayError
from tokenrelay.settings import Settings
from tokenrelay.stream.reader import BEGINNING

Command = Callable[[argparse.Namespace, Settings], int]


def _positive(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {raw!r}")
    return value


def _meta(raw: str) -> tuple[str, str]:
    key, sep, value = raw.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {raw!r}")
    return key, value


def _poison_options(p: argparse.ArgumentParser) -> None:
    """The options of a consumer group member for events its handler fails on."""
    p.add_argument(
        "--max-deliveries",
        type=int,
        default=5,
        metavar="N",
        help="move an event that failed N times to tokenrelay:dead-letter (default 5)",
    )
    p.add_argument(
        "--retry-delay",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="wait this long before trying a failed event again, doubling each time (default 1)",
    )


def _submit_options(p: argparse.ArgumentParser) -> None:
    """The options of `submit`, in groups: what to generate, its limits, the job, a batch."""
    p.add_argument("prompt", nargs="?", help="the prompt; - reads it from stdin")
    what = p.add_argument_group("what to generate")
    what.add_argument("--system", metavar="TEXT", help="a system message to send before the prompt")
    what.add_argument("--model", help="model name (default: the worker's TOKENRELAY_MODEL)")
    what.add_argument("--max-tokens", type=int, metavar="N", help="most tokens to generate")
    what.add_argument("--temperature", type=float, metavar="T", help="sampling temperature, 0 to 2")
    limits = p.add_argument_group("time limits")
    limits.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help="the most the job may run, over all its attempts, before it fails "
        "(default: TOKENRELAY_JOB_TIMEOUT)",
    )
    limits.add_argument(
        "--first-token-timeout",
        type=float,
        metavar="SECONDS",
        help="the most an attempt may wait for its first token before it is retried "
        "(default: the worker's TOKENRELAY_FIRST_TOKEN_TIMEOUT)",
    )
    limits.add_argument(
        "--stall-timeout",
        type=float,
        metavar="SECONDS",
        help="the most an attempt may wait between two tokens before it is retried "
        "(default: the worker's TOKENRELAY_STALL_TIMEOUT)",
    )
    limits.add_argument(
        "--attempt-timeout",
        type=float,
        metavar="SECONDS",
        help="the most one attempt may take in all before it is retried "
        "(default: the worker's TOKENRELAY_ATTEMPT_TIMEOUT; 0 there means no limit but "
        "the job's)",
    )
    job = p.add_argument_group("the job")
    job.add_argument("--job-id", metavar="ID", help="choose the job id (letters, digits, _ and -)")
    job.add_argument(
        "--idempotency-key",
        metavar="KEY",
        help="queue at most one job per KEY: submitting KEY again within "
        "TOKENRELAY_IDEMPOTENCY_WINDOW prints the first job's id (up to 200 printable ASCII "
        "characters, no spaces)",
    )
    job.add_argument(
        "--meta",
        type=_meta,
        action="append",
        metavar="KEY=VALUE",
        help="metadata to attach to the job (repeatable)",
    )
    job.add_argument(
        "--follow", "-f", action="store_true", help="also print the text as it arrives"
    )
    job.add_argument(
        "--follow-timeout",
        type=float,
        metavar="SECONDS",
        help="with --follow: stop following after this many seconds (exit 1)",
    )
    batch = p.add_argument_group("a batch")
    batch.add_argument(
        "--file",
        type=Path,
        metavar="PATH",
        help="submit every line of a JSON Lines file: a prompt string, or an object with "
        "submit's fields (prompt or messages, model, max_tokens, temperature, timeout, "
        "first_token_timeout, stall_timeout, attempt_timeout, job_id, idempotency_key, "
        "metadata)",
    )
    batch.add_argument(
        "--ids-out",
        type=Path,
        metavar="PATH",
        help="with --file: write the job ids here, not stdout",
    )


def parser() -> argparse.ArgumentParser:
    """The argument parser of the `tokenrelay` command."""
    top = argparse.ArgumentParser(
        prog="tokenrelay",
        description="Run LLM generations as queued jobs and stream their tokens through Redis.",
        epilog="Settings come from environment variables (see the README); "
        "the options here override them.",
    )
    top.add_argument("--redis-url", help="Redis to use (env TOKENRELAY_REDIS_URL)")
    top.add_argument("--queue", dest="default_queue", help="queue name (env TOKENRELAY_QUEUE)")
    top.add_argument(
        "--log-format",
        choices=["auto", "json", "console"],
        help="log format (env TOKENRELAY_LOG_FORMAT; auto: console on a terminal)",
    )
    top.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        help="log level (env TOKENRELAY_LOG_LEVEL)",
    )
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "submit",
        help="queue a generation (or a batch) and print its job id",
        description="Queue a generation (or a batch) and print its job id.",
    )
    _submit_options(p)
    p.set_defaults(run=commands.cmd_submit)

    p = sub.add_parser("watch", help="print a job's text as it arrives (replays from the start)")
    p.add_argument("job_id")
    p.add_argument(
        "--from",
        dest="from_id",
        default=BEGINNING,
        metavar="ENTRY_ID",
        help="resume after this stream entry id",
    )
    p.add_argument("--live", action="store_true", help="show only tokens generated from now on")
    p.add_argument("--timeout", type=float, help="give up after this many seconds")
    p.set_defaults(run=commands.cmd_watch)

    p = sub.add_parser("cancel", help="cancel jobs: queued ones never run, running ones stop")
    p.add_argument("job_ids", nargs="+", metavar="JOB_ID")
    p.set_defaults(run=commands.cmd_cancel)

    p = sub.add_parser(
        "worker", help="run a worker (Ctrl-C: finish the jobs in flight and stop; twice: now)"
    )
    p.add_argument("--queue", action="append", help="queue to work on (repeatable)")
    p.add_argument(
        "--concurrency",
        type=_positive,
        metavar="N",
        help="generations at once in this process (env TOKENRELAY_WORKER_CONCURRENCY, 100)",
    )
    p.add_argument("--burst", action="store_true", help="stop when the queues are empty")
    p.add_argument("--name", help="worker name (default: generated)")
    p.set_defaults(run=commands.cmd_worker)

    p = sub.add_parser("record", help="write a transcript of every job that ends (a consumer)")
    p.add_argument("--dir", type=Path, required=True, help="where transcripts are written")
    p.add_argument(
        "--name", help="this recorder's name in its group (stable: resume after a crash)"
    )
    p.add_argument(
        "--claim-after",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="take over events another recorder left unfinished this long (default 60)",
    )
    p.add_argument("--once", action="store_true", help="record what has ended so far, then exit")
    _poison_options(p)
    p.set_defaults(run=commands.cmd_record)

    p = sub.add_parser("metrics", help="aggregate job metrics and serve them to Prometheus")
    p.add_argument("--host", default="127.0.0.1", help="address to serve /metrics on")
    p.add_argument("--port", type=int, default=9464, help="port to serve /metrics on (9464)")
    p.add_argument(
        "--interval",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="print a summary this often; 0 turns it off (default 30)",
    )
    p.add_argument("--name", help="this aggregator's name in its group (stable: resume)")
    p.add_argument(
        "--claim-after",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="take over events another aggregator left unfinished this long",
    )
    _poison_options(p)
    p.set_defaults(run=commands.cmd_metrics)

    p = sub.add_parser("status", help="queues, workers, jobs in flight, failures, consumer lag")
    p.add_argument("--queue", action="append", help="queue to show (repeatable)")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.set_defaults(run=commands.cmd_status)

    p = sub.add_parser(
        "serve", help="serve the browser gateway: HTTP API, event streams, watch and ops pages"
    )
    p.add_argument("--host", help="address to listen on (env TOKENRELAY_GATEWAY_HOST)")
    p.add_argument("--port", type=int, help="port to listen on (env TOKENRELAY_GATEWAY_PORT)")
    p.set_defaults(run=commands.cmd_serve)

    p = sub.add_parser(
        "hash-key",
        help="make a gateway API key (or hash one read from stdin) for TOKENRELAY_GATEWAY_API_KEYS",
    )
    p.add_argument("--stdin", action="store_true", help="hash the key given on stdin")
    p.set_defaults(run=commands.cmd_hash_key)

    p = sub.add_parser("llm", help="a local OpenAI-compatible model server (tokenrelay[local])")
    llm = p.add_subparsers(dest="llm_command", required=True, metavar="COMMAND")
    p = llm.add_parser("serve", help="serve the bundled Gemma 3 270M (or a GGUF) on loopback")
    p.add_argument(
        "--model-path", type=Path, help="a GGUF file to serve instead of the bundled one"
    )
    p.add_argument("--port", type=int, help="port on 127.0.0.1 (default: a free one)")
    p.add_argument(
        "--chat-format",
        default="instruction",
        help="prompt format: 'instruction' (ours, for the base model) or one of "
        "llama-cpp-python's (chatml, llama-2, gemma, ...)",
    )
    p.add_argument("--n-ctx", type=int, default=4096, help="context size in tokens (4096)")
    p.add_argument("--threads", type=int, help="CPU threads (default: llama.cpp's choice)")
    p.set_defaults(run=commands.cmd_llm_serve)

    p = sub.add_parser("demo", help="start what is missing, run a generation, show it live")
    p.add_argument(
        "prompt", nargs="?", default="Explain what a Redis stream is, in three sentences."
    )
    p.add_argument("--max-tokens", type=int, default=200, help="most tokens to generate")
    p.add_argument(
        "--transcripts",
        type=Path,
        default=Path("transcripts"),
        help="where the demo's recorder writes (default ./transcripts)",
    )
    p.add_argument(
        "--stay",
        action="store_true",
        help="after the generation, keep everything (the gateway and its pages) up until Ctrl-C",
    )
    p.set_defaults(run=commands.cmd_demo)
    return top


#: The global options, by the environment variable each one overrides.
_GLOBAL_OPTIONS = {
    "redis_url": "TOKENRELAY_REDIS_URL",
    "default_queue": "TOKENRELAY_QUEUE",
    "log_format": "TOKENRELAY_LOG_FORMAT",
    "log_level": "TOKENRELAY_LOG_LEVEL",
}


def _overrides(args: argparse.Namespace) -> dict[str, str]:
    """The global options given, as the environment variables they stand for (checked alike)."""
    given = {env: getattr(args, name) for name, env in _GLOBAL_OPTIONS.items()}
    return {env: value for env, value in given.items() if value is not None}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; the process exit code."""
    args = parser().parse_args(argv)
    try:
        settings = Settings.from_env({**os.environ, **_overrides(args)})
        logs.configure(
            settings.log_format, settings.log_level, secrets=[settings.openai_api_key.reveal()]
        )
        run: Command = args.run
        return run(args, settings)
    except InvalidRequestError as exc:
        print(f"tokenrelay: invalid request: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ConfigurationError as exc:
        print(f"tokenrelay: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except TokenRelayError as exc:
        print(f"tokenrelay: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("\ntokenrelay: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
