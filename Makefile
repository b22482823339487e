# Two entry points for a fresh clone: `make demo` and `make test`. Both install first.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# PIP_CONSTRAINT also reaches pip's isolated build environments (DeepSpeed builds from sdist),
# so nothing can pull an unpinned torch.
PIP := PIP_CONSTRAINT=$(CURDIR)/constraints.txt $(BIN)/pip
# DeepSpeed's JIT builds (~/.cache/torch_extensions) run `ninja` from PATH: the venv's here, as
# in the tests (tests/conftest.py), so no run finds a system ninja that cannot read the venv
# ninja's build log and rebuilds (a minute or more on 2 CPUs).
ON_PATH := PATH="$(CURDIR)/$(BIN):$$PATH"

.PHONY: install tools browser demo test test-fast lint bench clean

install: $(VENV)/.installed tools browser

# The dashboard's browser test (tests/cluster/test_dashboard_browser.py) drives Debian's Chromium
# through Playwright. Where apt cannot install it (not root, no apt), the test skips and says why.
browser:
	@command -v chromium >/dev/null || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	  { apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 || \
	    { apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null; }; }; } || \
	  echo "chromium not installed: the dashboard's browser test will skip"

# Checkov (the generic Kubernetes checks tests/k8s/test_k8s_checkov.py runs over the manifests)
# lives in its own virtualenv: installed into .venv, its pins would downgrade boto3/botocore.
CHECKOV_VERSION := 3.3.30
TOOLS := .tools
tools: $(TOOLS)/checkov/.installed-$(CHECKOV_VERSION)

$(TOOLS)/checkov/.installed-$(CHECKOV_VERSION):
	test -x $(TOOLS)/checkov/bin/python || $(PYTHON) -m venv $(TOOLS)/checkov
	$(TOOLS)/checkov/bin/pip install --quiet --disable-pip-version-check checkov==$(CHECKOV_VERSION)
	touch $@

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --disable-pip-version-check -e '.[dev]'
	# DeepSpeed JIT-builds its CPU extensions on first use; build them once here.
	$(ON_PATH) $(BIN)/python -m stoker.trainer.warmup
	touch $@

demo: install
	$(BIN)/stoker data sample digits data/digits.csv
	$(BIN)/stoker data prepare examples/digits.yaml
	$(ON_PATH) $(BIN)/stoker train examples/digits.yaml --fresh

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
