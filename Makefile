# oncoscope — `make run` serves the app, `make test` runs the whole suite.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: run test venv browser train evaluate bench clean

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

test: venv browser
	bash scripts/test.sh

# Debian's Chromium for the Playwright end-to-end test (Playwright's own browser download is not used),
# poppler-utils (pdftotext, pdftoppm) for the tests that read the PDF reports back, and Orthanc with its
# DICOMweb plugin: the PACS the integration tests start privately (own config, storage and ports).
browser:
	@command -v chromium >/dev/null 2>&1 && command -v pdftotext >/dev/null 2>&1 && command -v Orthanc >/dev/null 2>&1 \
	  && [ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || { \
	  if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium poppler-utils orthanc \
	      orthanc-dicomweb >/dev/null) \
	      || echo "WARNING: could not install chromium / poppler-utils / orthanc; the tests needing them will be skipped"; \
	  else echo "WARNING: chromium, poppler-utils or orthanc missing and not root; the tests needing them will be skipped"; fi; }

train: venv
	$(BIN)/oncoscope train --analyzer smear-all

evaluate: venv
	$(BIN)/oncoscope evaluate --analyzer smear-all

bench: venv
	$(BIN)/oncoscope bench --json

clean:
	rm -rf $(VENV) runs .pytest_cache
