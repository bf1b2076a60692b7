# The two commands of the README: `make demo` and `make test`. Both set up .venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# torch==2.13.0 first: on a machine without a GPU a local CPU build satisfies it; on a GPU machine
# the same pin from PyPI is the CUDA build. Installing it first keeps pip from pulling another one.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: install demo test clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m jobs.phantoms --out runs/demo/phantoms
	$(PY) -m jobs.prepare --data runs/demo/phantoms --out runs/demo/manifest.parquet

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf runs
