# The two commands of the README:
#   make run    create .venv, install mmattn, run scripted generation on the embedded default
#   make test   install what the tests need, run the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= outputs/default

.PHONY: run test install

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

install: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[dev]"

run: install
	HF_HUB_OFFLINE=1 $(BIN)/mmattn generate --out $(OUT)

test: install
	HF_HUB_OFFLINE=1 $(BIN)/pytest
