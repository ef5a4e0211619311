# `make demo` and `make test` work on a fresh machine: each creates .venv and installs first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck pytest bench docs docs-serve clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/writeturn demo

test: lint typecheck pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests migrations examples benchmarks
	$(BIN)/ruff format --check src tests migrations examples benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy --strict src

pytest: $(STAMP)
	$(BIN)/pytest

bench: $(STAMP)
	$(BIN)/writeturn bench

# The documentation site (mkdocs.yml, docs/) into build/site. --strict: a warning, such
# as a broken link or an API reference that does not resolve, fails the build.
# NO_MKDOCS_2_WARNING: Material prints a notice about its successor on every build.
docs docs-serve: export NO_MKDOCS_2_WARNING = 1

docs: $(STAMP)
	$(BIN)/mkdocs build --strict

docs-serve: $(STAMP)
	$(BIN)/mkdocs serve --strict

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache build/site
