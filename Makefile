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

.PHONY: install chromium demo test test-fast lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# Only the tests need a browser; the demo does not wait for it.
chromium:
	@if [ ! -x $(CHROMIUM) ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing Debian's chromium (for the upload-page test)"; \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo "sudo -n"); \
	  { $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium || \
	    { $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }; } >/dev/null 2>&1 \
	  || echo "warning: could not install chromium; run: apt-get install chromium"; \
	fi

# The end-to-end demo on the embedded default (phantoms, tiny models): python -m jobs.pipeline.
# Each stage resumes on a rerun; `make demo DEMO_ARGS=--fresh` runs them all again.
DEMO := runs/demo
demo: $(STAMP)
	PNEUMORAY_RUNS=$(DEMO) $(PY) -m jobs.pipeline --profile tiny --out $(DEMO) $(DEMO_ARGS)
	@echo
	@echo "Report:         $(DEMO)/report.md (summary.json beside it)"
	@echo "MLflow UI:      .venv/bin/mlflow ui --backend-store-uri sqlite:///$(DEMO)/mlflow.db --host 127.0.0.1  -> http://127.0.0.1:5000"
	@echo "Ray dashboard:  make stack-up, then open http://127.0.0.1:8265 (jobs submitted to the stack show there)"
	@echo "Endpoint:       PNEUMORAY_RUNS=$(DEMO) .venv/bin/python -m serve --port 8000"
	@echo "                curl -H \"Authorization: Bearer \$$(cat $(DEMO)/serve-token)\" -F file=@$$(ls $(DEMO)/phantoms/test/PNEUMONIA/*.jpeg | head -1) http://127.0.0.1:8000/v1/classify"

test: $(STAMP) chromium
	$(PY) -m pytest -q

# The fast tier while working on the code (pure functions; no Ray, no training): about 1 minute (105 tests; the whole suite has 163).
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf runs

# The local platform stack (Ray head with dashboard + token auth, MLflow server): see docs/cluster.md,
# "Running on a cluster". `make stack-up STACK_ARGS="--dashboard-port 8266"` to move a port.
STACK := runs/stack
.PHONY: stack-up stack-down
stack-up: $(STAMP)
	$(PY) -m pneumoray.stack up --dir $(STACK) $(STACK_ARGS)

stack-down:
	$(PY) -m pneumoray.stack down --dir $(STACK)

# Benchmarks (bench/, docs/benchmarks.md): `make bench BENCH_ARGS="--quick"` or `--only serve_rps_c32`.
.PHONY: bench bench-real load faults
bench: $(STAMP)
	$(PY) -m bench $(BENCH_ARGS)

# Accuracy on real X-rays (docs/benchmarks.md): clip_lora vs small_cnn vs zero-shot, and clip_lora with
# synthetic images from an SD LoRA fine-tuned on the same training split, over 3 seeds.
# `make bench-real BENCH_REAL_ARGS="--data DIR --seeds 0"`; `--synthetic none` leaves the synthetic row out.
bench-real: $(STAMP)
	$(PY) -m bench real $(BENCH_REAL_ARGS)

load: $(STAMP)
	$(PY) -m bench.load $(LOAD_ARGS)

faults: $(STAMP)
	$(PY) -m bench.faults $(FAULTS_ARGS)
