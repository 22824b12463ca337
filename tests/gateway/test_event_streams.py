"""The gateway's event streams: entries as SSE, resumable at any entry, with transport hygiene."""

from __future__ import annotations

from urllib.parse import quote

import httpx
from redis import Redis
from support.gateway import API_KEY, GatewayProcess, auth
from support.scripted_openai import ScriptedOpenAI
from support.scripts import ScriptedLLM
from support.sse import Comment, Event, parse, read_all, stream, text_of
from support.streams import wait_for_tokens
from support.workers import Workers

from tokenrelay import EndEntry, Relay, StartEntry
from tokenrelay.stream.keys import token_stream
from tokenrelay.stream.writer import StreamWriter

WORDS = [f" word{i}" for i in range(30)]


def events_url(gateway: GatewayProcess, created: dict[str, str], **query: str) -> str:
    """The event stream URL of a submitted job, with its read token (and `query`)."""
    extra = "".join(f"&{k}={v}" for k, v in query.items())
    return f"{gateway.url}{created['events_url']}{extra}"


def test_a_job_streams_as_events_with_entry_ids_kinds_and_json(
    gateway: GatewayProcess, llm: ScriptedLLM, workers: Workers
) -> None:
    """Each entry is one event: `id:` its entry id, `event:` its kind, `data:` its fields."""
    created = gateway.submit(prompt="count", model=llm.script(WORDS, token_delay=0.01))
    workers.start()
    events = read_all(events_url(gateway, created))
    kinds = [e.event for e in events]
    assert kinds[0] == "start"
    assert kinds[-1] == "end"
    assert set(kinds[1:-1]) == {"token"}
    assert text_of(events) == "".join(WORDS)
    assert events[0].json["job_id"] == created["job_id"]
    assert events[-1].json == {**events[-1].json, "kind": "end", "finish_reason": "stop"}
    ids = [e.id for e in events]
    assert all(i is not None for i in ids)
    assert len(set(ids)) == len(ids)


def test_resuming_by_last_event_id_at_every_entry_gives_exactly_the_rest(
    gateway: GatewayProcess, llm: ScriptedLLM, workers: Workers
) -> None:
    """A reconnect with Last-Event-ID set to any entry's id gets every later entry, once."""
    created = gateway.submit(prompt="count", model=llm.script(WORDS, token_delay=0.002))
    workers.run_burst()
    url = events_url(gateway, created)
    events = read_all(url)
    for i, event in enumerate(events[:-1]):
        assert event.id is not None
        rest = read_all(url, headers={"Last-Event-ID": event.id})
        assert [(e.id, e.event, e.data) for e in rest] == [
            (e.id, e.event, e.data) for e in events[i + 1 :]
        ]
    middle = events[len(events) // 2]
    assert (
        read_all(events_url(gateway, created, after=str(middle.id)))
        == events[len(events) // 2 + 1 :]
    )


def test_an_event_stream_is_read_with_get_only(
    gateway: GatewayProcess, llm: ScriptedLLM, workers: Workers
) -> None:
    """HEAD (which Starlette would route as GET) would hold a stream with nowhere to send it."""
    created = gateway.submit(prompt="x", model=llm.script(["a"]))
    workers.run_burst()
    response = httpx.head(events_url(gateway, created), timeout=10)
    assert response.status_code == 405
    assert response.headers["allow"] == "GET"


def test_resuming_after_the_terminal_entry_answers_no_content(
    gateway: GatewayProcess, llm: ScriptedLLM, workers: Workers
) -> None:
    """A reconnect after the end gets 204, which tells EventSource to stop reconnecting."""
    created = gateway.submit(prompt="x", model=llm.script(["a", "b"]))
    workers.run_burst()
    url = events_url(gateway, created)
    last = read_all(url)[-1]
    assert last.event == "end"
    assert last.id is not None
    response = httpx.get(url, headers={"Last-Event-ID": last.id}, timeout=10)
    assert response.status_code == 204


def test_a_cursor_that_is_not_a_redis_entry_id_is_a_400(
    gateway: GatewayProcess, llm: ScriptedLLM, workers: Workers
) -> None:
    """Other digits than ASCII, parts past 64 bits, or no id at all: refused before a read."""
    created = gateway.submit(prompt="x", model=llm.script(["a", "b"]))
    workers.run_burst()
    url = events_url(gateway, created)
    for cursor in ("\u0661-\u0661", f"{2**64}-0", f"0-{2**64}", "1-", "-1", "12"):
        response = httpx.get(f"{url}&after={quote(cursor)}", timeout=10)
        assert response.status_code == 400, cursor
        assert response.json()["error"]["type"] == "bad_request"
    largest = f"{2**64 - 1}-{2**64 - 1}"  # a real id, after every entry: the stream has ended
    assert httpx.get(url, headers={"Last-Event-ID": largest}, timeout=10).status_code == 204


def test_live_starts_at_the_newest_entry(
    gateway: GatewayProcess,
    llm: ScriptedLLM,
    workers: Workers,
    llm_server: ScriptedOpenAI,
    relay: Relay,
) -> None:
    """`?live=1` skips the tokens generated before the client joined."""
    created = gateway.submit(prompt="x", model=llm.script(WORDS, stall_after=10))
    workers.start()
    assert llm_server.wait_stalled(30)
    handle = relay.job(created["job_id"])
    tokens = 0
    for record in handle.records(timeout=30):
        tokens += getattr(record.entry, "count", 0)
        if tokens == 10:
            break
    live = stream(events_url(gateway, created, live="1"))
    opening = next(live)
    assert isinstance(opening, Comment)
    llm_server.release()
    events = [e for e in live if isinstance(e, Event)]
    assert text_of(events) == "".join(WORDS[10:])


def test_a_live_stream_says_where_it_began_so_that_a_reconnect_loses_nothing(
    gateway: GatewayProcess,
    llm: ScriptedLLM,
    workers: Workers,
    llm_server: ScriptedOpenAI,
    redis_client: Redis,
    relay: Relay,
) -> None:
    """Before any entry comes, `?live=1` sends the id it began after (EventSource keeps it as
    the Last-Event-ID of a reconnect): what is written while the client is away is not lost."""
    created = gateway.submit(prompt="x", model=llm.script(WORDS, stall_after=3))
    workers.start()
    assert llm_server.wait_stalled(30)
    wait_for_tokens(relay.job(created["job_id"]), 3)  # written: the stream is still now
    [(newest, _)] = redis_client.xrevrange(token_stream(created["job_id"]), count=1)
    with httpx.stream("GET", events_url(gateway, created, live="1"), timeout=30) as response:
        lines = response.iter_lines()
        began = next(line for line in lines if line.startswith("id:"))
        assert next(lines) == ""  # an id alone: no event for the page, only its cursor
    assert began == f"id: {newest.decode()}"
    llm_server.release()
    assert text_of(read_all(events_url(gateway, created), headers={"Last-Event-ID": began[4:]}))


def test_a_live_reconnect_goes_on_from_its_last_event_id_not_from_the_newest(
    gateway: GatewayProcess, llm: ScriptedLLM, workers: Workers
) -> None:
    """A `?live=1` stream opened before the job began says it began at `0-0`; its reconnect
    (same URL, Last-Event-ID: 0-0) gets everything written since, not only what comes next."""
    created = gateway.submit(prompt="x", model=llm.script(["a", "b", "c"]))
    with httpx.stream("GET", events_url(gateway, created, live="1"), timeout=30) as response:
        lines = response.iter_lines()
        began = next(line for line in lines if line.startswith("id:"))
    assert began == "id: 0-0"
    workers.run_burst()
    again = read_all(events_url(gateway, created, live="1"), headers={"Last-Event-ID": "0-0"})
    assert again[0].event == "start"
    assert text_of(again) == "abc"


def test_the_stream_opens_with_a_comment_and_pings_while_idle_uncompressed_and_uncached(
    gateway: GatewayProcess, llm: ScriptedLLM, workers: Workers, llm_server: ScriptedOpenAI
) -> None:
    """Headers flush at once; an idle stream gets `: ping` comments; no gzip, no caching."""
    created = gateway.submit(prompt="x", model=llm.script(["a", "b", "c"], stall_after=1))
    workers.start()
    headers = {"Accept-Encoding": "gzip, br"}
    with httpx.stream("GET", events_url(gateway, created), headers=headers, timeout=30) as response:
        assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
        assert response.headers["cache-control"] == "no-store"
        assert response.headers["x-accel-buffering"] == "no"
        assert "content-encoding" not in response.headers
        items = parse(response.iter_lines())
        assert next(items) == Comment("tokenrelay")
        pings, seen = 0, []
        for item in items:  # the model stalls after one token: pings come, once a second
            seen.append(item)
            pings += item == Comment("ping")
            if pings == 2:
                break
        assert llm_server.wait_stalled(30)  # (the pings may have come before the job began)
        llm_server.release()
        rest = list(items)
    events = [e for e in seen + rest if isinstance(e, Event)]
    assert text_of(events) == "abc"
    assert events[-1].event == "end"


def test_a_cursor_older_than_what_a_capped_stream_holds_gets_a_trimmed_event(
    gateway: GatewayProcess, redis_client: Redis
) -> None:
    """Resuming before the oldest entry Redis still holds is said, not silently skipped."""
    writer = StreamWriter(redis_client, "capped", ttl=600, maxlen=5)
    writer.start(StartEntry("capped", "m", 1, 1.0, 2.0, "w", 50, 3, writer.writer_token))
    writer.token("t0")
    first_token_id = redis_client.xrevrange("tokenrelay:{capped}:tokens", count=1)[0][0].decode()
    for i in range(1, 400):  # `MAXLEN ~` trims whole nodes of about a hundred entries
        writer.token(f" t{i}")
    writer.close(EndEntry("stop", 400))
    assert redis_client.xlen("tokenrelay:{capped}:tokens") < 400
    url = f"{gateway.url}/v1/jobs/capped/events"
    events = read_all(url, headers={**auth(API_KEY), "Last-Event-ID": first_token_id})
    assert events[0].event == "trimmed"
    assert events[0].json["after"] == first_token_id
    assert "trimmed from the stream" in events[0].json["message"]
    assert events[-1].event == "end"
