# The two commands of the README: `make demo` and `make test`.
# DIALS comes from Debian's `dials` package for /usr/bin/python3 (the first
# python3 on PATH may be another interpreter that cannot import dials).
PYTHON ?= /usr/bin/python3
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast bench validate clean

# Idempotent: installs only what is missing.
setup:
	@$(PYTHON) -c "import dials, dxtbx, scipy" 2>/dev/null || { \
		echo "Installing DIALS from the distribution (apt-get install dials)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -q dials; }
	@{ $(PYTHON) -c "import setuptools, pytest, hypothesis" && $(PYTHON) -m pip --version; } >/dev/null 2>&1 || { \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
			python3-pytest python3-hypothesis python3-pip python3-setuptools; }
	@cd / && $(PYTHON) -c "import importlib.metadata as m, os, sys, dials_truncfix; \
		m.distribution('dials-truncfix'); \
		sys.exit(os.path.dirname(os.path.dirname(os.path.realpath(dials_truncfix.__file__))) != sys.argv[1])" \
		"$(realpath $(CURDIR))" 2>/dev/null || { \
		echo "Installing dials-truncfix (editable) from $(CURDIR) into $(PYTHON)"; \
		$(PYTHON) -m pip install --quiet --no-deps --no-build-isolation --break-system-packages -e $(CURDIR); }

demo: setup
	$(PYTHON) -m devtools.demo demo

test: setup
	$(PYTHON) -m pytest --junitxml=test-results.xml $(PYTEST_ARGS)

test-fast: setup
	$(PYTHON) -m pytest -m "not slow" $(PYTEST_ARGS)

bench: setup
	$(PYTHON) benchmarks/run.py --json benchmarks/results/bench.json

validate: setup
	$(PYTHON) -m devtools.validate --output benchmarks/results/validation.md

clean:
	rm -rf build *.egg-info .pytest_cache .hypothesis demo benchmarks/work test-results.xml
