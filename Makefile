# oncoscope — `make run` serves the app, `make test` runs the whole suite.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: run test venv train evaluate bench clean

venv: $(STAMP)

# torch first (pinned CPU wheel), then the package with training and test extras.
$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "Python 3.11 is required, found " + sys.version' 
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[train,test]'
	touch $(STAMP)

run: venv
	$(BIN)/oncoscope db upgrade
	$(BIN)/oncoscope serve --host $(HOST) --port $(PORT)

test: venv
	bash scripts/test.sh

train: venv
	$(BIN)/oncoscope train --analyzer smear-all

evaluate: venv
	$(BIN)/oncoscope evaluate --analyzer smear-all

bench: venv
	$(BIN)/oncoscope bench --json

clean:
	rm -rf $(VENV) runs .pytest_cache
