# The two commands of the README:
#   make run    create .venv, install mmattn, run scripted generation on the embedded default
#   make test   the whole test suite on the lowest and on the newest supported transformers/diffusers
# and the upstream watch:
#   make compat-latest   the whole suite on the newest releases, ignoring the upper bounds in pyproject.toml
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
UV := $(BIN)/uv
ENVS ?= .envs
OUT ?= outputs/default
# The heads `mmattn heads search --objective adherence` found on shapes-t2i (bench/results/shapes/heads/heads.json;
# mmattn.shapes.evaluate.SEARCHED_HEADS).
SEARCHED_HEADS := transformer_blocks.0:0,2; transformer_blocks.3:2; transformer_blocks.1:3

# The oldest versions of the two libraries whose internals we touch (the lower bounds in pyproject.toml).
LOWEST := transformers==5.23.0 diffusers==0.42.0
# uv reads neither pip's configuration nor this machine's wheel store: hand it both where they exist
# (the store holds torch's CUDA build and its nvidia wheels; without it uv downloads them).
UV_LOCAL := $(if $(wildcard /etc/xdg/pip/constraints.txt),--constraint /etc/xdg/pip/constraints.txt) \
            $(if $(wildcard /opt/pypi-more/files),--find-links /opt/pypi-more/files)
UV_INSTALL = $(UV) pip install --quiet $(UV_LOCAL) --python

.PHONY: run test install test-lowest test-newest compat-latest

$(UV):
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip uv

install: $(UV)
	$(UV_INSTALL) $(BIN)/python -e ".[dev]"

run: install
	HF_HUB_OFFLINE=1 $(BIN)/mmattn generate --overwrite --out $(OUT) --strength 0.3 --scale 1.0 --seed 0 --seed 1 \
		--heads "$(SEARCHED_HEADS)" \
		--prompt "a red circle left of a blue square" --prompt "a large yellow star"

test: test-lowest test-newest

# One fresh environment per name: `lowest` pins the lower bounds, `newest` takes the newest the range allows,
# `latest` the newest releases with the upper bounds of transformers and diffusers lifted.
$(ENVS)/%/bin/python: $(UV)
	rm -rf $(ENVS)/$*
	$(UV) venv --quiet --seed --python $(PYTHON) $(ENVS)/$*

test-lowest: $(ENVS)/lowest/bin/python
	$(UV_INSTALL) $< -e ".[dev]" $(LOWEST)
	HF_HUB_OFFLINE=1 $(ENVS)/lowest/bin/pytest

test-newest: $(ENVS)/newest/bin/python
	$(UV_INSTALL) $< --upgrade -e ".[dev]"
	HF_HUB_OFFLINE=1 $(ENVS)/newest/bin/pytest

compat-latest: $(ENVS)/latest/bin/python
	printf 'transformers>=5.23\ndiffusers>=0.42\n' > $(ENVS)/latest/overrides.txt
	$(UV_INSTALL) $< --upgrade --override $(ENVS)/latest/overrides.txt -e ".[dev]"
	HF_HUB_OFFLINE=1 $(ENVS)/latest/bin/pytest
