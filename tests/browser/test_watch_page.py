"""The watch page in a real Chromium: submit, watch live, join late, reload, cancel, refuse."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from playwright.sync_api import Page, expect
from redis import Redis
from support.gateway import API_KEY, SECRET, GatewayProcess, start_gateway
from support.scripted_openai import ScriptedOpenAI
from support.scripts import ScriptedLLM
from support.workers import Workers

from tokenrelay import EndEntry, StartEntry
from tokenrelay.gateway.auth import ReadTokens
from tokenrelay.stream.writer import StreamWriter
from tokenrelay.terminal import printable

Snap = Callable[[Page, str], Path]

WORDS = ["Streams", " are", " durable", " logs", ";", " readers", " join", " late", ",", " resume"]
WORDS += [" and", " replay", " without", " losing", " a", " word", "."]
TEXT = "".join(WORDS)

#: What the page shows for a figure it does not know yet (an en dash).
NOT_YET = "\u2013"


def output(page: Page) -> str:
    """The text the page shows for the job."""
    shown: str = page.locator("#output").text_content() or ""
    return shown


def test_submitting_from_the_page_streams_the_exact_text_token_by_token(
    page: Page, snap: Snap, gateway: GatewayProcess, llm: ScriptedLLM, workers: Workers
) -> None:
    """A prompt and a key typed in: the text streams in live, with its figures, then ends."""
    model = llm.script(WORDS, token_delay=0.15)
    workers.start()
    page.goto(gateway.url + "/")
    page.fill("#prompt", "What is a stream?")
    page.fill("#api-key", API_KEY)
    page.fill("#model", model)
    page.click("#generate")
    expect(page.locator("#state")).to_have_text("streaming", timeout=30_000)
    partial = output(page)
    assert partial
    assert TEXT.startswith(partial)
    assert partial != TEXT  # seen midway: the text arrives token by token
    snap(page, "streaming")
    expect(page.locator("#state")).to_have_text("finished", timeout=30_000)
    assert output(page) == TEXT
    expect(page.locator("#count")).to_have_text(str(len(WORDS)))
    assert page.locator("#ttft").text_content() != NOT_YET
    assert page.locator("#rate").text_content() != NOT_YET
    assert "/watch/" in page.url
    assert "#token=v1." in page.url
    snap(page, "finished")


def stalled_job(
    gateway: GatewayProcess, llm: ScriptedLLM, workers: Workers, llm_server: ScriptedOpenAI
) -> str:
    """A job whose model stalls after its first eight words; the link to watch it."""
    created = gateway.submit(prompt="x", model=llm.script(WORDS, stall_after=8, token_delay=0.02))
    workers.start()
    assert llm_server.wait_stalled(30)
    return gateway.url + str(created["watch_url"])


def test_a_second_tab_joining_mid_stream_shows_the_full_text(
    page: Page,
    snap: Snap,
    gateway: GatewayProcess,
    llm: ScriptedLLM,
    workers: Workers,
    llm_server: ScriptedOpenAI,
) -> None:
    """Two tabs on one job, the second opened midway, end with the same whole text."""
    link = stalled_job(gateway, llm, workers, llm_server)
    page.goto(link)
    expect(page.locator("#output")).to_have_text("".join(WORDS[:8]), timeout=30_000)
    second = page.context.new_page()
    second.goto(link)
    expect(second.locator("#output")).to_have_text("".join(WORDS[:8]), timeout=30_000)
    llm_server.release()
    for tab in (page, second):
        expect(tab.locator("#state")).to_have_text("finished", timeout=30_000)
        assert output(tab) == TEXT
    snap(second, "second-tab")


def test_a_reload_mid_stream_goes_on_without_a_lost_or_doubled_word(
    page: Page,
    snap: Snap,
    gateway: GatewayProcess,
    llm: ScriptedLLM,
    workers: Workers,
    llm_server: ScriptedOpenAI,
) -> None:
    """Reloading the page midway shows the text so far once, then the rest as it comes."""
    link = stalled_job(gateway, llm, workers, llm_server)
    page.goto(link)
    expect(page.locator("#output")).to_have_text("".join(WORDS[:8]), timeout=30_000)
    page.reload()
    expect(page.locator("#output")).to_have_text("".join(WORDS[:8]), timeout=30_000)
    snap(page, "reloaded")
    llm_server.release()
    expect(page.locator("#state")).to_have_text("finished", timeout=30_000)
    assert output(page) == TEXT
    expect(page.locator("#count")).to_have_text(str(len(WORDS)))


def test_the_submitter_cancels_from_the_page(
    page: Page,
    snap: Snap,
    gateway: GatewayProcess,
    llm: ScriptedLLM,
    workers: Workers,
    llm_server: ScriptedOpenAI,
) -> None:
    """The cancel button ends the job; the page says it was cancelled, plainly."""
    model = llm.script(WORDS, stall_after=3)
    workers.start()
    page.goto(gateway.url + "/")
    page.fill("#prompt", "Go on forever")
    page.fill("#api-key", API_KEY)
    page.fill("#model", model)
    page.click("#generate")
    expect(page.locator("#output")).to_have_text("".join(WORDS[:3]), timeout=30_000)
    page.click("#cancel")
    expect(page.locator("#state")).to_have_text("cancelled", timeout=30_000)
    expect(page.locator("#problem")).to_have_text("The job was cancelled.")
    expect(page.locator("#cancel")).to_be_hidden()
    assert output(page) == "".join(WORDS[:3])
    snap(page, "cancelled")
    llm_server.release()


HOSTILE = [
    "<script>window.pwned = 'script'</script>",
    '<img src="x" onerror="window.pwned = \'img\'">',
    "<b>not bold</b> <a href='javascript:alert(1)'>link</a>",
    " \u202eevil\u202c and \u2066isolate\u2069",
    " \x1b[31mred\x07 bell",
    " \x00nul end",
]


def test_hostile_model_output_is_shown_as_inert_text(
    page: Page, snap: Snap, gateway: GatewayProcess, llm: ScriptedLLM, workers: Workers
) -> None:
    """Markup, script, event handlers, bidi and control characters from the model stay text."""
    created = gateway.submit(prompt="x", model=llm.script(HOSTILE))
    workers.run_burst()
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    page.goto(gateway.url + str(created["watch_url"]))
    expect(page.locator("#state")).to_have_text("finished", timeout=30_000)
    assert output(page) == printable("".join(HOSTILE))
    assert page.evaluate("window.pwned") is None
    assert page.locator("#output *").count() == 0  # text nodes only: no element was made
    assert dialogs == []
    snap(page, "hostile")


def test_a_job_link_without_a_valid_token_shows_a_refusal(
    page: Page, snap: Snap, gateway: GatewayProcess, llm: ScriptedLLM
) -> None:
    """A forged token, and a link with none, are refused plainly; the job's text never shows."""
    created = gateway.submit(prompt="x", model=llm.script(["secret"]))
    page.goto(f"{gateway.url}/watch/{created['job_id']}#token=v1.{created['job_id']}.9999999999.x")
    expect(page.locator("#state")).to_have_text("refused", timeout=30_000)
    expect(page.locator("#problem")).to_have_text(
        "the token does not give access to this job, or has expired"
    )
    snap(page, "refused")
    page.goto(f"{gateway.url}/watch/{created['job_id']}")
    page.reload()
    expect(page.locator("#problem")).to_contain_text("This link has no read token")
    assert output(page) == ""


def test_the_pages_forbid_inline_script_and_html_sinks(page: Page, gateway: GatewayProcess) -> None:
    """The Content-Security-Policy holds in the browser: innerHTML throws (Trusted Types)."""
    response = page.goto(gateway.url + "/")
    assert response is not None
    policy = response.headers["content-security-policy"]
    assert "script-src 'self'" in policy
    assert "require-trusted-types-for 'script'" in policy
    blocked = page.evaluate(
        "() => { try { document.body.innerHTML = '<b>x</b>'; return false; }"
        " catch (e) { return e instanceof TypeError; } }"
    )
    assert blocked


def test_tokens_lost_while_the_page_was_away_are_marked_where_they_were(
    page: Page, snap: Snap, env: dict[str, str], tmp_path: Path, redis_client: Redis
) -> None:
    """The gateway restarts while a capped stream runs on and trims what the page had not
    read: when the page reconnects, a marker stands where the lost tokens were."""
    writer = StreamWriter(redis_client, "capped", ttl=600, maxlen=5)
    writer.start(StartEntry("capped", "m", 1, 1.0, 2.0, "w", 50, 3, writer.writer_token))
    for i in range(3):
        writer.token(f" t{i}")
    gateway = start_gateway(env, tmp_path / "first.log")
    token, _ = ReadTokens(SECRET.encode(), ttl=600).mint("capped")
    page.goto(f"{gateway.url}/watch/capped#token={token}")
    expect(page.locator("#output")).to_have_text(" t0 t1 t2", timeout=30_000)
    gateway.stop()  # the page is told to reconnect, and retries until a gateway answers
    for i in range(3, 400):  # `MAXLEN ~` trims whole nodes of about a hundred entries
        writer.token(f" t{i}")
    writer.close(EndEntry("stop", 400))
    port = int(gateway.url.rsplit(":", 1)[1])
    gateway = start_gateway(env, tmp_path / "second.log", port=port)
    try:
        expect(page.locator("#state")).to_have_text("finished", timeout=30_000)
        marker = page.locator("#output .gap")
        expect(marker).to_have_count(1)
        expect(marker).to_contain_text("[text lost here")
        assert output(page).startswith(" t0 t1 t2[text lost here")
        assert output(page).endswith(" t398 t399")
        snap(page, "gap")
    finally:
        gateway.stop()
