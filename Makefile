# The two commands of the README: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export EVENTMILL_TEST_DSN ?= postgresql://postgres@127.0.0.1:5432/test

.PHONY: demo test lint typecheck docs pytest postgres tools chromium bench soak clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade 'pip>=25.1'

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[postgres,console,http,otel]' --group dev
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/eventmill demo

postgres:
	@bash .ci/ensure-postgres

# Servers the tests start themselves (private clusters, PgBouncer) need these tools.
tools:
	@bash .ci/ensure-tools

# The console's browser tests drive the system's headless Chromium.
chromium:
	@bash .ci/ensure-chromium

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy

# The docs site with the API reference from the docstrings; a warning fails the build.
docs: $(STAMP)
	site=$$(mktemp -d) && NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict \
	  --site-dir "$$site"; status=$$?; rm -rf "$$site"; exit $$status

pytest: $(STAMP) postgres tools chromium
	$(BIN)/pytest

test: lint typecheck docs pytest

bench: $(STAMP) postgres
	$(BIN)/python -m benchmarks

soak: $(STAMP) postgres
	$(BIN)/python -m benchmarks.soak

clean:
	rm -rf $(VENV) build dist src/*.egg-info .mypy_cache .pytest_cache .ruff_cache
