"""The model clients: `ChatOpenAI` configured from settings and the request, sharing connections."""

from __future__ import annotations

from collections import OrderedDict

import httpx2
from langchain_openai import ChatOpenAI
from pydantic import SecretStr

from tokenrelay.producer.request import GenerationRequest
from tokenrelay.settings import Settings

#: What a local server without authentication is sent as an API key.
NO_KEY = "unused"

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

    def for_request(
        self, request: GenerationRequest, *, max_tokens: int | None = None
    ) -> ChatOpenAI:
        """A streaming client for the request's model, with its limits (`max_tokens`: what is
        left of the request's, for an attempt that goes on from a partial answer)."""
        settings = self.settings
        model = request.model or settings.model
        max_tokens = max_tokens or request.max_tokens or settings.max_tokens
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
            # The worker's watchdog bounds the wait between tokens with one timer per attempt;
            # LangChain's own per-chunk timeout wraps every chunk in a task (asyncio.wait_for).
            stream_chunk_timeout=None,
        )

    async def aclose(self) -> None:
        """Close the shared HTTP connections."""
        await self.http.aclose()
