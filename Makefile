# Every target makes its own virtualenv in .venv first; nothing else to install by hand.
# `make test` also makes .venv-dj61: the newest Django line on Python 3.12 (pyenv's, or
# PYTHON_DJ61=...), so the whole suite runs on Django 5.2 / Python 3.11 and on Django 6.1.
VENV ?= .venv
PYTHON ?= python3
VENV_DJ61 ?= .venv-dj61
PYTHON_DJ61 ?= $(or $(firstword $(wildcard $(shell pyenv root 2>/dev/null)/versions/3.12*/bin/python3.12)),python3.12)

.PHONY: install install-dj61 test demo lint bench

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -U pip
	$(VENV)/bin/pip install -q -e '.[drf,postgres,spectacular,dev]'
	touch $@

install: $(VENV)/.installed

$(VENV_DJ61)/.installed: pyproject.toml
	$(PYTHON_DJ61) -m venv $(VENV_DJ61)
	$(VENV_DJ61)/bin/pip install -q -U pip
	$(VENV_DJ61)/bin/pip install -q -e '.[drf,postgres,spectacular,dev]' 'Django>=6.1,<6.2'
	touch $@

install-dj61: $(VENV_DJ61)/.installed

test: install install-dj61
	VENV=$(VENV) VENV_DJ61=$(VENV_DJ61) scripts/test.sh

demo: install
	VENV=$(VENV) scripts/demo.sh

lint: install
	$(VENV)/bin/ruff check agent_ledger tests example_project
	$(VENV)/bin/ruff format --check agent_ledger tests example_project

bench: install
	$(VENV)/bin/python bench/run.py
