# Quickstart:  make train   (installs what is missing, then trains the default job)
#              make test   (lint and types first, then every test; TEST_WORKERS=2 in parallel)
# Also:        make bench  (every mode beside DDP, pipelining, MultiWorkerMirrored, input pipelines; ~35 min)
#              make soak   (memory and descriptors over 120 epochs, 10 stop/resume cycles; ~6 min)
#              make elpv   (real images: ELPV solar cells as class folders in data/elpv)
#              make plot RUNS="a.jsonl b.jsonl" [OUT=curves.png]  (overlay runs' metrics files)
#              make gpu-build  (both CUDA venvs with Horovod + NCCL, checked; no GPU needed)
#              make docs   (the documentation site into site/)   make lint  (ruff and mypy)
# Variables:   FRAMEWORK=torch|tf  NP=2  ARGS="--epochs 5 ..."
#              GPU=1 (CUDA builds in .venv-gpu-$(FRAMEWORK): make install/train/test GPU=1)

SHELL := /bin/bash
FRAMEWORK ?= torch
NP ?= 2
ARGS ?=
GPU ?= 0
# CUDA PyTorch (CUDA 13) and CUDA TensorFlow (CUDA 12) cannot share a venv
# (requirements-gpu.txt says why): one per framework.
VENV ?= $(if $(filter 1,$(GPU)),.venv-gpu-$(FRAMEWORK),.venv)
PYTHON := $(VENV)/bin/python
REQUIREMENTS := $(if $(filter 1,$(GPU)),requirements-gpu-$(FRAMEWORK).txt requirements-gpu.txt,requirements.txt)
PYTEST_ARGS ?=
TEST_WORKERS ?= 2
BENCH_ARGS ?=
# Keep TensorFlow's C++ log lines out of the user's way (set to 0 to see them).
export TF_CPP_MIN_LOG_LEVEL ?= 3

.PHONY: install train test test-unit lint docs bench soak elpv plot gpu-build gpu-check-sdist clean help

help:
	@sed -n '1,10p' Makefile

install: $(VENV)/.horovod-installed

$(VENV)/.system-checked: common/install/system_packages.sh
	bash common/install/system_packages.sh
	mkdir -p $(VENV) && touch $@

$(VENV)/.requirements-installed: $(REQUIREMENTS) $(VENV)/.system-checked
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip wheel setuptools
	$(PYTHON) -m pip install -q -r $(firstword $(REQUIREMENTS))
	touch $@

$(VENV)/.horovod-installed: $(VENV)/.requirements-installed common/install/build_horovod.sh
	bash common/install/build_horovod.sh $(VENV) $(GPU)
	touch $@

train: install
	$(VENV)/bin/horovodrun -np $(NP) $(PYTHON) train_$(FRAMEWORK)/main.py $(ARGS)

# Most tests share the machine in TEST_WORKERS pytest workers, a test file each (its module
# fixtures, reference runs among them, made once); those marked serial (pytest.ini says why)
# then run alone.
test: lint
	@export PATH="$(CURDIR)/$(VENV)/bin:$$PATH"; \
	set -x; $(PYTHON) -m pytest tests -m "not serial" -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS); \
	shared=$$?; $(PYTHON) -m pytest tests -m serial $(PYTEST_ARGS); alone=$$?; set +x; \
	for code in $$shared $$alone; do case $$code in 0|5) ;; *) exit $$code ;; esac; done  # 5: none selected

# The first, fast tier of make test (settings in pyproject.toml).
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

docs: install
	$(VENV)/bin/mkdocs build --strict

bench: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PYTHON) benchmarks/run.py $(BENCH_ARGS)

soak: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PYTHON) benchmarks/soak.py

plot: install
	$(PYTHON) -m common.observe.plot $(RUNS) -o $(or $(OUT),curves.png)

elpv: install
	@test -d data/elpv || $(PYTHON) -m common.data.elpv data/elpv
	@echo "train on it: make train ARGS=\"--dataset folder --data-dir data/elpv --model resnet8 --image-size 64\""

# The NCCL build of Horovod in both GPU venvs, each checked by horovodrun --check-build
# (it needs no GPU: this is what CI machines without one can prove). ~25 min the first time.
gpu-build:
	time $(MAKE) install GPU=1 FRAMEWORK=torch
	time $(MAKE) install GPU=1 FRAMEWORK=tf

# Before carrying benchmarks/gpu_check.py to a lent GPU (no registry there): Horovod's sdist into .whl/.
gpu-check-sdist: install
	mkdir -p .whl && $(PYTHON) -m pip download -q --no-deps --no-binary :all: horovod==0.28.1 -d .whl

# The unit tier without its heavy cases (pytest.ini's "heavy" marker): a quick loop.
test-unit: lint
	$(PYTHON) -m pytest tests/unit -m "not heavy" -n $(TEST_WORKERS) $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache site
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
