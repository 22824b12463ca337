"""A `tokenrelay serve` process started by tests, and what tests send it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tokenrelay.dev.processes import free_port
from tokenrelay.gateway.auth import hash_key

#: The API key the test gateways accept, and another they also accept (keys are many).
API_KEY = "trk_test-api-key-0123456789abcdef"
OTHER_KEY = "trk_test-other-key-fedcba9876543210"
SECRET = "test-signing-secret-0123456789abcdef-0123"


@dataclass
class GatewayProcess:
    """A gateway child process, its base URL and its log."""

    process: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def logs(self) -> list[dict[str, Any]]:
        """The JSON log lines written so far."""
        lines = self.log_path.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def submit(self, key: str = API_KEY, **body: Any) -> dict[str, Any]:
        """POST /v1/jobs; the 201 body (fails the test on anything else)."""
        response = httpx.post(f"{self.url}/v1/jobs", json=body, headers=auth(key), timeout=30)
        assert response.status_code == 201, response.text
        created: dict[str, Any] = response.json()
        return created

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM, and wait for the exit; its code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)


def auth(credential: str) -> dict[str, str]:
    """The header that carries an API key or a read token."""
    return {"Authorization": f"Bearer {credential}"}


def start_gateway(
    env: dict[str, str], log_path: Path, *, port: int | None = None, **settings: str
) -> GatewayProcess:
    """Start `tokenrelay serve` on `port` (a free one by default); wait until it answers."""
    port = port or free_port()
    gateway_env = {
        **env,
        "TOKENRELAY_GATEWAY_API_KEYS": f"{hash_key(API_KEY)},{hash_key(OTHER_KEY)}",
        "TOKENRELAY_GATEWAY_SECRET": SECRET,
        "TOKENRELAY_GATEWAY_PING_INTERVAL": "1",
        **settings,
    }
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "tokenrelay", "serve", "--port", str(port)],
            env=gateway_env,
            stdout=log,
            stderr=log,
        )
    gateway = GatewayProcess(process, f"http://127.0.0.1:{port}", log_path)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert process.poll() is None, log_path.read_text()
        try:
            if httpx.get(f"{gateway.url}/healthz", timeout=1).status_code == 200:
                return gateway
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    process.kill()
    raise AssertionError(f"the gateway did not start: {log_path.read_text()}")
