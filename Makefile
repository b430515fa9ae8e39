# Two entry points for a fresh machine: `make demo` (the main job, offline) and `make test`.
# For the Prefect UI, schedules and deployments: `make server`, `make deploy`, `make worker`, each in its own
# terminal but deploy; `make mlflow-ui` shows the runs and the registry. All use the .venv that setup makes.
PYTHON ?= python3
VENV ?= .venv
# The CPU build of PyTorch; on a CUDA machine set TORCH_SPEC to the build that matches your driver.
TORCH_VERSION ?= 2.13.0
TORCH_SPEC ?= torch==$(TORCH_VERSION)
# The tested versions of every other dependency (`make lock` refreshes it); pyproject.toml keeps the ranges.
LOCK := requirements.lock
BIN := $(VENV)/bin
# The Prefect server these targets run and talk to, its database under .gspo like the temporary one of gspo run.
PREFECT_PORT ?= 4200
PREFECT := PREFECT_HOME=$(CURDIR)/.gspo/prefect PREFECT_SERVER_ANALYTICS_ENABLED=false \
	PREFECT_API_URL=http://127.0.0.1:$(PREFECT_PORT)/api
MLFLOW_PORT ?= 5000

.PHONY: setup lock demo test test-fast lint clean server deploy worker mlflow-ui

setup: $(VENV)/.installed

# torch first, on its own (the lock leaves it out, so the build TORCH_SPEC names stays), then the lock's versions.
$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -r $(LOCK) -e ".[dev]"
	touch $@

# Resolve the newest versions pyproject.toml allows, with torch held at TORCH_VERSION, into the lock file; then
# `make test` and commit it.
lock: setup
	echo "torch==$(TORCH_VERSION)" > $(VENV)/torch-constraint.txt
	CUSTOM_COMPILE_COMMAND="make lock" $(BIN)/pip-compile --quiet --upgrade --extra dev --strip-extras \
		--unsafe-package torch --unsafe-package pip --unsafe-package setuptools --no-emit-index-url \
		--no-emit-find-links -c $(VENV)/torch-constraint.txt --output-file $(LOCK) pyproject.toml

demo: setup
	$(BIN)/gspo run --config configs/demo.yaml

test: setup
	$(BIN)/python -m pytest -q

# Everything but the tests marked slow (learning to a target, real servers, subprocess trainings, the sandbox's
# heavy attacks): under 2 minutes on 2 cores, for use while developing. `make test` runs them all.
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

# ruff's lint and format check over the tree, then mypy over the packages (settings in pyproject.toml)
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check --diff .
	$(BIN)/mypy

# Prefect server and UI at http://127.0.0.1:$(PREFECT_PORT)
server: setup
	env $(PREFECT) $(BIN)/prefect server start --host 127.0.0.1 --port $(PREFECT_PORT)

# The gspo-process work pool and the deployments of prefect.yaml (train-eval is scheduled nightly: see README)
deploy: setup
	env $(PREFECT) $(BIN)/prefect work-pool inspect gspo-process >/dev/null 2>&1 || \
		env $(PREFECT) $(BIN)/prefect --no-prompt work-pool create gspo-process --type process
	env $(PREFECT) $(BIN)/prefect --no-prompt deploy --all

# Runs the deployments' flow runs from this checkout; Ctrl-C or SIGTERM stop it cleanly
worker: setup
	env $(PREFECT) GSPO_PROJECT_DIR=$(CURDIR) $(BIN)/gspo worker --pool gspo-process

# MLflow UI on the pipeline's default store at http://127.0.0.1:$(MLFLOW_PORT)
mlflow-ui: setup
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/.gspo/mlflow.db --host 127.0.0.1 --port $(MLFLOW_PORT)

clean:
	rm -rf .gspo runs
