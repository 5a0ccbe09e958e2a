# Two commands do all the set-up on a fresh machine (each installs what it needs into .venv):
#   make book   build the book into _build/html (warnings are errors)
#   make test   run the whole test suite: unit + property tests, every notebook (nbval), browser test
# Other targets: make notebooks (re-execute every notebook, storing outputs), make bench, make clean.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch==2.13.0 is the CPU build on the machines CI runs on. Elsewhere PyPI's Linux build is the
# CUDA one; for a small CPU-only install pass the PyTorch CPU index. TORCH_SPEC is passed to pip
# unquoted, so it may carry options; quote a version range inside it:
#   make test TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cpu"
#   make test TORCH_SPEC="'torch>=2.5'"
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: book test notebooks bench clean install

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

book: $(STAMP)
	$(BIN)/python scripts/build_book.py

# tests/test_browser.py builds the book first (scripts/build_book.py) when _build/html is missing
# or older than its sources, so `make test` needs no `make book` before it.
test: $(STAMP)
	$(BIN)/python -m pytest

notebooks: $(STAMP)
	$(BIN)/python scripts/run_notebooks.py $(NB)

bench: $(STAMP)
	$(BIN)/python -m mla_tutorial.bench

clean:
	rm -rf _build .pytest_cache .hypothesis test-artifacts
