# Two commands on a fresh machine: `make quickstart` and `make test`.
# Each creates .venv (pip: it resolves torch from this machine's local wheels) and installs earthray into it.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.earthray-installed

.PHONY: quickstart test test-fast install clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	$(VENV)/bin/earthray quickstart

test: $(STAMP)
	$(VENV)/bin/pytest

# The unit tier alone: no Ray, a minute or two (`make test` runs it and the integration tier).
test-fast: $(STAMP)
	$(VENV)/bin/pytest -m "not integration"

clean:
	rm -rf work .pytest_cache
