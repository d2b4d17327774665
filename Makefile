# genattr -- `make help` lists the targets. Every target installs what it needs first.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=
# pytest-xdist workers for `make test` (one single-threaded torch process per core; 0 = no workers)
TEST_WORKERS ?= auto
# presets `make smoke-paper` runs side by side (one single-threaded process each)
SMOKE_JOBS ?= 2
export OMP_NUM_THREADS ?= 1
export HF_HUB_OFFLINE ?= 1
export MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING ?= false
# the same CPU float kernels on every x86 machine (the README's twin figures and the tests use them; tests/conftest.py)
export MKL_CBWR ?= AVX2
export ONEDNN_MAX_CPU_ISA ?= AVX2
export ATEN_CPU_CAPABILITY ?= avx2
# tracking server (make mlflow-server): where it keeps runs and artifacts, and where it listens
MLFLOW_DIR ?= $(CURDIR)/mlflow-server
MLFLOW_HOST ?= 127.0.0.1
MLFLOW_PORT ?= 5000
MLFLOW_WORKERS ?= 1

.DEFAULT_GOAL := help
.PHONY: help install demo test test-slurm lint format bench smoke-paper gpu-check mlflow-ui mlflow-server sweep-local sweep-slurm report rerun cfg clean

help: ## Show this help
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}'

install: $(VENV)/.installed ## Create .venv and install genattr with its dev tools (PyPI wheels)

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $@

demo: install ## LoRAX on the CDDB-hard twin: accuracy matrix, AA/AAF/BWT, MLflow run (CPU, ~3 min)
	$(PY) launch.py $(ARGS)

test: install ## Run the test suite (CPU; SLURM / browser / GPU tests skip themselves where those are missing)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(ARGS) || [ $$? -eq 5 ]

lint: install ## ruff lint + format check
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: install ## ruff autofix + format
	$(VENV)/bin/ruff check --fix . && $(VENV)/bin/ruff format .

bench: install ## LoRAX throughput benchmark -> bench_results/lorax.json (ARGS=--tasks 5 ...)
	$(PY) -m genattr.bench lorax $(ARGS)

smoke-paper: install ## Every paper preset at full model/image size, 2 optimiser steps a stage, on CPU (~19 min on 2 cores)
	$(PY) -m genattr.smoke --jobs $(SMOKE_JOBS) $(ARGS)

gpu-check: install ## On a GPU machine, one call: images/s, MFU, LoRAX batched experts, every preset in paper precision -> bench_results/gpu.json
	$(PY) -m genattr.gpu_check $(ARGS)

mlflow-ui: install ## MLflow UI on http://127.0.0.1:5000 over the local store (mlflow.db)
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db \
		--default-artifact-root $(CURDIR)/mlartifacts --host 127.0.0.1 --port 5000 --workers 1

mlflow-server: install ## MLflow tracking server for sweeps: SQLite + artifacts in mlflow-server/, 127.0.0.1:5000, 1 worker
	mkdir -p $(MLFLOW_DIR)
	$(VENV)/bin/mlflow server --backend-store-uri sqlite:///$(MLFLOW_DIR)/mlflow.db \
		--artifacts-destination $(MLFLOW_DIR)/artifacts --host $(MLFLOW_HOST) --port $(MLFLOW_PORT) \
		--workers $(MLFLOW_WORKERS)

test-slurm: install ## Real-SLURM tests: start the one-node test cluster (root, Debian packages), run them, stop it
	bash tests/cluster/slurm-up.sh
	trap 'bash tests/cluster/slurm-down.sh' EXIT; $(PY) -m pytest -q -m slurm $(ARGS)

sweep-slurm: install ## A sweep on your SLURM cluster (ARGS="method=lorax,der seed=0,1,2"); run it in tmux/nohup
	$(PY) launch.py -m hydra/launcher=slurm $(ARGS)

report: install ## Ablation table + plots from MLflow: SWEEP=<multirun/... dir | experiment name>
	$(PY) -m genattr.report $(SWEEP) $(ARGS)

rerun: install ## Continue a run in its own dir: RUN=<run dir> (replays .hydra/overrides.yaml, resume=auto)
	$(PY) -m genattr.rerun $(RUN) $(ARGS)

sweep-local: install ## A small parallel sweep through submitit_local (lorax vs replay, 2 seeds, twin)
	$(PY) launch.py -m method=lorax,replay seed=0,1 hydra/launcher=local $(ARGS)

cfg: install ## Print the composed config and defaults tree (ARGS="method=der data=cddb_long")
	$(PY) launch.py $(ARGS) --cfg job --resolve
	$(PY) launch.py $(ARGS) --info defaults-tree

clean: ## Remove caches, run outputs and the local MLflow store (keeps .venv)
	rm -rf .cache logs mlflow.db mlartifacts bench_results reports .pytest_cache .ruff_cache
	find multirun -mindepth 1 -maxdepth 1 ! -name README.md -exec rm -rf {} +
	find . -name __pycache__ -not -path "./$(VENV)/*" -exec rm -rf {} +
