"""What ran a benchmark: host, CPU model and flags of note, cores, Python, and the date."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name, and whether it has AMX and AVX-512 (they change native code paths)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                 if line.startswith("model name")), platform.processor() or "unknown")  # fmt: skip
    flags = next((line for line in info.splitlines() if line.startswith("flags")), "").split()
    extras = [
        label for label, flag in (("AMX", "amx_int8"), ("AVX-512", "avx512f")) if flag in flags
    ]
    return f"{name}{' (' + ', '.join(extras) + ')' if extras else ''}"


def describe(redis_version: str | None = None) -> str:
    """One line that says what ran the benchmark."""
    redis = f", Redis {redis_version}" if redis_version else ""
    return (
        f"{platform.node()}: {cpu_model()}, {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}{redis}"
    )
