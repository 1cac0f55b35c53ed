# Every target creates and fills the project's virtual environment (.venv) when it is missing.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
VENV := .venv
PY := $(VENV)/bin/python
JOBS ?= 2
# One thread per process: the tests run JOBS processes side by side on a small machine, and
# oversubscribed OpenMP threads slow a training loop a hundredfold while they wait on each other.
export OMP_NUM_THREADS ?= 1

.PHONY: venv test book execute format lab bench clean

$(VENV)/.installed: requirements.txt pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

venv: $(VENV)/.installed

# Every test: the pytest suite (normcode against torch.nn, the book build with -W, the browser
# check) and nbval in strict mode over every chapter, each notebook in a fresh kernel.
test: venv
	$(PY) -m pytest -n $(JOBS) --dist loadfile tests
	$(PY) -m pytest -n $(JOBS) --dist loadfile --nbval --nbval-current-env \
	    --nbval-sanitize-with chapters/sanitize.cfg chapters

# The book in both editions, from the notebooks' stored outputs, with warnings as errors:
# English in _build/html, Chinese (the same notebooks, markdown from i18n/zh/) in _build/html/zh.
book: venv
	$(PY) i18n/editions.py build

# Re-execute every chapter in place, so the stored outputs are what the code prints.
execute: venv
	cd chapters && for nb in *.ipynb; do ../$(VENV)/bin/jupyter execute --inplace "$$nb"; done

# Format the chapters' code at the book's 88-character column (tests/test_notebooks.py checks it).
format: venv
	$(VENV)/bin/ruff format chapters

# Open the chapters in JupyterLab, in the project's environment (normcode importable).
lab: venv
	$(PY) -m pip install --quiet -r requirements-lab.txt
	$(VENV)/bin/jupyter lab $(LAB_ARGS) $(if $(filter 0,$(shell id -u)),--allow-root) chapters

# Speed and accuracy of normcode against torch.nn, side by side (prints tables; not a test).
# BENCH_ARGS=--book adds the nbval and book-build times; --write updates benchmarks/README.md.
bench: venv
	$(PY) benchmarks/run.py $(BENCH_ARGS)

clean:
	rm -rf _build
