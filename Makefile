# The two commands of the README: `make demo` and `make test`. Both set up .venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# torch==2.13.0 first: on a machine without a GPU a local CPU build satisfies it; on a GPU machine
# the same pin from PyPI is the CUDA build. Installing it first keeps pip from pulling another one.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed
# Debian's chromium runs the upload-page test (Playwright drives it; no browser is downloaded).
CHROMIUM ?= /usr/bin/chromium

.PHONY: install demo test clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	@if [ ! -x $(CHROMIUM) ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing Debian's chromium (for the upload-page test)"; \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo "sudo -n"); \
	  { $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium || \
	    { $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }; } >/dev/null 2>&1 \
	  || echo "warning: could not install chromium; run: apt-get install chromium"; \
	fi
	touch $(STAMP)

# The end-to-end demo on the embedded default (phantoms, tiny models); each stage resumes on a rerun.
# Grows into `python -m jobs.pipeline` (issue 7).
DEMO := runs/demo
demo: $(STAMP)
	$(PY) -m jobs.phantoms --out $(DEMO)/phantoms
	$(PY) -m jobs.prepare --data $(DEMO)/phantoms --out $(DEMO)/manifest.parquet
	PNEUMORAY_RUNS=$(DEMO) $(PY) -m jobs.train --profile tiny --data $(DEMO)/manifest.parquet --run-name demo --out $(DEMO)/train.json
	PNEUMORAY_RUNS=$(DEMO) $(PY) -m jobs.evaluate --model models:/pneumonia-clip@champion --data $(DEMO)/manifest.parquet --out $(DEMO)/test_metrics.json
	@echo "MLflow UI: .venv/bin/mlflow ui --backend-store-uri sqlite:///$(DEMO)/mlflow.db --host 127.0.0.1"

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf runs
