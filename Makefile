# expert-lab: every target sets itself up on a fresh machine (a .venv beside this file).
#   make quickstart   train one expert on the offline `digits` images and write its report under runs/
#   make test         the whole test suite: notebooks clean and exported, nbdev-test, pytest (Slurm and browser included)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.expert-lab-installed

.PHONY: setup quickstart test test-fast lab clean-runs

# Re-install when the dependencies change. torch==2.14.1/torchvision==0.29.1 come from this machine's disk.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[dev]"
	$(BIN)/python -m ipykernel install --sys-prefix --name expert-lab --display-name expert-lab >/dev/null
	@# nbdev's git hooks and merge driver keep notebooks clean and mergeable (only inside a git checkout)
	@# (pointed at .venv/bin, so they work without an activated venv)
	@if git rev-parse --git-dir >/dev/null 2>&1; then \
	    $(BIN)/nbdev-install-hooks >/dev/null && \
	    sed -i 's|^nbdev-trust$$|$(BIN)/nbdev-trust|' "$$(git rev-parse --git-path hooks)/post-merge" && \
	    sed -i -e 's|driver = nbdev-merge|driver = $(BIN)/nbdev-merge|' -e 's|command = nbdev-diff-driver|command = $(BIN)/nbdev-diff-driver|' .gitconfig; \
	fi
	@touch $@

setup: $(STAMP)

quickstart: $(STAMP)
	$(BIN)/expert-lab train --dataset digits --model wideresnet16_2 --n-experts 1 --expert-id 0 \
	    --epochs 25 --batch-size 64 --lr 0.05 --restart-period 25 --min-epochs 15 --patience 8 --no-hflip

test: $(STAMP)
	bash tools/test.sh

test-fast: $(STAMP)
	TEST_FAST=1 bash tools/test.sh

lab: $(STAMP)
	$(BIN)/expert-lab lab
