"""`python -m tokenrelay.dev.llama_server`: llama-cpp-python's server, safe on CPUs with AMX.

It takes the same arguments as `python -m llama_cpp.server`. Where llama.cpp was compiled
with AMX (a native build on an Intel Xeon of Sapphire Rapids or later: `AMX_INT8 = 1` in its
system info), the first prompt of two or more tokens crashes the server with SIGSEGV: GCC 12
miscompiles ggml's AMX tile set-up (its `ldtilecfg` operand is declared 8 bytes wide, so the
64-byte tile configuration is never stored; llama.cpp issue 20824). The AMX kernels are only
reached through llama.cpp's "extra buffer types", and llama-cpp-python exposes that switch
(`llama_model_params.use_extra_bufts`) nowhere: not as a `Llama` argument, a server setting or
an environment variable. So this wraps the function that makes a model's default parameters,
which `Llama.__init__` calls as it loads a model, and turns extra buffer types off where AMX is
compiled in. Elsewhere they stay on: there they mean weight repacking for AVX2, which is faster.
"""

from __future__ import annotations

from typing import Any

import llama_cpp.llama_cpp as llama_c

_default_model_params = llama_c.llama_model_default_params

#: Whether this llama.cpp has AMX kernels (decided when it was compiled, from the build CPU).
AMX_COMPILED_IN = b"AMX_INT8 = 1" in llama_c.llama_print_system_info()


def model_params() -> Any:
    """llama.cpp's default model parameters, without extra buffer types where AMX is compiled in."""
    params = _default_model_params()
    if AMX_COMPILED_IN:
        params.use_extra_bufts = False
    return params


def main() -> None:
    """Run llama-cpp-python's server with `model_params` as every model's defaults."""
    llama_c.llama_model_default_params = model_params
    from llama_cpp.server.__main__ import main as serve

    serve()  # type: ignore[no-untyped-call]  # unannotated in llama-cpp-python


if __name__ == "__main__":
    main()
