"""The reliability tests run with the shipped retry settings (the rest of the suite has one
attempt per job, to see each terminal path as it ends)."""

from __future__ import annotations

import pytest


@pytest.fixture
def env(env: dict[str, str]) -> dict[str, str]:
    """The test environment, with TOKENRELAY_MAX_ATTEMPTS at its default."""
    return {k: v for k, v in env.items() if k != "TOKENRELAY_MAX_ATTEMPTS"}
