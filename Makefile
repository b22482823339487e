# Two entry points for a fresh clone: `make demo` and `make test`. Both install first.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# PIP_CONSTRAINT also reaches pip's isolated build environments (DeepSpeed builds from sdist),
# so nothing can pull an unpinned torch.
PIP := PIP_CONSTRAINT=$(CURDIR)/constraints.txt $(BIN)/pip

.PHONY: install demo test test-fast lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --disable-pip-version-check -e '.[dev]'
	# DeepSpeed JIT-builds its CPU extensions on first use; build them once here.
	$(BIN)/python -m stoker.trainer.warmup
	touch $@

demo: install
	$(BIN)/stoker data sample digits data/digits.csv
	$(BIN)/stoker data prepare examples/digits.yaml
	$(BIN)/stoker train examples/digits.yaml --fresh

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

# Plain `lint-imports` cannot see the layers from here: the top-level code folders map into
# the one `stoker` package only once installed, so the layering test builds that tree first.
lint: install
	$(BIN)/ruff check .
	$(BIN)/python -m tests.stoker.test_layering

clean:
	rm -rf runs prepared data .pytest_cache
