# The README's whole set-up: `make demo` and `make test`. Both create (or reuse) .venv and
# install torch first from a CPU-safe pin, then the package constrained to that pin (with the sweep
# extra: Optuna sweeper, joblib and submitit launchers), then the torchvision start-up hook.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
PIP_FLAGS := --disable-pip-version-check -q

.PHONY: venv sweep-setup demo test test-all clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install $(PIP_FLAGS) --upgrade pip setuptools wheel
	$(PIP) install $(PIP_FLAGS) -c constraints.txt torch
	$(PIP) install $(PIP_FLAGS) -c constraints.txt -e ".[ui,test,sweep]"
	$(PY) -m jointdit.launch install-hook   # torchvision fix for every program in the venv (accelerate, mlflow)
	touch $(STAMP)

venv: $(STAMP)

# The [sweep] extra (make venv installs it; this re-runs it for a venv made before it was added).
sweep-setup: $(STAMP)
	$(PIP) install $(PIP_FLAGS) -c constraints.txt -e ".[sweep]"

DEMO_DIR := outputs/demo

demo: $(STAMP)
	$(PY) -m jointdit.train experiment=demo hydra.run.dir=$(DEMO_DIR)
	$(PY) -m jointdit.sample checkpoint=$(DEMO_DIR)/export/last task=joint steps=20 out_dir=$(DEMO_DIR)/samples
	@echo "demo done: samples in $(DEMO_DIR)/samples, loss curve $(DEMO_DIR)/loss_curve.png;"
	@echo "browse runs with: $(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db"

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m "slow or not slow"

clean:
	rm -rf outputs multirun/*/ mlflow.db mlruns
