# grokstack: `make run` starts the whole stack on this machine, `make test` runs every test.
# Both install what they need into .venv the first time (about 3 minutes) and reuse it after.

VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
LOCK := requirements/cpu.lock
STAMP := $(VENV)/.installed
MODEL := .data/models/SmolLM2-135M-Instruct/config.json

.PHONY: install model browser run test test-fast bench clean

install: $(STAMP)

$(STAMP): $(LOCK) pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -r $(LOCK)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

model: $(MODEL)

$(MODEL): | $(STAMP)
	$(BIN)/grokstack model --log-format console

# Debian's chromium for the chat page's browser test (Playwright's own download does not work
# here); installed once, as root, through apt.
browser:
	@command -v chromium >/dev/null || { apt-get install -y -q chromium >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }; }
	@command -v chromium >/dev/null || { echo "chromium is missing: apt-get install chromium"; exit 1; }

run: install model
	$(BIN)/grokstack up --log-format console

test: install model browser
	$(BIN)/lint-imports
	$(BIN)/python -m pytest

test-fast: install
	$(BIN)/python -m pytest -m "not engine"

bench: install model
	$(BIN)/grokstack bench

clean:
	rm -rf $(VENV) .data
