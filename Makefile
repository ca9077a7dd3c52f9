# Two commands on a fresh Debian machine with only Python: `make run`, `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT := $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get

.PHONY: install run test check check-deploy bench chaos clean

$(BIN)/receiver: pyproject.toml
	$(PY) -m venv $(VENV) || { $(APT) update -q && $(APT) install -y -q python3-venv && $(PY) -m venv $(VENV); }
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

install: $(BIN)/receiver
	@command -v redis-server >/dev/null || { $(APT) update -q && $(APT) install -y -q redis-server; }

run: install
	$(BIN)/receiver serve --simulator

test: install
	@command -v chromium >/dev/null || { $(APT) update -q && $(APT) install -y -q chromium; }
	@command -v npm >/dev/null || { $(APT) update -q && $(APT) install -y -q nodejs npm; }
	$(BIN)/pytest

check: install check-deploy
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports

# deploy/ against schemas shipped in the dev tools (no Docker, no cluster, no network).
K8S_VERSION ?= 1.30.0
check-deploy: install
	$(BIN)/check-jsonschema --builtin-schema vendor.compose-spec deploy/docker-compose.yml
	$(BIN)/kubernetes-validate --kubernetes-version $(K8S_VERSION) --strict --quiet deploy/k8s/*.yaml

# Longer than CI's versions, bounded: 10,000 callbacks through kills of Redis and the web
# process (figures to RELIABILITY.md), then the fuzz suite with 20x the examples.
chaos: install
	$(BIN)/python -m bench.chaos --tasks 500 --steps 20
	FUZZ_SCALE=20 $(BIN)/pytest -q --timeout 1500 tests/test_fuzz.py

bench: install
	@command -v wrk >/dev/null || { $(APT) update -q && $(APT) install -y -q wrk; }
	$(BIN)/python -m bench.ingest
	$(BIN)/python -m bench.sse

clean:
	rm -rf $(VENV) .receiver .pytest_cache .mypy_cache .ruff_cache .hypothesis
