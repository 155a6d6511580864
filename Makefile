# peekproxy developer entry points. Both targets create ./.venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_FLAGS ?=

.PHONY: test demo lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

## make test: lint (ruff), type-check (mypy) and run the test suite.
test: $(VENV)/.installed lint
	$(BIN)/pytest

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy peekproxy tests

## make demo: run the daemon on config.toml and show where its key server answers.
demo: $(VENV)/.installed
	$(BIN)/python -m peekproxy.demo -c config.toml $(DEMO_FLAGS)

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
