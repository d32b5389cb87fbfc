# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv browser postgres demo test lint bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev,tune,demo]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/lightning-diag demo

# The HTML report's rendering test needs a headless Chromium; install it where we can (Debian,
# as root), otherwise that one test is skipped.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
	    { apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 || \
	      { apt-get update -q >/dev/null 2>&1 && \
	        apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1; }; }; } || \
	  echo "note: no Chromium could be installed; the report's browser test will be skipped"

# The shared-study test starts a throwaway PostgreSQL cluster; install the server where we can
# (Debian, as root), otherwise that one test is skipped.
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || \
	  { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
	    { apt-get install -y -q --no-install-recommends postgresql >/dev/null 2>&1 || \
	      { apt-get update -q >/dev/null 2>&1 && \
	        apt-get install -y -q --no-install-recommends postgresql >/dev/null 2>&1; }; }; } || \
	  echo "note: PostgreSQL could not be installed; the shared-study test will be skipped"

test: $(STAMP) browser postgres
	$(BIN)/ruff check lightning_diag tests benchmarks notebooks
	$(BIN)/mypy lightning_diag
	$(BIN)/python -m pytest -q
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict -q -d .site

lint: $(STAMP)
	$(BIN)/ruff check lightning_diag tests benchmarks notebooks
	$(BIN)/mypy lightning_diag

# docs/codes.md's and docs/tensorboard.md's tables are generated when the docs are built
# (docs/hooks/generated.py): nothing to regenerate by hand.

# Cost and quality figures for docs/performance.md (minutes; not part of the tests).
bench: $(STAMP)
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) .site runs .pytest_cache .mypy_cache .ruff_cache
