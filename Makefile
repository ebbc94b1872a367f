# Everything a fresh machine needs comes from here: `make run` and `make test` build the virtualenv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)
# Set on the command line (`make run HOST=0.0.0.0`), never taken from the environment: tcsh exports HOST
# (the machine's name) and many platforms export PORT, which would quietly expose the development server.
HOST   := 127.0.0.1
PORT   := 8000

.PHONY: install run test bench lint format clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[server,test,embedded]"
	rm -f $(VENV)/.installed-*
	touch $@

## Serve on an embedded PostgreSQL kept in ./.pgdata (or on DATABASE_URL): migrate, create dev keys, listen.
run: install
	$(BIN)/issuer dev --host $(HOST) --port $(PORT)

## Lint, type-check, then the whole suite on PostgreSQL (TEST_DATABASE_ADMIN_DSN, else 127.0.0.1:5432, else embedded).
test: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/python -m pytest

## Throughput against baselines measured in the same run (PostgreSQL on 127.0.0.1:5432; installs wrk if missing).
bench: install
	@command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk) || \
		(echo "bench: wrk is needed (Debian: apt-get install wrk)"; exit 1)
	$(BIN)/python -m bench.run

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache issuer.egg-info
