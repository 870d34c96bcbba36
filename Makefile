# Two commands: `make demo` trains the demo model; `make test` runs the whole test suite (what CI runs, after
# `make lint`); `make test-fast` runs the unit tests only (no test marked slow: < 2 minutes here).
# Both set up what they need on a fresh Debian machine (a venv with CPU torch; apt packages for the tests).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TORCH  ?= torch==2.13.0
APT_PACKAGES := openmpi-bin libopenmpi-dev slurm-wlm munge

.PHONY: demo test test-fast lint setup system-deps bench gpu-check clean

demo: $(STAMP)
	$(BIN)/hecate train examples/tiny.yaml --fresh

test: system-deps $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# ruff's rules and format are configured in pyproject.toml
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

setup: $(STAMP)

# A pinned CPU torch first: a bare `torch` would pull a multi-GB CUDA build on a machine without a GPU.
$(STAMP): setup.py pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	DS_BUILD_OPS=0 $(BIN)/python -m pip install -q -e ".[dev,mpi,ray,deepspeed,hf]"
	touch $@

# MPI, SLURM and munge for the launcher and transport tests (needs root or sudo once); Ray comes from pip (.[ray]).
system-deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

# Every figure of docs/BENCHMARKS.md: JSON rows into runs/bench/, charts into docs/img/ (< 20 min on 2 cores).
# DeepSpeed builds no ops when installed (DS_BUILD_OPS=0); the one it compiles at start-up is cached in build/.
BENCH_STAMP := $(VENV)/.installed-peers
BENCH_OUT   := runs/bench

$(BENCH_STAMP): $(STAMP)
	DS_BUILD_OPS=0 $(BIN)/python -m pip install -q -e ".[peers]"
	touch $@

bench: system-deps $(BENCH_STAMP)
	$(BIN)/python benchmarks/floor.py --json $(BENCH_OUT)/floor.json
	$(BIN)/python benchmarks/peers.py --json $(BENCH_OUT)/peers.json
	$(BIN)/python benchmarks/end_to_end.py --json $(BENCH_OUT)/end_to_end.json
	$(BIN)/python benchmarks/sparse_collectives.py --json $(BENCH_OUT)/sparse_collectives.json
	$(BIN)/python benchmarks/sparse_collectives.py --chunk-kib 64 --json $(BENCH_OUT)/sparse_collectives_64k.json
	$(BIN)/python benchmarks/plot.py $(BENCH_OUT) --out docs/img

# On a machine with at least one CUDA GPU (< 8 minutes): JSON rows and a markdown table into runs/gpu_check/.
# Without a GPU it prints one line and exits 2. Uses the torch already installed (a CUDA build), not the CPU pin.
gpu-check:
	$(PYTHON) benchmarks/gpu_check.py --out runs/gpu_check

clean:
	rm -rf $(VENV) runs build *.egg-info
