"""The local model's speed with llama.cpp's extra buffer types on and off, for this build and CPU.

Run from the repository root: `python -m bench.local_model` (or `make bench`). Each setting
runs in its own process, because on a build with AMX kernels "on" crashes (SIGSEGV; see
`tokenrelay.dev.llama_server`) and that is a result too. It measures decoding (128 greedy
tokens after a short prompt) and prompt processing (a 450-token prompt), and prints a Markdown
section for bench/RESULTS.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

from bench.machine import describe
from bench.report import record

DECODE_TOKENS = 128
PROMPT_TOKENS = 450
REPS = 4
THREADS = (1, 2)

# Runs in a child: loads the bundled model with extra buffer types on or off, prints JSON.
_PROBE = """
import json, statistics, sys, time
import llama_cpp, llama_cpp.llama_cpp as c
from tokenrelay.dev.local_model import bundled_model_path
extra, threads, reps, decode, prompt_tokens = sys.argv[1] == "on", *map(int, sys.argv[2:])
default = c.llama_model_default_params
def params():
    p = default()
    p.use_extra_bufts = extra
    return p
c.llama_model_default_params = params
llm = llama_cpp.Llama(model_path=str(bundled_model_path()), n_ctx=1024, n_batch=512,
                      n_threads=threads, n_threads_batch=threads, verbose=False)
long = llm.tokenize(("The keeper walked the shore and counted the waves. " * 60).encode())
long = long[:prompt_tokens]
short = llm.tokenize(b"Write a short story about a lighthouse keeper.")
pp, tg = [], []
for _ in range(reps):
    llm.reset()
    started = time.perf_counter()
    llm.eval(long)
    pp.append(len(long) / (time.perf_counter() - started))
    first, n = None, 0
    for _ in llm.generate(short, temp=0.0, top_k=1, reset=True):
        first = first or time.perf_counter()
        n += 1
        if n == decode:
            break
    tg.append((n - 1) / (time.perf_counter() - first))
print(json.dumps({"prompt": statistics.median(pp), "decode": statistics.median(tg)}))
"""


def measure(extra: str, threads: int) -> str:
    """One setting's figures, or how its process died."""
    args = [extra, str(threads), str(REPS), str(DECODE_TOKENS), str(PROMPT_TOKENS)]
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        return f"crashed (exit {done.returncode})"
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    return f"{figures['decode']:.1f} tok/s decode, {figures['prompt']:.0f} tok/s prompt"


def amx_compiled_in() -> bool:
    """Whether the installed llama.cpp has AMX kernels."""
    probe = "import tokenrelay.dev.llama_server as s; print(s.AMX_COMPILED_IN)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return done.stdout.strip() == "True"


def main() -> None:
    """Measure every setting and record the section in bench/RESULTS.md."""
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    rows = []
    for threads in THREADS:
        for extra in ("on", "off"):
            rows.append(f"| {threads} | {extra} | {measure(extra, threads)} |")
    record(
        "\n".join(
            [
                f"## Local model, extra buffer types on and off: {started}\n",
                describe(),
                f"llama.cpp with AMX kernels: {amx_compiled_in()}\n",
                "| threads | extra buffer types | Gemma 3 270M Q4_K_M |",
                "|---|---|---|",
                *rows,
            ]
        )
    )


if __name__ == "__main__":
    main()
