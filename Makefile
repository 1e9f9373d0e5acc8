# Every target installs what it needs: `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PROTOS := $(shell find protos -name '*.proto' | sort)

.PHONY: install proto proto-check lint typecheck test test-fast bench bench-fleet bench-hub-instructions valgrind demo up clean browser node softhsm postgresql zbar

install: $(STAMP)

# Reinstall when the project's packages change too (an editable install maps the packages it saw).
$(STAMP): pyproject.toml $(wildcard src/*/__init__.py)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

proto: install
	rm -rf generated/devprov
	$(BIN)/python -m grpc_tools.protoc -I protos --python_out=generated --pyi_out=generated \
		--grpc_python_out=generated $(PROTOS)

proto-check: install
	@tmp=$$(mktemp -d) && \
	$(BIN)/python -m grpc_tools.protoc -I protos --python_out=$$tmp --pyi_out=$$tmp \
		--grpc_python_out=$$tmp $(PROTOS) && \
	if diff -r -x __pycache__ $$tmp/devprov generated/devprov; then rm -rf $$tmp; echo "generated/ is up to date"; \
	else rm -rf $$tmp; echo "generated/ is stale: run 'make proto' and commit the result" >&2; exit 1; fi

lint: install
	$(BIN)/ruff check src tests bench

# mypy --strict on src/ (settings in pyproject.toml's [tool.mypy]).
typecheck: install
	$(BIN)/mypy

test: proto-check lint typecheck browser node softhsm postgresql zbar
	$(BIN)/python -m pytest

# The fast part of the suite while working: every test not marked slow (see tests/README.md), in under two
# minutes on two cores.  `make test` still runs everything.
test-fast: browser softhsm postgresql zbar
	$(BIN)/python -m pytest -m "not slow" -q

# System packages some tests need, from Debian: $(call apt_package,NAME,PACKAGE,FILE); FILE may be a glob.  Never
# fails the build: when FILE is missing and PACKAGE cannot be installed, the reason is printed and written to
# $(VENV)/NAME-unavailable, and the tests that need it skip with that reason.
define apt_package
	@rm -f $(VENV)/$(1)-unavailable 2>/dev/null; why=""; \
	if ls -d $(3) >/dev/null 2>&1; then echo "$(1): $(3) is there"; exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then sudo=""; \
	elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo -n"; \
	else why="$(3) is missing and installing $(2) needs root or passwordless sudo"; fi; \
	if [ -z "$$why" ]; then \
		if ! command -v apt-get >/dev/null 2>&1; then why="$(3) is missing and there is no apt-get"; \
		elif ! { $$sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
			$$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(2); \
			} >$(VENV)/$(1)-install.log 2>&1; then \
			why="apt-get install $(2) failed: $$(tail -n 1 $(VENV)/$(1)-install.log)"; \
		elif ! ls -d $(3) >/dev/null 2>&1; then why="apt-get installed $(2) but $(3) is not there"; fi; \
	fi; \
	if [ -n "$$why" ]; then echo "$(1): $$why; the tests that need it will skip" >&2; \
		{ echo "$$why" > $(VENV)/$(1)-unavailable; } 2>/dev/null || true; \
	else echo "$(1): installed $(2)"; fi
endef

# Headless Chromium for the portal's browser tests (never `playwright install`).
browser: install
	$(call apt_package,chromium,chromium,/usr/bin/chromium)

# SoftHSM2, the PKCS#11 token the factory's HSM-backed CA is tested against.
softhsm: install
	$(call apt_package,softhsm2,softhsm2,/usr/lib/softhsm/libsofthsm2.so)

# zbarimg (Debian's zbar-tools): the independent QR decoder the label tests read every PNG label back with.
zbar: install
	$(call apt_package,zbar-tools,zbar-tools,/usr/bin/zbarimg)

# Node.js and npm (Debian's packages) for the tests that drive the emulator with Microsoft's Node.js SDKs; the
# tests install the SDKs pinned in tests/node/package-lock.json into $(VENV)/node/ themselves.  Never fails the
# build: when they cannot be installed the reason goes to $(VENV)/node-unavailable and those tests skip with it.
node: install
	@rm -f $(VENV)/node-unavailable 2>/dev/null; why=""; missing=""; \
	command -v node >/dev/null 2>&1 || missing="nodejs"; \
	command -v npm >/dev/null 2>&1 || missing="$${missing:+$$missing }npm"; \
	if [ -z "$$missing" ]; then echo "node: $$(node --version), npm $$(npm --version)"; exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then sudo=""; \
	elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo -n"; \
	else why="$$missing missing and installing needs root or passwordless sudo"; fi; \
	if [ -z "$$why" ]; then \
		if ! command -v apt-get >/dev/null 2>&1; then why="$$missing missing and there is no apt-get"; \
		elif ! { $$sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
			$$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
			} >$(VENV)/node-install.log 2>&1; then \
			why="apt-get install $$missing failed: $$(tail -n 1 $(VENV)/node-install.log)"; \
		elif ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then \
			why="apt-get installed $$missing but node or npm is still not on PATH"; fi; \
	fi; \
	if [ -n "$$why" ]; then echo "node: $$why; the Node.js SDK tests will skip" >&2; \
		{ echo "$$why" > $(VENV)/node-unavailable; } 2>/dev/null || true; \
	else echo "node: installed $$(node --version), npm $$(npm --version)"; fi

# Debian's PostgreSQL server for the tests that run the stores on PostgreSQL (each test session starts a
# throwaway cluster of its own from these binaries, see tests/support/pgcluster.py).
postgresql: install
	$(call apt_package,postgresql,postgresql,/usr/lib/postgresql/*/bin/initdb)

bench: install
	$(BIN)/python -m bench

# The IoT Hub emulator with 50,000 devices (several minutes, most of the machine; not in `make bench`).
bench-fleet: install
	$(BIN)/python -m bench hub_fleet

# valgrind (callgrind) for counting the emulator's instructions per message.
valgrind: install
	$(call apt_package,valgrind,valgrind,/usr/bin/callgrind_control)

# The IoT Hub emulator's instructions per telemetry message, counted by callgrind (a few minutes under
# valgrind; not in `make bench`): repeatable on a busy machine, unlike CPU seconds.
bench-hub-instructions: valgrind
	$(BIN)/python -m bench hub_instructions

# The whole flow on the embedded emulator; DEMO_ARGS e.g. "--devices 10 --seconds 60" (see --help).
# Ctrl-C ends it with 130 (interrupted), which is no failure here: the recipe's shell lets the demo stop
# its stack (trap: it does not die of the signal itself) and ends quietly, so make adds no "Error" line.
demo: install
	@trap true INT; $(BIN)/python -m devprov_demo run $(DEMO_ARGS) || [ $$? -eq 130 ]

# The stack alone, kept up for driving it by hand with the CLIs (prints how).  UP_ARGS="--replicas 2": the
# services' state on PostgreSQL, two replicas of each behind one address (README).
up: install
	@trap true INT; $(BIN)/python -m devprov_demo up $(UP_ARGS) || [ $$? -eq 130 ]

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
