# Everything a fresh machine needs comes from here: `make run` and `make test` build the virtualenv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)
# Set on the command line (`make run HOST=0.0.0.0`), never taken from the environment: tcsh exports HOST
# (the machine's name) and many platforms export PORT, which would quietly expose the development server.
HOST   := 127.0.0.1
PORT   := 8000

.PHONY: install run test test-deps bench soak lint format clean

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

## Debian packages the suite starts for real, in one apt-get run (a no-op once installed; root on a fresh machine):
## the gateways of tests/gateways, pgbouncer (tests/pooler) and chromium (tests/clients/test_browser.py).
test-deps:
	sh tests/gateways/install-packages.sh

## Lint, type-check, then the whole suite on PostgreSQL (TEST_DATABASE_ADMIN_DSN, else 127.0.0.1:5432, else embedded).
## tests/pooler/ runs the issuer through a PgBouncer in transaction mode; it apt-get installs pgbouncer if missing.
test: install test-deps
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/python -m pytest

## Throughput against baselines measured in the same run (PostgreSQL on 127.0.0.1:5432; installs wrk if missing).
# The bench's peer (djangorestframework-simplejwt, bench/peers/simplejwt) in a virtualenv of its own, never the issuer's.
PEER       := bench/peers/simplejwt
PEER_STAMP := $(PEER)/.venv/.installed-$(shell sha1sum $(PEER)/requirements.txt | cut -c1-12)

$(PEER_STAMP): $(PEER)/requirements.txt
	$(PYTHON) -m venv $(PEER)/.venv
	$(PEER)/.venv/bin/python -m pip install --quiet --disable-pip-version-check -r $(PEER)/requirements.txt
	rm -f $(PEER)/.venv/.installed-*
	touch $@

bench: install $(PEER_STAMP)
	@command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk) || \
		(echo "bench: wrk is needed (Debian: apt-get install wrk)"; exit 1)
	$(BIN)/python -m bench.run

## The cluster soak (about 3 minutes, loopback only): 3 replicas behind HAProxy, PgBouncer in transaction mode,
## mixed load, key rotation and revocation, kill -9 of a replica, PgBouncer down for 5 s; writes docs/operations.md.
## PostgreSQL on 127.0.0.1:5432 (or SOAK_ADMIN_DSN); installs haproxy and pgbouncer from Debian if missing.
soak: install
	$(BIN)/python -m soak

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) $(PEER)/.venv .pytest_cache .ruff_cache issuer.egg-info
