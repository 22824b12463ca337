"""Scripts for the scripted model server, under model names unique to each test."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from support.scripted_openai import Script, ScriptedOpenAI

#: The API key the workers are given; no log line or error may ever contain it.
SECRET_KEY = "sk-test-0123456789-do-not-log"


@dataclass
class ScriptedLLM:
    """Registers scripts under test-unique model names."""

    server: ScriptedOpenAI
    prefix: str
    count: int = 0

    def script(self, tokens: list[str] | None = None, **options: Any) -> str:
        """Register a script; the model name that selects it."""
        self.count += 1
        model = f"{self.prefix}-{self.count}"
        self.server.add(model, Script(tokens=tokens or [], **options))
        return model
