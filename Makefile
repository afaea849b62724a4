# Two commands for a fresh clone: `make lab` and `make test`. Each sets up what it needs, once.
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEBS := dataset-fashion-mnist chromium
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root)

.PHONY: lab test sync bench

# torch and torchvision are pinned to the builds that pip finds offline here; the rest comes from settings.ini.
$(STAMP): settings.ini setup.py
	dpkg -s $(DEBS) >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq $(DEBS); }
	test -x $(BIN)/python || python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

lab: $(STAMP)
	$(BIN)/jupyter lab $(ROOT_FLAG) nbs/index.ipynb

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

# the notebooks are the source: clean them and regenerate the package from them
sync: $(STAMP)
	$(BIN)/nbdev_clean && $(BIN)/nbdev_export

bench: $(STAMP)
	$(BIN)/python -m excitation_workbench.bench
