# The two commands of the README: `make demo` and `make test`.
# DIALS comes from Debian's `dials` package for /usr/bin/python3 (the first
# python3 on PATH may be another interpreter that cannot import dials).
# `make test-current` is the second lane: the same suite in a current DIALS
# environment that already exists, named by CURRENT_DIALS=<prefix> (a
# conda-forge DIALS environment or a virtualenv whose python imports dials),
# by default the cached one of the development machines. Nothing here builds
# DIALS: where no such environment exists the lane says so and is skipped.
PYTHON ?= /usr/bin/python3
PYTEST_ARGS ?=
CURRENT_DIALS ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/dials-truncfix/current-dials
CURRENT_PYTHON = $(CURRENT_DIALS)/bin/python
# what the current-DIALS lane needs beyond DIALS itself: the test tools,
# plotly (report, where DIALS ships no plotly.js), scikit-learn (dials.scale)
# and dask-jobqueue (mp.method=slurm / sge, tests/test_cluster.py)
CURRENT_EXTRAS = pytest hypothesis plotly==7.1.0 scikit-learn dask-jobqueue==$(DASK_JOBQUEUE_VERSION)
# the cluster extra (pyproject.toml's dials-truncfix[cluster]), pinned for the tests
DASK_JOBQUEUE_VERSION = 0.9.0
# runs a command in the current-DIALS environment (its programs first on PATH)
IN_CURRENT = PATH="$(CURRENT_DIALS)/bin:$$PATH"
# true where CURRENT_DIALS holds a python that imports DIALS
CURRENT_PRESENT = test -x $(CURRENT_PYTHON) && $(CURRENT_PYTHON) -c "import dials, dxtbx" >/dev/null 2>&1
# where it does not: a default that is missing skips the lane with one line,
# a CURRENT_DIALS given by the user that is not a DIALS environment is an error
define current_missing
	if [ "$(origin CURRENT_DIALS)" = file ]; then \
		echo "make $@: skipped, no current DIALS environment at $(CURRENT_DIALS); to run this lane: CURRENT_DIALS=<prefix of a DIALS environment> make $@ (e.g. CURRENT_DIALS=\$$CONDA_PREFIX)"; \
	else \
		echo "make $@: CURRENT_DIALS=$(CURRENT_DIALS): $(CURRENT_PYTHON) cannot import dials and dxtbx" >&2; exit 2; \
	fi
endef

.PHONY: lint setup setup-current install-current-checkout demo report-screenshot test test-current test-release test-fast bench validate clean

# Installs this checkout (editable) into $(1) unless that interpreter already
# imports it from here; checked from / so that a clone elsewhere reinstalls.
define install_checkout
	@cd / && $(1) -c "import importlib.metadata as m, os, sys, dials_truncfix; \
		m.distribution('dials-truncfix'); \
		sys.exit(os.path.dirname(os.path.dirname(os.path.realpath(dials_truncfix.__file__))) != sys.argv[1])" \
		"$(realpath $(CURDIR))" 2>/dev/null || { \
		echo "Installing dials-truncfix (editable) from $(CURDIR) into $(1)"; \
		$(1) -m pip install --quiet --no-deps --no-build-isolation $(2) -e $(CURDIR); }
endef

# headless Chromium renders the HTML report in the tests (devtools/browser.py)
define install_chromium
	@command -v chromium >/dev/null 2>&1 || { \
		echo "Installing chromium (apt-get install chromium)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }
endef

# dask-jobqueue (mp.method=slurm / sge) for Debian's DIALS without pip
# touching a Debian package: dask and distributed from Debian
# (python3-distributed 2022.12.1, which dask-jobqueue 0.9 accepts), then
# dask-jobqueue alone (--no-deps); DIALS' imports and numpy's version
# checked afterwards.
define install_dask_jobqueue_debian
	@$(PYTHON) -c "import dask_jobqueue" 2>/dev/null || { \
		$(PYTHON) -c "import distributed" 2>/dev/null || { \
			echo "Installing dask and distributed from Debian (apt-get install python3-distributed)"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends python3-distributed || exit 1; }; \
		numpy=$$($(PYTHON) -c "import numpy; print(numpy.__version__)"); \
		echo "Installing dask-jobqueue $(DASK_JOBQUEUE_VERSION) (pip --no-deps; dask and distributed are Debian's)"; \
		$(PYTHON) -m pip install --quiet --break-system-packages --no-deps dask-jobqueue==$(DASK_JOBQUEUE_VERSION) && \
		$(PYTHON) -c "import dials, dxtbx, numpy, scipy, dask_jobqueue, sys; sys.exit(numpy.__version__ != sys.argv[1])" "$$numpy" || { \
			echo "make setup: dask-jobqueue broke $(PYTHON)'s DIALS or changed numpy" >&2; exit 1; }; }
endef

# Idempotent: installs only what is missing.
setup:
	@$(PYTHON) -c "import dials, dxtbx, scipy" 2>/dev/null || { \
		echo "Installing DIALS from the distribution (apt-get install dials)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -q dials; }
	@{ $(PYTHON) -c "import setuptools, pytest, hypothesis" && $(PYTHON) -m pip --version; } >/dev/null 2>&1 || { \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
			python3-pytest python3-hypothesis python3-pip python3-setuptools; }
	$(install_chromium)
	$(install_dask_jobqueue_debian)
	$(call install_checkout,$(PYTHON),--break-system-packages)

# Idempotent: installs into the current-DIALS environment only what is missing.
setup-current:
	@if $(CURRENT_PRESENT); then \
		$(CURRENT_PYTHON) -c "import pytest, hypothesis, plotly, sklearn, dask_jobqueue" 2>/dev/null || { \
			echo "Installing $(CURRENT_EXTRAS) into $(CURRENT_DIALS)"; \
			$(CURRENT_PYTHON) -m pip install --quiet $(CURRENT_EXTRAS) || exit 1; }; \
		$(MAKE) --no-print-directory install-current-checkout; \
	else $(current_missing); fi

install-current-checkout:
	$(call install_checkout,$(CURRENT_PYTHON),)

# `make lint`: DIALS' formatter and linter settings (pyproject.toml) on the
# whole tree; ruff, pinned, in a tools virtualenv of its own (installed from
# PyPI if missing), so that no DIALS environment is touched.
RUFF_VERSION = 0.17.6
TOOLS_VENV ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/dials-truncfix/tools
RUFF = $(TOOLS_VENV)/bin/ruff
lint:
	@$(RUFF) --version 2>/dev/null | grep -qx "ruff $(RUFF_VERSION)" || { \
		echo "Installing ruff $(RUFF_VERSION) into $(TOOLS_VENV)"; \
		$(PYTHON) -m venv $(TOOLS_VENV) && $(TOOLS_VENV)/bin/pip install --quiet ruff==$(RUFF_VERSION); }
	$(RUFF) format --check .
	$(RUFF) check .

demo: setup
	$(PYTHON) -m devtools.demo demo

# The HTML report in headless Chromium (Debian's, installed if missing): its
# graphs drawn, no JavaScript error, a screenshot of the top of the page.
# The demo's report (made first if missing) unless REPORT=... names another.
REPORT ?= demo/dials.correct_truncation.html
report-screenshot:
	@test -f $(REPORT) || $(MAKE) demo
	$(install_chromium)
	$(PYTHON) -m devtools.browser $(REPORT) --screenshot $(REPORT:.html=.png)

test: setup
	$(PYTHON) -m pytest --junitxml=test-results.xml $(PYTEST_ARGS)

test-current:
	@if $(CURRENT_PRESENT); then \
		$(MAKE) --no-print-directory setup-current && \
		$(IN_CURRENT) $(CURRENT_PYTHON) -m pytest -p no:cacheprovider --junitxml=test-results-current.xml $(PYTEST_ARGS); \
	else $(current_missing); fi

# The release as a user installs it (devtools/release_check.py): the sdist and
# the wheel built from a clean copy of the checkout, the wheel installed (not
# editable) into a fresh environment of each lane and run from there. No
# `make setup` first: it installs nothing into the lanes' own environments.
# The current-DIALS lane is skipped with one line where there is no current
# DIALS environment (a CURRENT_DIALS given that is none is an error).
test-release:
	@if $(CURRENT_PRESENT); then \
		$(PYTHON) -m devtools.release_check --current-dials $(CURRENT_DIALS); \
	elif [ "$(origin CURRENT_DIALS)" = file ]; then \
		echo "make $@: current-DIALS lane skipped, no current DIALS environment at $(CURRENT_DIALS); to run it: CURRENT_DIALS=<prefix of a DIALS environment> make $@"; \
		$(PYTHON) -m devtools.release_check; \
	else \
		echo "make $@: CURRENT_DIALS=$(CURRENT_DIALS): $(CURRENT_PYTHON) cannot import dials and dxtbx" >&2; exit 2; \
	fi

test-fast: setup
	$(PYTHON) -m pytest -m "not slow" $(PYTEST_ARGS)

bench: setup
	$(PYTHON) benchmarks/run.py --json benchmarks/results/bench.json

# the three crystals (strong, weak, readnoise), both lanes (Debian's DIALS 3.12 and the
# current DIALS of CURRENT_DIALS, the Debian lane alone where there is none);
# about an hour on 2 cores
validate: setup setup-current
	@if $(CURRENT_PRESENT); then lanes=debian+current; else lanes=debian; fi; \
	$(PYTHON) -m devtools.validation lanes=$$lanes current_dials=$(CURRENT_DIALS) output=benchmarks/results/validation.md

clean:
	rm -rf build *.egg-info .pytest_cache .hypothesis demo benchmarks/work test-results*.xml
