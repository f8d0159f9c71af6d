# The two commands a newcomer needs: `make run` and `make test`. Each builds .venv when missing.
VENV   := .venv
PYTHON := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: run serve test bench clean clean-cache

$(STAMP): pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q -e '.[test,server,grammar,bench,oracle,clients,ray]'
	touch $(STAMP)

run: $(STAMP)
	$(PYTHON) -m mistral_ref.example

serve: $(STAMP)
	$(VENV)/bin/mistral-ref serve

test: $(STAMP)
	$(PYTHON) -m pytest -q

bench: $(STAMP)
	$(PYTHON) bench/dequant.py
	$(PYTHON) bench/matvec.py
	$(PYTHON) bench/quantize.py
	$(PYTHON) bench/generate.py --compare
	$(PYTHON) bench/serve.py
	$(PYTHON) bench/cuda_kernels.py

# Disk space only: kernels/jit_cache.py already recompiles every kernel after any edit under kernels/.
clean-cache:
	find kernels mistral_ref -name '*.nbi' -delete -o -name '*.nbc' -delete

clean: clean-cache
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
