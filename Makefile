# The README's two commands: `make demo` (the main job) and `make test` (the whole suite).
# Both start with `make setup`, which installs only what is missing and takes seconds after that.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The guest kernels the default job and the tests boot (tests/integration/test_arches_boot.py
# boots every arch); `qlaunch assets fetch --arch SET` adds any other.
ASSETS ?= x86_64,x86_64-generic,aarch64,arm,i386,ppc64le,s390x,mips64el
PYTEST_ARGS ?=

.PHONY: setup demo test test-images lint unit golden bench clean

setup: $(VENV)/.installed
	@bash .ci/setup-host
	@$(BIN)/qlaunch assets fetch --arch $(ASSETS)

$(VENV)/.installed: pyproject.toml
	@bash .ci/setup-host
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/pip install -q --disable-pip-version-check -e '.[test]'
	@touch $@

demo: setup
	$(BIN)/qlaunch run default -- sh -c 'uname -a; echo; cat /proc/cpuinfo | grep -m1 "model name"; free -m; echo; cat /proc/cmdline'

lint: $(VENV)/.installed
	$(BIN)/ruff check qlaunch tests bench
	$(BIN)/ruff format --check qlaunch tests bench
	$(BIN)/mypy --strict qlaunch

unit: $(VENV)/.installed
	$(BIN)/pytest -q tests/unit $(PYTEST_ARGS)

# The Debian 12 images the slow tests boot (x86_64 BIOS and UEFI, aarch64 UEFI), built with
# `qlaunch image build` and cached by recipe in ~/.cache/qlaunch/test-images: minutes the first
# time (aarch64 about 10 under qemu-user), nothing while qlaunch/storage/build.py and the command
# are unchanged. Before pytest, so no test's time includes a build.
test-images: setup
	$(BIN)/python tests/integration/debimage.py

test: setup lint test-images
	$(BIN)/pytest -q -ra $(PYTEST_ARGS)

# Rewrite the golden argv files after a deliberate change; review them with `git diff`.
golden: $(VENV)/.installed
	QLAUNCH_REGEN_GOLDEN=1 $(BIN)/pytest -q tests/unit/test_argv_golden.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
