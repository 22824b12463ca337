"""Worker (and other `tokenrelay`) processes started by tests, with their logs and output,
stopped (SIGKILL) at the end."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class WorkerProcess:
    """A `tokenrelay` child process (a worker, or another command), its log and its output."""

    process: subprocess.Popen[bytes]
    log_path: Path
    out_path: Path | None = None

    def output(self) -> str:
        """What it printed to stdout so far (a command started with its own stdout)."""
        assert self.out_path is not None, "this process writes stdout into its log"
        return self.out_path.read_text(encoding="utf-8")

    def logs(self) -> list[dict[str, Any]]:
        """The JSON log lines written so far."""
        lines = self.log_path.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def wait(self, timeout: float = 60) -> int:
        """Wait for the process to exit; its exit code."""
        return self.process.wait(timeout=timeout)

    def signal(self, signum: int) -> None:
        """Send a signal to the worker process."""
        self.process.send_signal(signum)

    @property
    def pid(self) -> int:
        """The worker's process id (its jobs run in this process)."""
        return self.process.pid


@dataclass
class Workers:
    """Starts worker processes for a test and stops them all afterwards."""

    env: dict[str, str]
    directory: Path
    started: list[WorkerProcess] = field(default_factory=list)

    def start(
        self, *args: str, burst: bool = False, env: dict[str, str] | None = None
    ) -> WorkerProcess:
        """Start `tokenrelay worker` with the test's environment (plus `env`)."""
        log_path = self.directory / f"worker-{len(self.started)}.log"
        command = [sys.executable, "-m", "tokenrelay", "worker", *args]
        if burst:
            command.append("--burst")
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                command, env={**self.env, **(env or {})}, stdout=log, stderr=log
            )
        worker = WorkerProcess(process, log_path)
        self.started.append(worker)
        return worker

    def command(self, *args: str, env: dict[str, str] | None = None) -> WorkerProcess:
        """Start `tokenrelay ARGS...` (a viewer, a consumer), its stdout apart from its log."""
        index = len(self.started)
        log_path = self.directory / f"{args[0]}-{index}.log"
        out_path = self.directory / f"{args[0]}-{index}.out"
        command = [sys.executable, "-m", "tokenrelay", *args]
        with log_path.open("wb") as log, out_path.open("wb") as out:
            process = subprocess.Popen(
                command, env={**self.env, **(env or {})}, stdout=out, stderr=log
            )
        started = WorkerProcess(process, log_path, out_path)
        self.started.append(started)
        return started

    def run_burst(
        self, *args: str, timeout: float = 60, env: dict[str, str] | None = None
    ) -> WorkerProcess:
        """Run a burst worker until the queue is empty."""
        worker = self.start(*args, burst=True, env=env)
        assert worker.wait(timeout) == 0, worker.log_path.read_text()
        return worker

    def stop_all(self) -> None:
        for worker in self.started:
            if worker.process.poll() is None:
                worker.process.send_signal(signal.SIGKILL)
            worker.process.wait()
