"""The deployment files: docker-compose.yml parses and runs only commands the CLI has.

There is no Docker engine on our machines, so this is what can be checked here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tokenrelay.cli.parser import parser
from tokenrelay.settings import environment_variables

ROOT = Path(__file__).parent.parent


def compose() -> dict[str, Any]:
    """docker-compose.yml, parsed."""
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return loaded


def tokenrelay_services() -> dict[str, dict[str, Any]]:
    """The services that run the tokenrelay image."""
    return {
        name: service
        for name, service in compose()["services"].items()
        if service.get("image") == "tokenrelay"
    }


def test_redis_keeps_an_append_only_file() -> None:
    """Redis in compose persists with AOF, so a restart keeps queued jobs and streams."""
    redis = compose()["services"]["redis"]
    assert "--appendonly" in redis["command"]
    assert redis["command"][redis["command"].index("--appendonly") + 1] == "yes"


def test_every_compose_command_is_a_cli_command() -> None:
    """Each tokenrelay service runs a command the CLI accepts."""
    services = tokenrelay_services()
    assert "worker" in services
    for name, service in services.items():
        args = parser().parse_args(service["command"])
        assert callable(args.run), name


def test_the_worker_scales_and_stops_gracefully() -> None:
    """The worker has no fixed name or port (so --scale works) and time to finish a job."""
    worker = tokenrelay_services()["worker"]
    assert "container_name" not in worker
    assert "ports" not in worker
    assert worker["stop_grace_period"] == "10m"


def test_services_are_configured_by_the_documented_variables() -> None:
    """Every variable compose sets on a service is one tokenrelay reads."""
    known = set(environment_variables())
    for service in tokenrelay_services().values():
        assert set(service["environment"]) <= known


def test_the_consumers_run_as_services_with_the_metrics_port_published() -> None:
    """The recorder keeps its transcripts on a volume; the metrics endpoint is reachable."""
    services = tokenrelay_services()
    assert services["recorder"]["command"][0] == "record"
    assert any(v.endswith(":/transcripts") for v in services["recorder"]["volumes"])
    metrics = services["metrics"]
    port = metrics["command"][metrics["command"].index("--port") + 1]
    assert metrics["ports"] == [f"{port}:{port}"]
    assert metrics["command"][metrics["command"].index("--host") + 1] == "0.0.0.0"


def test_the_image_entrypoint_is_the_cli() -> None:
    """The Dockerfile installs the package and runs `tokenrelay`."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["tokenrelay"]' in dockerfile
    assert "pip install" in dockerfile


def test_the_gateway_runs_as_a_service_with_its_port_published() -> None:
    """`tokenrelay serve` listens on all addresses of its container, on the published port."""
    gateway = tokenrelay_services()["gateway"]
    command = gateway["command"]
    assert command[0] == "serve"
    assert command[command.index("--host") + 1] == "0.0.0.0"
    port = command[command.index("--port") + 1]
    assert gateway["ports"] == [f"{port}:{port}"]
    assert {"TOKENRELAY_GATEWAY_API_KEYS", "TOKENRELAY_GATEWAY_SECRET"} <= set(
        gateway["environment"]
    )
    assert gateway["environment"]["TOKENRELAY_REDIS_URL"] == "redis://redis:6379/0"
