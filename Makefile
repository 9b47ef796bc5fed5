# The README's whole set-up: `make demo` and `make test`. Both create (or reuse) .venv and
# install torch first from a CPU-safe pin, then the package constrained to that pin (with the sweep
# extra: Optuna sweeper, joblib and submitit launchers), then the torchvision start-up hook.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
PIP_FLAGS := --disable-pip-version-check -q

.PHONY: venv sweep-setup demo ui browser test test-all clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install $(PIP_FLAGS) --upgrade pip setuptools wheel
	$(PIP) install $(PIP_FLAGS) -c constraints.txt torch
	$(PIP) install $(PIP_FLAGS) -c constraints.txt -e ".[ui,test,sweep,quant]"
	$(PY) -m jointdit.launch install-hook   # torchvision fix for every program in the venv (accelerate, mlflow)
	touch $(STAMP)

venv: $(STAMP)

# The [sweep] extra (make venv installs it; this re-runs it for a venv made before it was added).
sweep-setup: $(STAMP)
	$(PIP) install $(PIP_FLAGS) -c constraints.txt -e ".[sweep]"

DEMO_DIR := outputs/demo

# The metric table at the end: 4 held-out conditions per task, scored beside the real clips' ceiling and floor
# (data.* must name the demo's data set: experiment=demo's size and clip count).
DEMO_EVAL := sampling.tasks=[joint,i2sv,a2v,v2a] sampling.num_clips=4 sampling.steps=20 data.size=32 data.num_clips=48 \
	real.limit=8 distances=false plots=1 logger=mlflow

demo: $(STAMP)
	$(PY) -m jointdit.train experiment=demo hydra.run.dir=$(DEMO_DIR)
	$(PY) -m jointdit.sample checkpoint=$(DEMO_DIR)/export/last task=joint steps=20 out_dir=$(DEMO_DIR)/samples
	$(PY) -m jointdit.evaluate checkpoint=$(DEMO_DIR)/export/last $(DEMO_EVAL) out_dir=$(DEMO_DIR)/evaluate \
		hydra.run.dir=$(DEMO_DIR)/evaluate
	@echo "demo done: samples in $(DEMO_DIR)/samples, metrics in $(DEMO_DIR)/evaluate, loss curve $(DEMO_DIR)/loss_curve.png;"
	@echo "browse runs with: $(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db"

# `make ui`: the Gradio studio (python -m jointdit.ui) on the demo's model, trained first when missing.
# It binds 127.0.0.1 only and prints its URL (http://127.0.0.1:7860/).
DEMO_MODEL := $(DEMO_DIR)/export/last

$(DEMO_MODEL)/jointdit.json: | $(STAMP)
	$(PY) -m jointdit.train experiment=demo hydra.run.dir=$(DEMO_DIR)

ui: $(STAMP) $(DEMO_MODEL)/jointdit.json
	$(PIP) install $(PIP_FLAGS) -c constraints.txt -e ".[ui]"
	$(PY) -m jointdit.ui checkpoint=$(DEMO_MODEL)

# The UI's browser tests drive Debian's Chromium through the playwright package; Playwright's own
# browser download is never used. Installing Chromium needs root and apt-get; without them the browser
# tests skip and say why.
CHROMIUM := /usr/bin/chromium

browser: $(STAMP)
	PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 $(PIP) install $(PIP_FLAGS) -c constraints.txt playwright
	@test -x $(CHROMIUM) || { apt-get update && apt-get install -y chromium; } \
		|| echo "WARNING: could not install chromium (needs root + apt-get); the browser tests will be skipped"

test: $(STAMP) browser
	$(PY) -m pytest -q

test-all: $(STAMP) browser
	$(PY) -m pytest -q -m "slow or not slow"

clean:
	rm -rf outputs multirun/*/ mlflow.db mlruns
