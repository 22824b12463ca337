# The two commands of the README: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

# llama-cpp-python compiles llama.cpp for the CPU it is built on (-march=native), and pip caches
# the wheel by version alone: reused on another CPU it dies of SIGILL. So it is built here, once
# per CPU (its feature flags), compiler and version, into a cache of our own that pip only reads.
LLAMA := $(shell grep -o 'llama-cpp-python\[server\]==[0-9.]*' pyproject.toml | cut -d= -f3)
CPU_KEY := $(shell (grep -m1 '^flags' /proc/cpuinfo; $${CC:-cc} --version | head -1; echo $(LLAMA)) | cksum | cut -d' ' -f1)
WHEELS := $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/tokenrelay/wheels/llama-$(LLAMA)-$(CPU_KEY)

.PHONY: demo test check lint typecheck unit install bench clean browser

demo: $(STAMP)  ## run the demo: Redis, a model, a worker, the gateway, one generation live
	$(BIN)/tokenrelay demo --stay

test: browser check  ## every check: lint, types, the test suite (browser tests included)

# The browser tests drive Debian's chromium through Playwright (nothing is downloaded at run
# time). Where it is missing, it is installed with apt-get as root (CI runs as root);
# otherwise this stops with what to do.
CHROMIUM ?= /usr/bin/chromium
browser:
	@if [ ! -x $(CHROMIUM) ]; then \
		if [ "$$(id -u)" = 0 ]; then \
			echo "installing Debian's chromium for the browser tests"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
		else \
			echo "the browser tests need $(CHROMIUM): run 'sudo apt-get install -y chromium' (Debian's package)" >&2; \
			exit 1; \
		fi; \
	fi

check: lint typecheck unit

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest

bench: $(STAMP)  ## the benchmarks under bench/ (results: bench/RESULTS.md)
	$(BIN)/python -m bench.worker_bench
	$(BIN)/python -m bench.gateway_bench
	$(BIN)/python -m bench.local_model
	$(BIN)/python -m bench.recovery

install: $(STAMP)

$(STAMP): pyproject.toml $(WHEELS)/.built
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --find-links $(WHEELS) \
		-e '.[dev,local]'
	rm -f $(VENV)/.installed-* && touch $@

$(WHEELS)/.built:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "building llama-cpp-python $(LLAMA) for this CPU (about 5 minutes, once) into $(WHEELS)"
	$(BIN)/python -m pip wheel --quiet --disable-pip-version-check --no-cache-dir --no-deps \
		-w $(WHEELS) 'llama-cpp-python==$(LLAMA)'
	touch $@

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
