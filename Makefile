# One entry point for people and CI. Every target sets up .venv on first use (torch pinned to the
# local CPU wheel so nothing large is downloaded).
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-all lint setup recipe bench clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m tessera.cli demo

test: lint
	$(PY) -m pytest

test-all: $(STAMP)
	$(PY) -m pytest -m ''

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

recipe: $(STAMP)
	$(PY) -m tessera.cli recipe --preset tiny --out runs/tiny

clean:
	rm -rf $(VENV) runs
