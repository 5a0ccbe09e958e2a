# Two commands do all the set-up on a fresh machine (each installs what it needs into .venv):
#   make book   build the book into _build/html (warnings are errors)
#   make test   run the whole test suite: unit + property tests, every notebook (nbval), browser test
# Other targets: make notebooks (re-execute every notebook, storing outputs), make bench, make clean.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU build of torch keeps the set-up small; use TORCH_SPEC=torch for your platform's default build.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: book test notebooks bench clean install

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

book: $(STAMP)
	$(BIN)/python scripts/build_book.py

test: $(STAMP)
	$(BIN)/python -m pytest

notebooks: $(STAMP)
	$(BIN)/python scripts/run_notebooks.py $(NB)

bench: $(STAMP)
	$(BIN)/python -m mla_tutorial.bench

clean:
	rm -rf _build .pytest_cache .hypothesis
