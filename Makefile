# plantbus: `make demo` to see it run, `make test` to run the whole suite (what CI runs).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-quick fuzz bench lint check-config clean install deb

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# strict editable installs map files, not folders: reinstall when a package folder changes
$(STAMP): $(PY) pyproject.toml broker broker/sinks codecs $(wildcard connectors connectors/*/)
	$(PY) -m pip install -q -e '.[test,all]' --config-settings editable_mode=strict
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/plantbus demo $(DEMO_ARGS)

# Everything the tests need (Debian packages for the real servers, Python packages),
# then the whole suite. The servers are started once per test session by the tests.
test: $(STAMP)
	./scripts/install-test-deps.sh
	$(PY) -m pytest -p no:cacheprovider $(PYTEST_ARGS)

# Quick iteration: unit and golden tests only, no servers.
test-quick: $(STAMP)
	$(PY) -m pytest -p no:cacheprovider tests/unit tests/golden -q -x $(PYTEST_ARGS)

# Nightly-style fuzzing: every target of tests/fuzz with FUZZ_EXAMPLES inputs each (the suite,
# and so CI, runs 10,000 each). Hours, not minutes; no servers needed.
FUZZ_EXAMPLES ?= 200000
fuzz: $(STAMP)
	PLANTBUS_FUZZ=fuzz PLANTBUS_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -p no:cacheprovider \
		tests/fuzz -m fuzz --timeout=0 -q $(PYTEST_ARGS)

bench: $(STAMP)
	./scripts/install-test-deps.sh
	$(PY) -m bench $(BENCH_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

check-config: $(STAMP)
	$(VENV)/bin/plantbus check -c config/plantbus.toml

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .hypothesis var

# Debian package with plantbus and its dependencies in /opt/plantbus (works offline).
deb:
	./scripts/build-deb.sh
