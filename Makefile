# Two commands for a fresh clone: `make lab` and `make test`. Each sets up what it needs, once.
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEBS := dataset-fashion-mnist chromium pandoc
PORT ?= 8888
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root)

.PHONY: lab test sync docs bench app

# torch and torchvision are pinned to the builds that pip finds offline here; the rest comes from settings.ini.
$(STAMP): settings.ini setup.py
	dpkg -s $(DEBS) >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq $(DEBS); }
	test -x $(BIN)/python || python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

# prints the URL to open, token included; `make lab PORT=8890` for another port
lab: $(STAMP)
	$(BIN)/jupyter lab $(ROOT_FLAG) --port=$(PORT) nbs/index.ipynb

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

# the notebooks are the source: clean them (outputs too), regenerate the package and README.md from them
sync: $(STAMP)
	$(BIN)/nbdev_clean && $(BIN)/nbdev_export && $(BIN)/python tools/docs.py readme

# the docs site into _docs/: runs the notebooks, then nbdev_docs where Quarto is installed, else tools/docs.py without it
docs: $(STAMP)
	$(BIN)/python tools/docs.py

bench: $(STAMP)
	$(BIN)/python -m excitation_workbench.bench

# the workbench as a page of its own, served by Voila (it prints the URL); `make app MODEL=fashion-cnn` for another zoo model
app: $(STAMP)
	WORKBENCH_MODEL=$(or $(MODEL),fer-emotion) $(BIN)/voila nbs/_app.ipynb
