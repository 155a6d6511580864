# peekproxy developer entry points. Both main targets create ./.venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SYNAPSE_VENV := .synapse-venv
# The Synapse the interop tests were written against (its federation answers, rate limits and
# errors are asserted on); raise it on purpose, with the tests.
SYNAPSE_VERSION := 1.163.2
DEMO_FLAGS ?=
PYTEST_ARGS ?=

.PHONY: test test-fast demo lint test-deps dnsmasq reverse-proxies js-harness clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

# Synapse (the real homeserver the interop tests run against) lives in its own venv.
$(SYNAPSE_VENV)/.installed: Makefile
	$(PYTHON) -m venv $(SYNAPSE_VENV)
	$(SYNAPSE_VENV)/bin/pip install --quiet matrix-synapse==$(SYNAPSE_VERSION)
	touch $@

# dnsmasq (the DNS server the discovery tests run): installed with apt-get when missing.
dnsmasq:
	@command -v dnsmasq >/dev/null || test -x /usr/sbin/dnsmasq || \
	  { if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	      (apt-get update -qq && apt-get install -y -qq dnsmasq-base) >/dev/null; \
	    else echo "dnsmasq missing: install dnsmasq-base, or its tests are skipped"; fi; }

# nginx and caddy (the reverse proxies tests/test_reverse_proxies.py runs, with contrib/'s
# configurations): installed with apt-get when missing and you are root.
reverse-proxies:
	@missing=""; \
	  { command -v nginx >/dev/null || test -x /usr/sbin/nginx; } || missing="$$missing nginx"; \
	  command -v caddy >/dev/null || missing="$$missing caddy"; \
	  if [ -n "$$missing" ]; then \
	    if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	      (apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing) >/dev/null; \
	    else echo "missing:$$missing (apt-get install$$missing), or their tests are skipped"; fi; \
	  fi

# matrix-js-sdk (Element's SDK, run by node in tests/js), at the version package-lock.json pins.
js-harness: tests/js/node_modules/.package-lock.json

tests/js/node_modules/.package-lock.json: tests/js/package-lock.json
	@if command -v npm >/dev/null; then cd tests/js && npm ci --no-audit --no-fund --silent; \
	  else echo "npm missing: the matrix-js-sdk tests are skipped"; fi

test-deps: $(VENV)/.installed $(SYNAPSE_VENV)/.installed dnsmasq reverse-proxies js-harness

## make test: lint (ruff), type-check (mypy) and run the whole test suite.
test: test-deps lint
	$(BIN)/pytest $(PYTEST_ARGS)

## make test-fast: lint, then the tests that start no process (no daemon, testbed or Synapse).
test-fast: $(VENV)/.installed lint
	$(BIN)/pytest -m "not slow" $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy peekproxy tests bench
	$(BIN)/lint-imports

## make demo: a testbed hosts a room, peekproxy peeks it over MSC2444, live events arrive.
demo: $(VENV)/.installed
	$(BIN)/python -m peekproxy.demo $(DEMO_FLAGS)

clean:
	rm -rf $(VENV) $(SYNAPSE_VENV) .mypy_cache .pytest_cache .ruff_cache tests/js/node_modules
