# Every target makes its own virtualenv in .venv first; nothing else to install by hand.
VENV ?= .venv
PYTHON ?= python3

.PHONY: install test demo lint bench

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -U pip
	$(VENV)/bin/pip install -q -e '.[drf,postgres,spectacular,dev]'
	touch $@

install: $(VENV)/.installed

test: install
	VENV=$(VENV) scripts/test.sh

demo: install
	VENV=$(VENV) scripts/demo.sh

lint: install
	$(VENV)/bin/ruff check agent_ledger tests example_project
	$(VENV)/bin/ruff format --check agent_ledger tests example_project

bench: install
	$(VENV)/bin/python bench/run.py
