# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint docs bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev,tune,demo]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/lightning-diag demo

test: $(STAMP)
	$(BIN)/ruff check lightning_diag tests benchmarks
	$(BIN)/mypy lightning_diag
	$(BIN)/python -m pytest -q
	$(BIN)/mkdocs build --strict -q -d .site

lint: $(STAMP)
	$(BIN)/ruff check lightning_diag tests benchmarks
	$(BIN)/mypy lightning_diag

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) .site runs .pytest_cache .mypy_cache .ruff_cache
