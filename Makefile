# fmnist: `make all` sets everything up and runs the full study; `make test` runs the tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PARAMS ?= params
OUT ?= reports
BIN := $(VENV)/bin
# make tensorboard: its port, and the log directory (default: OUT's run in progress if there is one, else OUT's).
TB_PORT ?= 6006
# make test: pytest-xdist worker processes (0: none, all in this process). The notebooks run in order in one of them
# (tests/conftest.py's scheduler), each test file in one.
TEST_WORKERS ?= 2
TB_LOGDIR ?=
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: all setup data study experiments seed-budget smoke report test lint lab kernel tensorboard serve bench loadtest ship-model clean

all: setup data study  ## Set up, then run the full study and render reports/report.html.

setup: $(VENV)/.installed  ## Create the virtual environment and install the project with its extras.

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "Python 3.11+ is required (PYTHON=$(PYTHON))"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[study,dev]"
	touch $@

data: setup  ## Make the data available: verify it, install Debian's package when root, else say what to do.
	@$(BIN)/fmnist data --offline 2>/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "Installing Debian's dataset-fashion-mnist ..."; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	  fi; \
	  $(BIN)/fmnist data; }

study: setup data  ## Run every stage with the full params and render the report (8-17 minutes on 2 cores).
	$(BIN)/fmnist run --params $(PARAMS) --out $(OUT)

experiments: setup data  ## Multi-seed recipes, ablations, calibration (about 2 hours; resumes), then the report.
	$(BIN)/fmnist run --params $(PARAMS) --out $(OUT) --stage 06_experiments --stage report

seed-budget: setup data  ## The seed's 27-point grid at its own budget (about 3 hours on 2 cores; resumes), then the study.
	$(BIN)/fmnist run --params params/seed_budget --out $(OUT)/seed_budget --stage 02_tune
	$(BIN)/fmnist run --params $(PARAMS) --out $(OUT)

smoke: setup data  ## The whole chain with the tiny profile, into build/smoke (about 2 minutes).
	$(BIN)/fmnist run --params params/smoke --out build/smoke

report: setup  ## Re-render the report of an existing run in $(OUT).
	$(BIN)/fmnist run --params $(PARAMS) --out $(OUT) --stage report

lint: setup
	$(BIN)/ruff check src tests notebooks
	$(BIN)/ruff format --check src tests notebooks

test: setup data lint  ## Unit tests, the end-to-end smoke run, and nbval over the notebooks, on TEST_WORKERS processes.
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --no-loadscope-reorder tests notebooks --nbval-lax --nbval-current-env

serve: setup  ## Serve the classifier page and API on http://127.0.0.1:8000/ (the shipped model).
	$(BIN)/fmnist serve

bench: setup data  ## Re-measure size, latency and serving of the run in $(OUT) into $(OUT)/deploy/bench.json.
	$(BIN)/fmnist bench --out $(OUT) --serve-model shipped

loadtest: setup  ## Load and abuse a fresh `fmnist serve` (shipped model; no study needed) into build/loadtest.json.
	$(BIN)/fmnist loadtest --json build/loadtest.json

ship-model:  ## Make the int8 model that 05_deploy chose (deploy/shipping.json) the default of fmnist classify / serve.
	cp $(OUT)/deploy/shipped_int8.tflite src/fmnist/assets/fmnist_int8.tflite

lab: setup data  ## Open the notebooks in JupyterLab, with this environment as the python3 kernel.
	$(BIN)/jupyter lab notebooks $(if $(filter 0,$(shell id -u)),--allow-root,)

tensorboard: setup  ## TensorBoard on http://127.0.0.1:$(TB_PORT)/ (loopback only): the trainings and trials of $(OUT).
	@out=$(patsubst %/,%,$(OUT)); logs="$(TB_LOGDIR)"; \
	if [ -z "$$logs" ]; then \
	  logs=$$out/tensorboard; work=$$(dirname "$$out")/.$$(basename "$$out").run/tensorboard; \
	  if [ -d "$$work" ]; then \
	    echo "A run of $$out is in progress (or unfinished): its logs. The published ones: make tensorboard TB_LOGDIR=$$logs"; \
	    logs=$$work; \
	  fi; \
	fi; \
	if [ ! -d "$$logs" ]; then echo "No TensorBoard logs in $$logs: fmnist run writes them (they are not committed), e.g. make study."; exit 1; fi; \
	echo "TensorBoard of $$logs on http://127.0.0.1:$(TB_PORT)/ (Ctrl-C stops it)"; \
	$(BIN)/tensorboard --logdir "$$logs" --host 127.0.0.1 --port $(TB_PORT) 2>&1 \
	  | grep --line-buffered -v -E '^(WARNING: All log messages before absl::InitializeLog|[IWE][0-9]{4} )'

kernel: setup  ## Register this environment as the "Python (fmnist)" kernel for a JupyterLab outside it.
	$(BIN)/python -m ipykernel install --user --name fmnist --display-name "Python (fmnist)"

clean:
	rm -rf build $(VENV)
