# Everything a user or CI runs. The first target builds the virtual environment
# from the lock file; every other target depends on it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RELAY_TEST_POSTGRES_URL ?= postgresql+asyncpg://postgres@127.0.0.1:5432/test
export RELAY_TEST_POSTGRES_URL

.PHONY: install demo test lint typecheck unit golden bench proof clean deploy-check system-deps \
	compose-up compose-smoke compose-down

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --require-hashes --no-deps -r requirements.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/relay demo

lint: $(STAMP)
	$(BIN)/ruff check app tests bench
	$(BIN)/ruff format --check app tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP) system-deps
	$(BIN)/pytest -q

golden: $(STAMP)
	$(BIN)/python ../shared/tools/check_golden.py --relay $(BIN)/relay

# Debian packages the tests drive: Chromium for the browser tests, docker-compose to
# validate the compose file (no Docker engine is needed for `config`). Installed only
# when missing; needs root, as on CI and the project's machines.
system-deps:
	@command -v chromium >/dev/null && command -v docker-compose >/dev/null || { \
	  apt-get update -q >/dev/null && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium docker-compose >/dev/null; }

deploy-check: $(STAMP) system-deps
	$(BIN)/hadolint Dockerfile
	docker-compose -f docker-compose.yml config -q

test: lint typecheck deploy-check unit

bench: $(STAMP)
	$(BIN)/python bench/mapper_bench.py

proof: $(STAMP)
	$(BIN)/pytest -q -m slow

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache .hypothesis

# The compose stack (needs a Docker engine; the project's CI machine has none, so these
# are not part of `make test`). With the old v1 tool: COMPOSE=docker-compose make compose-up
compose-up:
	deploy/compose-smoke.sh up

compose-smoke:
	deploy/compose-smoke.sh smoke

compose-down:
	deploy/compose-smoke.sh down
