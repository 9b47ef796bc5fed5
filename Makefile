# The README's whole set-up: `make demo` and `make test`. Both create (or reuse) .venv and
# install torch first from a CPU-safe pin, then the package constrained to that pin.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
PIP_FLAGS := --disable-pip-version-check -q

.PHONY: venv demo test test-all clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install $(PIP_FLAGS) --upgrade pip setuptools wheel
	$(PIP) install $(PIP_FLAGS) -c constraints.txt torch
	$(PIP) install $(PIP_FLAGS) -c constraints.txt -e ".[ui,test]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m jointdit.demo

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m "slow or not slow"

clean:
	rm -rf outputs multirun/*/ mlflow.db mlruns
