"""The documented Redis ACL: a gateway serving read tokens runs as a user that can only read."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from redis import Redis
from redis.exceptions import NoPermissionError
from support.gateway import SECRET, start_gateway
from support.scripts import ScriptedLLM
from support.sse import read_all, text_of
from support.workers import Workers

from tokenrelay import Relay
from tokenrelay.connection import connect
from tokenrelay.gateway.auth import ReadTokens

DOCS = Path(__file__).parent.parent.parent / "docs" / "gateway.md"
PASSWORD = "gateway-password-0123456789"


def documented_rules() -> list[str]:
    """The rules of `ACL SETUSER gateway` as docs/gateway.md gives them."""
    text = DOCS.read_text()
    block = text.split("ACL SETUSER gateway on >GATEWAY_PASSWORD", 1)[1].split("```", 1)[0]
    return block.split()


@pytest.fixture
def gateway_user(redis_client: Redis, redis_url: str) -> Iterator[str]:
    """The documented read-only user on the test Redis; the URL that logs in as it."""
    redis_client.acl_setuser("gateway", enabled=True, passwords=[f"+{PASSWORD}"], reset=True)
    redis_client.execute_command("ACL", "SETUSER", "gateway", *documented_rules())
    yield redis_url.replace("redis://", f"redis://gateway:{PASSWORD}@", 1)
    redis_client.acl_deluser("gateway")


def test_a_read_only_gateway_streams_jobs_as_a_user_that_cannot_write(
    env: dict[str, str],
    tmp_path: Path,
    gateway_user: str,
    relay: Relay,
    llm: ScriptedLLM,
    workers: Workers,
) -> None:
    """As the documented user: the job streams, the status reads, and every write is refused."""
    handle = relay.submit("x", model=llm.script(["read", " only"]))
    workers.run_burst()
    reader_env = {**env, "TOKENRELAY_REDIS_URL": gateway_user}
    gateway = start_gateway(reader_env, tmp_path / "gw.log", TOKENRELAY_GATEWAY_API_KEYS="")
    try:
        token = ReadTokens(SECRET.encode(), ttl=60).mint(handle.job_id)[0]
        events = read_all(f"{gateway.url}/v1/jobs/{handle.job_id}/events?token={token}")
        assert text_of(events) == "read only"
        status = httpx.get(f"{gateway.url}/v1/jobs/{handle.job_id}?token={token}", timeout=10)
        assert status.json()["text"] == "read only"
        refused = httpx.post(f"{gateway.url}/v1/jobs", json={"prompt": "x"}, timeout=10)
        assert refused.status_code == 403
        assert "accepts no API keys" in refused.json()["error"]["message"]
    finally:
        gateway.stop()
    as_gateway = connect(gateway_user)
    try:
        with pytest.raises(NoPermissionError):
            as_gateway.xadd(f"tokenrelay:{{{handle.job_id}}}:tokens", {"kind": "token"})
        with pytest.raises(NoPermissionError):
            as_gateway.hset(f"rq:job:{handle.job_id}", "status", "finished")
        with pytest.raises(NoPermissionError):
            as_gateway.delete(f"tokenrelay:{{{handle.job_id}}}:tokens")
    finally:
        as_gateway.close()
