# The two commands of the README: `make demo` and `make test`.
# DIALS comes from Debian's `dials` package for /usr/bin/python3 (the first
# python3 on PATH may be another interpreter that cannot import dials).
# `make test-current` is the second lane: current dxtbx and DIALS built from
# the source archives in ../shared/upstream into a cached virtualenv.
PYTHON ?= /usr/bin/python3
PYTEST_ARGS ?=
UPSTREAM ?= $(abspath $(CURDIR)/../shared/upstream)
CURRENT_VENV ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/dials-truncfix/current-dials
CURRENT_PYTHON = $(CURRENT_VENV)/bin/python
# what the current-DIALS lane needs beyond the build: plotly (report),
# scikit-learn (dials.scale, for the validation)
CURRENT_EXTRAS = plotly==7.1.0 scikit-learn==1.9.1
# runs a command in the current-DIALS environment (its programs first on PATH)
IN_CURRENT = . $(CURRENT_VENV)/bin/current-dials-env.sh &&

.PHONY: setup setup-current demo report-screenshot test test-current test-fast bench validate clean

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

# Idempotent: installs only what is missing.
setup:
	@$(PYTHON) -c "import dials, dxtbx, scipy" 2>/dev/null || { \
		echo "Installing DIALS from the distribution (apt-get install dials)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -q dials; }
	@{ $(PYTHON) -c "import setuptools, pytest, hypothesis" && $(PYTHON) -m pip --version; } >/dev/null 2>&1 || { \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
			python3-pytest python3-hypothesis python3-pip python3-setuptools; }
	$(install_chromium)
	$(call install_checkout,$(PYTHON),--break-system-packages)

# Idempotent: the build script reuses a finished build in seconds.
setup-current:
	@test -x $(UPSTREAM)/build-current-dials.sh || { \
		echo "make setup-current: no $(UPSTREAM)/build-current-dials.sh (set UPSTREAM=...)" >&2; exit 2; }
	@$(UPSTREAM)/build-current-dials.sh $(CURRENT_VENV) | grep -E "Done|Stamp|ERROR|\] \[[0-9]/8\]" || exit 1
	@$(CURRENT_PYTHON) -c "import plotly, sklearn" 2>/dev/null || { \
		echo "Installing $(CURRENT_EXTRAS) into $(CURRENT_VENV)"; \
		$(CURRENT_PYTHON) -m pip install --quiet $(CURRENT_EXTRAS); }
	$(call install_checkout,$(CURRENT_PYTHON),)

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

test-current: setup-current
	$(IN_CURRENT) python -m pytest -p no:cacheprovider --junitxml=test-results-current.xml $(PYTEST_ARGS)

test-fast: setup
	$(PYTHON) -m pytest -m "not slow" $(PYTEST_ARGS)

bench: setup
	$(PYTHON) benchmarks/run.py --json benchmarks/results/bench.json

# both crystals (strong, weak), both lanes (Debian's DIALS 3.12 and the
# current DIALS of setup-current); about an hour on 2 cores
validate: setup setup-current
	$(PYTHON) -m devtools.validation current_venv=$(CURRENT_VENV) output=benchmarks/results/validation.md

clean:
	rm -rf build *.egg-info .pytest_cache .hypothesis demo benchmarks/work test-results*.xml
