"""The model client: `ChatOpenAI` configured from settings and the request, and error triage."""

from __future__ import annotations

from collections import OrderedDict

import httpx2
import openai
from langchain_openai import ChatOpenAI
from pydantic import SecretStr
from rq.exceptions import AbandonedJobError
from rq.timeouts import JobTimeoutException

from tokenrelay.errors import GenerationError
from tokenrelay.producer.request import GenerationRequest
from tokenrelay.settings import Secret, Settings
from tokenrelay.stream.protocol import ErrorEntry

#: What a local server without authentication is sent as an API key.
NO_KEY = "unused"

_RETRYABLE = (
    openai.APIConnectionError,  # includes APITimeoutError
    openai.RateLimitError,
    openai.InternalServerError,
    GenerationError,
    JobTimeoutException,
    AbandonedJobError,
)

_MAX_MESSAGE = 1000

#: What happened, for the exceptions RQ raises without a message.
_MESSAGES: dict[type[BaseException], str] = {
    AbandonedJobError: "the worker running the job died or vanished (its heartbeat lapsed)",
    JobTimeoutException: "the job ran longer than its timeout",
}


#: How many differently configured model clients a worker keeps (model, temperature, limit).
_KEPT_CLIENTS = 64


class ChatModels:
    """The process's model clients: one HTTP connection pool, sized for the jobs in flight.

    Every generation's `ChatOpenAI` shares it, so a thousand concurrent generations reuse
    connections instead of each opening its own client; and jobs that ask for the same
    model, temperature and limit share one `ChatOpenAI` (building one costs milliseconds).
    """

    def __init__(self, settings: Settings, *, connections: int) -> None:
        self.settings = settings
        limits = httpx2.Limits(max_connections=connections, max_keepalive_connections=connections)
        self.http = httpx2.AsyncClient(limits=limits)
        self._clients: OrderedDict[tuple[str, float, int], ChatOpenAI] = OrderedDict()

    def for_request(self, request: GenerationRequest) -> ChatOpenAI:
        """A streaming client for the request's model, with its limits."""
        settings = self.settings
        model = request.model or settings.model
        max_tokens = request.max_tokens or settings.max_tokens
        temperature = settings.temperature if request.temperature is None else request.temperature
        key = (model, temperature, max_tokens)
        client = self._clients.get(key)
        if client is None:
            client = self._clients[key] = self._build(model, temperature, max_tokens)
            if len(self._clients) > _KEPT_CLIENTS:
                self._clients.popitem(last=False)
        else:
            self._clients.move_to_end(key)
        return client

    def _build(self, model: str, temperature: float, max_tokens: int) -> ChatOpenAI:
        settings = self.settings
        # langchain-openai sends `max_completion_tokens`, which llama.cpp's server ignores.
        extra_body = {"max_tokens": max_tokens} if settings.send_legacy_max_tokens else None
        return ChatOpenAI(
            model=model,
            api_key=SecretStr(settings.openai_api_key.reveal() or NO_KEY),
            base_url=settings.openai_base_url,
            temperature=temperature,
            max_completion_tokens=max_tokens,
            extra_body=extra_body,
            streaming=True,
            stream_usage=True,
            timeout=settings.llm_timeout or None,
            max_retries=settings.llm_max_retries,
            http_async_client=self.http,
        )

    async def aclose(self) -> None:
        """Close the shared HTTP connections."""
        await self.http.aclose()


def _describe(exc: BaseException) -> str:
    """What went wrong, in words: the client's own message, and for a connection error its cause.

    The OpenAI client says only "Connection error." whatever happened; the innermost cause
    says whether the server refused the connection, closed it mid-answer, or never answered.
    """
    message = str(exc) or _MESSAGES.get(type(exc), f"{type(exc).__name__} was raised")
    if not isinstance(exc, openai.APIConnectionError):
        return message
    request = getattr(exc, "request", None)
    where = f" at {request.url.scheme}://{request.url.netloc.decode()}" if request else ""
    root, cause = None, exc.__cause__ or exc.__context__
    while cause is not None:
        root = cause if str(cause) else root
        cause = cause.__cause__ or cause.__context__
    why = f": {type(root).__name__}: {root}" if root is not None else ""
    return f"{message.rstrip('.')} talking to the model server{where}{why}"


def error_entry(exc: BaseException, *, attempt: int, secret: Secret | None = None) -> ErrorEntry:
    """The `error` entry for an exception: its type, a redacted message, whether to retry."""
    message = _describe(exc)
    if secret:
        message = message.replace(secret.reveal(), "**********")
    return ErrorEntry(
        error_type=type(exc).__name__,
        message=message[:_MAX_MESSAGE],
        retryable=isinstance(exc, _RETRYABLE),
        attempt=attempt,
    )
