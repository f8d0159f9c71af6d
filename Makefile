# The two commands a newcomer needs: `make run` and `make test`. Each builds .venv when missing.
VENV   := .venv
PYTHON := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: run test bench clean

$(STAMP): pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q -e '.[test,server,bench,oracle]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/mistral-ref fetch
	$(VENV)/bin/mistral-ref info

test: $(STAMP)
	$(PYTHON) -m pytest -q

bench: $(STAMP)
	$(PYTHON) bench/dequant.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
