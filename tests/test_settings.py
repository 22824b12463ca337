"""Settings: read from the environment in one place, with defaults and loud failures."""

from __future__ import annotations

import pytest

from tokenrelay import ConfigurationError, Settings
from tokenrelay.settings import Secret, environment_variables, redact_url


def test_an_empty_environment_gives_the_defaults() -> None:
    """With nothing set, every setting has its documented default."""
    settings = Settings.from_env({})
    assert settings == Settings()
    assert settings.redis_url is None
    assert settings.effective_redis_url == "redis://127.0.0.1:6379/0"
    assert settings.queue == "tokenrelay"


def test_variables_are_cast_to_their_types() -> None:
    """Numbers arrive as numbers and the API key as a Secret."""
    settings = Settings.from_env(
        {"TOKENRELAY_MAX_TOKENS": "64", "TOKENRELAY_TEMPERATURE": "0.2", "OPENAI_API_KEY": "sk-1"}
    )
    assert settings.max_tokens == 64
    assert settings.temperature == 0.2
    assert settings.openai_api_key.reveal() == "sk-1"


def test_a_malformed_variable_names_itself() -> None:
    """A bad value fails at start-up with the variable's name, not deep in a job."""
    with pytest.raises(ConfigurationError, match="TOKENRELAY_JOB_TIMEOUT='soon'"):
        Settings.from_env({"TOKENRELAY_JOB_TIMEOUT": "soon"})
    with pytest.raises(ConfigurationError, match="TOKENRELAY_MAX_TOKENS='0': must be a positive"):
        Settings.from_env({"TOKENRELAY_MAX_TOKENS": "0"})
    with pytest.raises(ConfigurationError, match="TOKENRELAY_LOG_FORMAT"):
        Settings.from_env({"TOKENRELAY_LOG_FORMAT": "xml"})
    for name in ("TOKENRELAY_ATTEMPT_TIMEOUT", "TOKENRELAY_STALL_TIMEOUT"):
        for value in ("nan", "inf", "-1"):  # a NaN limit would silently never fire
            with pytest.raises(ConfigurationError, match=f"{name}='{value}'"):
                Settings.from_env({name: value})


def test_the_api_key_never_shows_in_a_repr() -> None:
    """Printing settings, as a traceback or a debugger would, does not reveal the key."""
    settings = Settings.from_env({"OPENAI_API_KEY": "sk-very-secret"})
    assert "sk-very-secret" not in repr(settings)
    assert "sk-very-secret" not in str(settings.openai_api_key)
    assert Secret("a") == Secret("a")


def test_legacy_max_tokens_is_sent_to_compatible_servers_only() -> None:
    """OpenAI gets max_completion_tokens alone; a custom base URL also gets max_tokens."""
    assert not Settings.from_env({"OPENAI_API_KEY": "k"}).send_legacy_max_tokens
    assert Settings.from_env({"OPENAI_BASE_URL": "http://x/v1"}).send_legacy_max_tokens
    forced = {
        "OPENAI_BASE_URL": "http://x/v1",
        "TOKENRELAY_MAX_TOKENS_PARAM": "max_completion_tokens",
    }
    assert not Settings.from_env(forced).send_legacy_max_tokens


def test_passwords_are_redacted_from_urls() -> None:
    """A Redis URL in a message never carries its password."""
    assert redact_url("redis://user:pw@host:1/0") == "redis://user:****@host:1/0"
    assert redact_url("redis://:pw@host:1/0") == "redis://:****@host:1/0"
    assert redact_url("redis://host:1/0") == "redis://host:1/0"


def test_every_variable_is_documented_in_the_readme() -> None:
    """The README's configuration table lists every environment variable."""
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    missing = [name for name in environment_variables() if f"`{name}`" not in readme]
    assert missing == []
