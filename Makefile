# Two entry points: `make demo` and `make test`. Both create the virtual environment on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
SHARED ?= ../shared
RUN_DIR ?= runs/demo-$(shell date +%Y%m%d-%H%M%S)
# The pinned torch is the CPU build that lies on this machine's disk; on a GPU box install the
# torch build for your CUDA first and `pip install -e .` (see README).
TORCH_PIN ?= torch==2.13.0

export MEGAMORA_DATA ?= $(abspath $(SHARED)/data)
export HF_DATASETS_OFFLINE ?= 1
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= disabled
# DeepSpeed JIT-builds a communication op on first use (about 30 s on CPU): keep it in the venv.
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions

.PHONY: install demo test bench clean reproduce

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q "$(TORCH_PIN)" -e ".[test,deepspeed]"
	touch $@

demo: install
	$(PY) launch/pretrain.py --config configs/smoke/full.yaml run_dir=$(RUN_DIR)

# The paper's comparison at CPU scale: 5 methods x 3 seeds, then report.md / figures in the folder.
# Stop it at any time; run it again to resume.
SEEDS ?= 0 1 2
REPRODUCE_DIR ?= runs/reproduce-cpu
reproduce: install
	$(PY) tools/reproduce.py --recipe cpu --seeds $(SEEDS) --out $(REPRODUCE_DIR)

# bench_step.py with the peers (HF, PEFT, torchtitan) in a venv of its own: torchtitan pins
# datasets < 4.8 and needs triton, which the project's venv does not take.
BENCH_VENV ?= .venv-bench
BENCH_ARGS ?=
.PHONY: bench-peers
bench-peers: $(BENCH_VENV)/.installed
	$(BENCH_VENV)/bin/python benchmarks/bench_step.py $(BENCH_ARGS)

$(BENCH_VENV)/.installed: setup.cfg pyproject.toml
	test -x $(BENCH_VENV)/bin/python || python3 -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install -q "$(TORCH_PIN)"
	$(BENCH_VENV)/bin/pip install -q "$(TORCH_PIN)" -e . peft transformers torchtitan triton
	touch $@

test: install
	$(PY) -m pytest -q --durations=25 tests

clean:
	rm -rf runs .pytest_cache
