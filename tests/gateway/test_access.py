"""The gateway's API: who may do what, and what it refuses, with JSON bodies that say why."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

import httpx
import pytest
from redis import Redis
from support.gateway import API_KEY, OTHER_KEY, SECRET, GatewayProcess, auth, start_gateway
from support.scripts import ScriptedLLM
from support.sse import read_all
from support.workers import Workers

from tokenrelay import InvalidRequestError, Relay
from tokenrelay.dev.redis_server import RedisServer
from tokenrelay.gateway.auth import ReadTokens
from tokenrelay.stream import keys


def test_a_job_link_without_a_valid_token_is_refused_revealing_nothing(
    gateway: GatewayProcess, llm: ScriptedLLM, workers: Workers
) -> None:
    """No token is 401; a wrong, foreign or expired one is 403; the same for a job that exists."""
    real = gateway.submit(prompt="x", model=llm.script(["secret", " text"]))
    other = gateway.submit(prompt="y", model=llm.script(["z"]))
    workers.run_burst()
    expired, _ = ReadTokens(SECRET.encode(), ttl=1).mint(real["job_id"], now=1_000_000)
    forged = real["read_token"][:-4] + "AAAA"
    for job_id in (real["job_id"], "no-such-job"):
        for path in (f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/events"):
            missing = httpx.get(gateway.url + path, timeout=10)
            assert missing.status_code == 401
            assert missing.headers["www-authenticate"] == "Bearer"
            assert missing.json()["error"]["type"] == "unauthorized"
            bodies = set()
            for token in ("nonsense", forged, other["read_token"], expired):
                refused = httpx.get(f"{gateway.url}{path}?token={token}", timeout=10)
                assert refused.status_code == 403
                bodies.add(refused.text)
            assert len(bodies) == 1
            assert "secret" not in bodies.pop()
    mine = httpx.get(f"{gateway.url}/v1/jobs/{real['job_id']}", headers=auth(real["read_token"]))
    assert mine.json() == {**mine.json(), "state": "finished", "text": "secret text"}


def test_a_missing_job_is_a_404_with_a_json_body(gateway: GatewayProcess) -> None:
    """Unknown (or expired) jobs are 404 for whoever may see them, on every endpoint."""
    token, _ = ReadTokens(SECRET.encode(), ttl=60).mint("gone")
    for method, path, credential in (
        ("GET", "/v1/jobs/gone", token),
        ("GET", "/v1/jobs/gone/events", token),
        ("GET", "/v1/jobs/gone/events", API_KEY),
        ("POST", "/v1/jobs/gone/cancel", API_KEY),
    ):
        response = httpx.request(method, gateway.url + path, headers=auth(credential), timeout=10)
        assert response.status_code == 404
        assert response.json() == {
            "error": {"type": "not_found", "message": "no job 'gone' (it may have expired)"}
        }


def test_submitting_needs_one_of_the_api_keys(gateway: GatewayProcess, redis_client: Redis) -> None:
    """No key or a wrong key is 401 with nothing queued; either configured key works."""
    url = f"{gateway.url}/v1/jobs"
    assert httpx.post(url, json={"prompt": "x"}, timeout=10).status_code == 401
    wrong = httpx.post(url, json={"prompt": "x"}, headers=auth("trk_wrong"), timeout=10)
    assert wrong.status_code == 401
    assert wrong.json()["error"]["message"] == "the API key is not valid"
    assert redis_client.dbsize() == 0
    assert gateway.submit(key=OTHER_KEY, prompt="x")["job_id"]


REFUSED_AS_SUBMIT_REFUSES: list[dict[str, Any]] = [
    {"prompt": ""},
    {},
    {"prompt": "a", "messages": [{"role": "user", "content": "b"}]},
    {"messages": [{"role": "bot", "content": "hi"}]},
    {"prompt": "a", "max_tokens": 0},
    {"prompt": "a", "max_tokens": 2.5},
    {"prompt": "a", "temperature": "hot"},
    {"prompt": "a", "job_id": "has space"},
    {"prompt": "a", "metadata": {"k": "v" * 20_000}},
    {"prompt": 5},
]


@pytest.mark.parametrize("body", REFUSED_AS_SUBMIT_REFUSES)
def test_bad_submissions_get_submits_own_message_as_a_400(
    gateway: GatewayProcess, relay: Relay, redis_client: Redis, body: dict[str, Any]
) -> None:
    """The gateway runs `submit`'s checks and answers with exactly its message."""
    with pytest.raises(InvalidRequestError) as refused:
        relay.submit(**body)
    response = httpx.post(f"{gateway.url}/v1/jobs", json=body, headers=auth(API_KEY), timeout=10)
    assert response.status_code == 400
    assert response.json() == {"error": {"type": "invalid_request", "message": str(refused.value)}}
    assert redis_client.dbsize() == 0


@pytest.mark.parametrize(
    ("content", "content_type", "status", "message"),
    [
        (b"{not json", "application/json", 400, "the body is not valid JSON"),
        (b"[1, 2]", "application/json", 400, "the body must be a JSON object"),
        (b'{"prompt": NaN}', "application/json", 400, "NaN is not JSON"),
        (b"\xff\xfe", "application/json", 400, "the body is not valid JSON"),
        (b'{"prompt": "x", "shell": "rm"}', "application/json", 400, "unknown fields: 'shell'"),
        (b'{"prompt": "x"}', "text/plain", 415, "send the request as application/json"),
        (b'{"prompt": "' + b"x" * 3000 + b'"}', "application/json", 413, "over the limit"),
    ],
)
def test_malformed_and_oversized_bodies_are_refused_clearly(
    env: dict[str, str],
    tmp_path: Any,
    redis_client: Redis,
    content: bytes,
    content_type: str,
    status: int,
    message: str,
) -> None:
    """Bodies that are not a JSON object, or too big, are refused before any check runs."""
    gateway = start_gateway(env, tmp_path / "gw.log", TOKENRELAY_GATEWAY_MAX_BODY="2000")
    try:
        headers = {**auth(API_KEY), "Content-Type": content_type}
        response = httpx.post(f"{gateway.url}/v1/jobs", content=content, headers=headers)
        assert response.status_code == status
        assert message in response.json()["error"]["message"]
        assert redis_client.dbsize() == 0
    finally:
        gateway.stop()


def test_an_oversized_body_without_a_length_is_cut_off_at_the_limit(
    env: dict[str, str], tmp_path: Any
) -> None:
    """A chunked body is read only up to the limit, then refused with 413."""
    gateway = start_gateway(env, tmp_path / "gw.log", TOKENRELAY_GATEWAY_MAX_BODY="2000")
    try:

        def chunks() -> Any:
            yield b'{"prompt": "'
            for _ in range(100):
                yield b"x" * 1000
            yield b'"}'

        headers = {**auth(API_KEY), "Content-Type": "application/json"}
        response = httpx.post(f"{gateway.url}/v1/jobs", content=chunks(), headers=headers)
        assert response.status_code == 413
    finally:
        gateway.stop()


def test_too_many_open_streams_from_one_address_are_refused(
    env: dict[str, str], tmp_path: Any, llm: ScriptedLLM, workers: Workers
) -> None:
    """Past the per-address limit a stream is a 429; closing one frees its place."""
    gateway = start_gateway(env, tmp_path / "gw.log", TOKENRELAY_GATEWAY_STREAMS_PER_CLIENT="2")
    try:
        created = gateway.submit(prompt="x", model=llm.script(["a"], stall_after=0))
        url = f"{gateway.url}{created['events_url']}"
        with httpx.Client(timeout=30) as client:
            first = client.send(client.build_request("GET", url), stream=True)
            second = client.send(client.build_request("GET", url), stream=True)
            assert (first.status_code, second.status_code) == (200, 200)
            third = client.get(url)
            assert third.status_code == 429
            assert "2 event streams are open from this address" in third.json()["error"]["message"]
            first.close()
            deadline = time.monotonic() + 10
            while True:  # the gateway notices the close: a place is free again
                again = client.send(client.build_request("GET", url), stream=True)
                again.close()
                if again.status_code == 200 or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            assert again.status_code == 200
            second.close()
    finally:
        gateway.stop()


def test_a_stream_that_fails_to_open_gives_its_place_back(
    env: dict[str, str], tmp_path: Any, redis_client: Redis
) -> None:
    """An unexpected failure while a stream opens (here a key of the wrong type) is an error
    for that request, and never uses up the address's places."""
    gateway = start_gateway(env, tmp_path / "gw.log", TOKENRELAY_GATEWAY_STREAMS_PER_CLIENT="1")
    try:
        redis_client.set(keys.token_stream("wrongtype"), "not a stream")
        url = f"{gateway.url}/v1/jobs/wrongtype/events"
        for _ in range(3):  # failing as it opens: an error answer
            response = httpx.get(f"{url}?live=1", headers=auth(API_KEY), timeout=10)
            assert response.status_code == 500
        for _ in range(3):  # failing once open: a `failure` event ends the stream
            [failure] = read_all(url, headers=auth(API_KEY))
            assert failure.event == "failure"
            assert failure.json["error_type"] == "GatewayError"
    finally:
        gateway.stop()


def test_an_api_key_is_never_taken_from_the_url(
    gateway: GatewayProcess, llm: ScriptedLLM, workers: Workers
) -> None:
    """URLs end up in proxy logs and browser history: API keys go in the header only."""
    created = gateway.submit(prompt="x", model=llm.script(["a"]))
    workers.run_burst()
    in_url = f"?token={API_KEY}"
    assert httpx.get(f"{gateway.url}/v1/status{in_url}", timeout=10).status_code == 401
    submitted = httpx.post(f"{gateway.url}/v1/jobs{in_url}", json={"prompt": "x"}, timeout=10)
    assert submitted.status_code == 401
    watched = httpx.get(f"{gateway.url}/v1/jobs/{created['job_id']}{in_url}", timeout=10)
    assert watched.status_code == 403
    assert httpx.get(f"{gateway.url}/v1/status", headers=auth(API_KEY)).status_code == 200


def test_an_ended_job_whose_stream_is_gone_still_has_a_status(
    gateway: GatewayProcess, llm: ScriptedLLM, workers: Workers, redis_client: Redis
) -> None:
    """RQ's record outlives the stream: the status says the job finished, and why there is no
    text, at once (not after a read that waits for a stream that will never come)."""
    created = gateway.submit(prompt="x", model=llm.script(["a"]))
    workers.run_burst()
    redis_client.delete(keys.token_stream(created["job_id"]))
    started = time.monotonic()
    status = httpx.get(
        f"{gateway.url}/v1/jobs/{created['job_id']}", headers=auth(API_KEY), timeout=30
    )
    assert time.monotonic() - started < 5
    assert status.status_code == 200
    body = status.json()
    assert body["state"] == "finished"
    assert "text" not in body
    assert body["unreadable"]["error_type"] == "StreamExpiredError"


def test_a_redis_out_of_reach_is_a_503_that_does_not_tell_where_redis_is(
    env: dict[str, str], tmp_path: Any, own_redis: RedisServer
) -> None:
    """Clients learn that Redis is away and when to try again; its address stays in the log."""
    gateway = start_gateway({**env, "TOKENRELAY_REDIS_URL": own_redis.url}, tmp_path / "gw.log")
    try:
        own_redis.stop()
        response = httpx.post(
            f"{gateway.url}/v1/jobs", json={"prompt": "x"}, headers=auth(API_KEY), timeout=60
        )
        assert response.status_code == 503
        assert response.headers["retry-after"] == "5"
        assert response.json()["error"]["type"] == "unavailable"
        assert str(own_redis.port) not in response.text
        assert any(line["event"] == "gateway.redis_unavailable" for line in gateway.logs())
    finally:
        gateway.stop()


def test_cancel_needs_an_api_key_and_ends_the_stream_as_cancelled(
    gateway: GatewayProcess, llm: ScriptedLLM, workers: Workers
) -> None:
    """A read token cannot cancel; an API key can, and the stream ends with `cancelled`."""
    created = gateway.submit(prompt="x", model=llm.script(["a", "b"], stall_after=1))
    workers.start()
    url = f"{gateway.url}/v1/jobs/{created['job_id']}/cancel"
    assert httpx.post(url, headers=auth(created["read_token"]), timeout=10).status_code == 401
    response = httpx.post(url, headers=auth(API_KEY), timeout=10)
    assert response.json() == {"job_id": created["job_id"], "cancelled": True}
    status = httpx.get(f"{gateway.url}/v1/jobs/{created['job_id']}", headers=auth(API_KEY))
    assert status.json()["state"] == "cancelled"
    assert status.json()["error"]["error_type"] == "cancelled"


def test_the_ops_endpoint_shows_what_status_json_shows(
    gateway: GatewayProcess, env: dict[str, str], relay: Relay
) -> None:
    """`/v1/status` is `tokenrelay status --json`: the same implementation, the same facts."""
    relay.submit_many(["a", "b"])
    cli = subprocess.run(
        [sys.executable, "-m", "tokenrelay", "status", "--json"],
        env=env, capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    expected = json.loads(cli.stdout)
    response = httpx.get(f"{gateway.url}/v1/status", headers=auth(API_KEY), timeout=10)
    got = response.json()
    expected.pop("taken_at"), got.pop("taken_at")
    assert got == expected
    assert got["queues"] == {"tokenrelay": 2}
    assert httpx.get(f"{gateway.url}/v1/status", timeout=10).status_code == 401
