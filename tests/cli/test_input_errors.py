"""Bad input to the command line: one clear line on stderr, exit code 2, nothing queued."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from redis import Redis

from tokenrelay.connection import connect
from tokenrelay.dev.redis_server import RedisServer


def cli(
    env: dict[str, str], *args: str, stdin: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    """Run `python -m tokenrelay ARGS` to completion."""
    return subprocess.run(
        [sys.executable, "-m", "tokenrelay", *args],
        env=env,
        input=stdin,
        capture_output=True,
        timeout=60,
        check=False,
    )


def refused(done: subprocess.CompletedProcess[bytes], redis_client: Redis) -> str:
    """The one line a refused command printed; it exited 2 and queued nothing."""
    text = done.stderr.decode()
    assert done.returncode == 2, text
    assert text.count("\n") == 1, text
    assert "Traceback" not in text
    assert redis_client.dbsize() == 0  # the Redis the command was pointed at
    return text.strip()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "prompts.jsonl: cannot read it (No such file or directory)"),
        ("directory", "prompts.jsonl: cannot read it (Is a directory)"),
        (b'"fine"\n"caf\xe9"\n', "prompts.jsonl:2: not valid UTF-8"),
        (b"[" * 100_000 + b"]" * 100_000 + b"\n", "prompts.jsonl:1: nested too deeply"),
        (b'{"prompt": "x", "metadata": {"n": NaN}}\n', "prompts.jsonl:1: NaN is not JSON"),
    ],
)
def test_a_batch_file_that_cannot_be_read_is_one_line(
    env: dict[str, str],
    redis_client: Redis,
    tmp_path: Path,
    content: bytes | str | None,
    message: str,
) -> None:
    """A missing file, a directory, bad UTF-8, deep nesting, NaN: each named on one line."""
    batch = tmp_path / "prompts.jsonl"
    if content == "directory":
        batch.mkdir()
    elif isinstance(content, bytes):
        batch.write_bytes(content)
    line = refused(cli(env, "submit", "--file", str(batch)), redis_client)
    assert message in line


def test_stdin_that_is_not_utf8_is_named_as_such(env: dict[str, str], redis_client: Redis) -> None:
    """Invalid UTF-8 on standard input is reported as that, not as a lone surrogate."""
    line = refused(cli(env, "submit", "-", stdin=b"caf\xe9 au lait"), redis_client)
    assert (
        line == "tokenrelay: invalid request: standard input is not valid UTF-8 (byte 3: b'\\xe9')"
    )


def test_a_huge_job_id_is_not_echoed_whole(env: dict[str, str], redis_client: Redis) -> None:
    """A 10,000-character job id is refused in a line of reasonable length."""
    line = refused(cli(env, "submit", "hi", "--job-id", "x" * 10_000), redis_client)
    assert "is not allowed" in line
    assert len(line) < 200


def test_a_redis_url_whose_database_is_not_a_number_is_refused(
    env: dict[str, str], redis_client: Redis
) -> None:
    """`redis://host:port/abc` would silently mean database 0; it is refused instead."""
    url = env["TOKENRELAY_REDIS_URL"].rsplit("/", 1)[0] + "/abc"
    line = refused(cli(env, "--redis-url", url, "submit", "hi"), redis_client)
    assert "the database (after the last /) must be a number, got 'abc'" in line


def test_a_redis_that_needs_a_password_says_so(env: dict[str, str], redis_client: Redis) -> None:
    """No password, or a wrong one, for a Redis that requires one: say what to put in the URL."""
    with RedisServer(password="s3cret") as locked:
        locked_client = connect(locked.url)
        bare = locked.url.replace(":s3cret@", "")
        line = refused(cli(env, "--redis-url", bare, "submit", "hi"), locked_client)
        assert "needs a password: put it in the URL (redis://:PASSWORD@host:port/0)" in line
        wrong = locked.url.replace("s3cret", "guess")
        line = refused(cli(env, "--redis-url", wrong, "submit", "hi"), locked_client)
        assert "refused the password" in line
        assert "guess" not in line
        locked_client.close()
