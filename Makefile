# Fresh machine to running server in one command. Every setup step leaves a file behind and is
# skipped while that file is newer than what it was made from, so a second run starts at once.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CACHE := $(or $(TRITON_DISAGG_CACHE),$(HOME)/.cache/triton-disagg)
RUNTIME := $(CACHE)/pytriton-runtime
TRITONSERVER := $(RUNTIME)/pytriton/tritonserver/bin/tritonserver
DEFAULT_MODEL := $(CACHE)/models/SmolLM2-135M-Instruct/.conversion-complete
DEPS := $(VENV)/.deps-installed

# Extra arguments, e.g. make serve SERVE_ARGS="--model-dir /path/to/checkpoint"
SERVE_ARGS ?=
PYTEST_ARGS ?=

.PHONY: serve test test-fast lint model bench-engine perf setup clean

serve: setup
	$(BIN)/disagg-serve $(SERVE_ARGS)

test: setup lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Every test that starts no tritonserver (unit tests, kernels, the transfer module's peers), one pytest
# worker a core (pytest-xdist), each one thread unless a test sets more (two-thread workers on two
# cores made timing tests miss their bounds): for the edit-test loop.
test-fast: $(DEPS) lint
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -m "not integration" -n auto --dist worksteal $(PYTEST_ARGS)

# ruff, configured in pyproject.toml: the noqa markers in the code mean something.
lint: $(DEPS)
	$(BIN)/ruff check .

model: $(DEFAULT_MODEL)

bench-engine: $(DEPS) $(DEFAULT_MODEL)
	$(BIN)/python -m benchmarks.bench_engine

# perf_analyzer against a running `make serve`: 128-token prompts, 32 tokens out, concurrency 1 to 4.
# Extra or overriding flags: make perf PERF_ARGS="-u otherhost:8001 --concurrency-range 8:8"
PERF_ARGS ?=
perf: $(DEPS)
	$(BIN)/disagg-perf-analyzer -m ensemble -u localhost:8001 -i grpc --streaming \
		--input-data client/data/perf_inputs.json --concurrency-range 1:4 \
		--measurement-mode count_windows --measurement-request-count 8 --stability-percentage 999 --max-trials 3 \
		$(PERF_ARGS)

setup: $(DEPS) $(TRITONSERVER) $(DEFAULT_MODEL)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first and pinned: a bare `torch` requirement would pull a CUDA build. The second install
# is held to that torch, so a dependency conflict fails here instead of quietly replacing it.
# On a GPU machine, set TORCH_INDEX_URL to a CUDA 12 index (ucxx-cu12 needs cuda-python 12):
#   make serve TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
TORCH_INDEX_URL ?=
$(DEPS): pyproject.toml kv_transfer/_stream_copy.c python_backend_utils/engine/_cpu_kernels.c | $(BIN)/python
	$(BIN)/pip install torch==2.13.0 $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	echo torch==2.13.0 > $(VENV)/torch-constraint.txt
	$(BIN)/pip install -c $(VENV)/torch-constraint.txt -e '.[test]'
	touch $@

# The Triton server from PyPI, as a runtime only: its Python dependencies clash with ours.
$(TRITONSERVER): | $(BIN)/python
	$(BIN)/pip install --no-deps --upgrade --target $(RUNTIME) nvidia-pytriton==0.7.0

$(DEFAULT_MODEL): | $(DEPS)
	$(BIN)/python -m python_backend_utils.engine.checkpoint

# The venv and build leftovers; the converted model and the Triton runtime stay in $(CACHE).
clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
	rm -f kv_transfer/_stream_copy.*.so python_backend_utils/engine/_cpu_kernels.*.so
