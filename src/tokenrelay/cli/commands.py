"""The commands of the `tokenrelay` CLI: each takes the parsed arguments and the settings,
and delegates to the library. Argument parsing is `tokenrelay.cli`.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path

from tokenrelay.cli.progress import Progress
from tokenrelay.connection import client_for
from tokenrelay.consumer.viewer import view
from tokenrelay.errors import BatchInterruptedError, InvalidRequestError
from tokenrelay.producer.batch import load_batch
from tokenrelay.producer.handle import JobHandle
from tokenrelay.producer.relay import Relay
from tokenrelay.settings import Settings
from tokenrelay.stream import keys
from tokenrelay.stream.protocol import ErrorEntry
from tokenrelay.stream.reader import BEGINNING
from tokenrelay.terminal import printable

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def _follow(
    handle: JobHandle, *, after: str = BEGINNING, live: bool = False, timeout: float | None = None
) -> int:
    entry = view(handle, sys.stdout, after=after, live=live, timeout=timeout)
    sys.stdout.write("\n")
    if isinstance(entry, ErrorEntry):
        reason = f"{entry.error_type}: {printable(entry.message)}"
        print(f"tokenrelay: job {handle.job_id} failed: {reason}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _stdin_text() -> str:
    """Standard input, which must be UTF-8 (read as bytes: no decoding error turns into text)."""
    raw = sys.stdin.buffer.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = raw[exc.start : exc.start + 1]
        raise InvalidRequestError(
            f"standard input is not valid UTF-8 (byte {exc.start}: {bad!r})"
        ) from None


def _write_ids(handles: list[JobHandle], path: Path | None) -> None:
    ids = "".join(f"{h.job_id}\n" for h in handles)
    if path:
        path.write_text(ids)
    else:
        sys.stdout.write(ids)


#: The options of `submit` that describe one prompt: with --file each line gives its own.
_ONE_PROMPT_OPTIONS = {
    "system": "--system",
    "model": "--model",
    "max_tokens": "--max-tokens",
    "temperature": "--temperature",
    "timeout": "--timeout",
    "first_token_timeout": "--first-token-timeout",
    "stall_timeout": "--stall-timeout",
    "attempt_timeout": "--attempt-timeout",
    "job_id": "--job-id",
    "idempotency_key": "--idempotency-key",
    "meta": "--meta",
    "follow": "--follow",
    "follow_timeout": "--follow-timeout",
}


def _refuse_one_prompt_options(args: argparse.Namespace) -> None:
    """With --file, options meant for one prompt would be silently ignored: refuse them."""
    given = [
        flag
        for name, flag in _ONE_PROMPT_OPTIONS.items()
        if getattr(args, name) is not None and getattr(args, name) is not False
    ]
    if given:
        raise InvalidRequestError(
            f"{', '.join(given)} cannot be used with --file: "
            "give each line of the file its own fields"
        )


def _submit_batch(args: argparse.Namespace, relay: Relay) -> int:
    _refuse_one_prompt_options(args)
    items = load_batch(args.file)
    progress = Progress(len(items), sys.stderr, "submitted")
    try:
        handles = relay.submit_many(items, progress=progress)
    except BatchInterruptedError as exc:
        _write_ids(exc.queued, args.ids_out)  # what was queued must not be lost
        raise
    _write_ids(handles, args.ids_out)
    return EXIT_OK


def cmd_submit(args: argparse.Namespace, settings: Settings) -> int:
    if (args.prompt is None) == (args.file is None):
        raise InvalidRequestError("give a PROMPT (or - to read it from stdin) or --file, not both")
    with Relay.from_env(settings) as relay:
        if args.file is not None:
            return _submit_batch(args, relay)
        prompt = _stdin_text() if args.prompt == "-" else args.prompt
        messages = None
        if args.system is not None:
            messages = [
                {"role": "system", "content": args.system},
                {"role": "user", "content": prompt},
            ]
            prompt = None
        handle = relay.submit(
            prompt,
            messages=messages,
            model=args.model,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            timeout=args.timeout,
            first_token_timeout=args.first_token_timeout,
            stall_timeout=args.stall_timeout,
            attempt_timeout=args.attempt_timeout,
            job_id=args.job_id,
            idempotency_key=args.idempotency_key,
            metadata=dict(args.meta or []),
        )
        print(handle.job_id, file=sys.stderr if args.follow else sys.stdout)
        return _follow(handle, timeout=args.follow_timeout) if args.follow else EXIT_OK


def cmd_watch(args: argparse.Namespace, settings: Settings) -> int:
    with Relay.from_env(settings) as relay:
        handle = relay.job(args.job_id)
        handle.status()  # raises JobNotFoundError for an unknown job
        return _follow(handle, after=args.from_id, live=args.live, timeout=args.timeout)


def cmd_cancel(args: argparse.Namespace, settings: Settings) -> int:
    with Relay.from_env(settings) as relay:
        for job_id in args.job_ids:
            handle = relay.job(job_id)
            handle.status()
            print(f"{job_id}: {'cancelled' if handle.cancel() else 'had already ended'}")
    return EXIT_OK


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    from tokenrelay.worker.runner import run_worker

    run_worker(
        settings,
        queues=args.queue or (),
        burst=args.burst,
        name=args.name,
        concurrency=args.concurrency,
    )
    return EXIT_OK


def _stop_on_signals() -> threading.Event:
    """An event set by the first SIGINT or SIGTERM, for a clean stop between events."""
    stop = threading.Event()

    def handle(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGINT, handle)
    signal.signal(signal.SIGTERM, handle)
    return stop


def cmd_record(args: argparse.Namespace, settings: Settings) -> int:
    from tokenrelay.consumer.group import GroupConsumer
    from tokenrelay.consumer.recorder import Recorder

    client = client_for(settings)
    consumer = GroupConsumer(
        client,
        keys.RECORDER_GROUP,
        args.name,
        claim_after=args.claim_after,
        max_deliveries=args.max_deliveries,
        retry_delay=args.retry_delay,
    )
    recorder = Recorder(client, args.dir)
    if args.once:
        consumer.run_until_idle(recorder)
    else:
        consumer.run(recorder, _stop_on_signals())
    return EXIT_OK


def cmd_metrics(args: argparse.Namespace, settings: Settings) -> int:
    from tokenrelay.consumer.exporter import serve_metrics

    serve_metrics(
        client_for(settings),
        host=args.host,
        port=args.port,
        consumer=args.name,
        interval=args.interval,
        stop=_stop_on_signals(),
        out=sys.stdout,
        claim_after=args.claim_after,
        max_deliveries=args.max_deliveries,
        retry_delay=args.retry_delay,
    )
    return EXIT_OK


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    from tokenrelay.status import collect_status, render

    client = client_for(settings)
    status = collect_status(client, args.queue or [settings.queue])
    if args.json:
        print(json.dumps(status.as_dict(), indent=2))
    else:
        sys.stdout.write(render(status))
    return EXIT_OK


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    from tokenrelay.gateway.server import serve

    serve(settings, host=args.host, port=args.port)
    return EXIT_OK


def cmd_hash_key(args: argparse.Namespace, settings: Settings) -> int:
    from tokenrelay.gateway.auth import hash_key, new_key

    if args.stdin:
        key = sys.stdin.readline().strip()
        if not key:
            raise InvalidRequestError("no key on standard input")
        print(hash_key(key))
        return EXIT_OK
    key = new_key()
    print(f"key:  {key}\nhash: {hash_key(key)}")
    print("give the key to its user; put the hash in TOKENRELAY_GATEWAY_API_KEYS", file=sys.stderr)
    return EXIT_OK


def cmd_llm_serve(args: argparse.Namespace, settings: Settings) -> int:
    from tokenrelay.dev.local_model import serve

    return serve(
        args.model_path,
        args.port,
        chat_format=args.chat_format,
        n_ctx=args.n_ctx,
        threads=args.threads,
    )


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from tokenrelay.dev.demo import run_demo

    return run_demo(
        settings,
        prompt=args.prompt,
        max_tokens=args.max_tokens,
        transcripts=args.transcripts,
        stay=args.stay,
    )
