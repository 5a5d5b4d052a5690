# OWCA: `make run` installs and runs the pipeline on this machine's cgroups;
# `make test` installs and runs every test.  Both start from a fresh machine.
PYTHON   ?= python3
VENV     ?= .venv
PY       := $(VENV)/bin/python
PIP      := $(VENV)/bin/pip
CC       ?= cc
CFLAGS   ?= -O2 -Wall -Wextra -Werror -std=gnu11
PYTEST_ARGS ?=

.PHONY: run test deps venv helper docs check-docs bench clean

run: venv helper
	$(VENV)/bin/owca-discover --interval 2 | $(VENV)/bin/owca-measure \
	  | $(VENV)/bin/owca-detect | $(VENV)/bin/owca-allocate | $(VENV)/bin/owca-ship

test: deps venv helper
	$(PIP) install -q -r requirements/test.txt
	npm install --silent --no-audit --no-fund --prefix $(VENV)/npm \
	  $$(grep -v '^\s*#' requirements/npm.txt | grep -v '^\s*$$')
	$(PY) -m pytest $(PYTEST_ARGS) tests

# The unit tests only (pytest.ini's `unit` marker): under a minute, no root, no
# processes, none of the packages the other tests need beyond requirements/unit.txt.
.PHONY: test-quick
test-quick: $(VENV)/.unit-installed
	$(PY) -m pytest -m unit $(PYTEST_ARGS) tests

$(VENV)/.unit-installed: requirements/unit.txt $(VENV)/.installed
	$(PIP) install -q -r requirements/unit.txt
	touch $@

# Debian packages the tests use; only the missing ones are installed.
deps:
	@missing=$$(grep -v '^\s*#' requirements/apt.txt | grep -v '^\s*$$' | while read p; do \
	  dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing: $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
	@# npm: Debian's package, unless a nodejs that bundles it (and conflicts with it) is there
	@command -v npm >/dev/null || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm; }

# Reinstalled when the helper changes too: pip compiles the copy in $(VENV)/bin.
$(VENV)/.installed: setup.py lib/owca/__init__.py $(wildcard bin/owca-perf.c)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e .
	touch $@

venv: $(VENV)/.installed

# The C perf helper, for runs from the source tree (pip builds its own copy).
helper:
	@if [ -f bin/owca-perf.c ]; then mkdir -p build && $(CC) $(CFLAGS) -o build/owca-perf bin/owca-perf.c; fi

# ruff and mypy (pyproject.toml) on the package and the tools in bin/; both run, so
# that one run shows every finding, and the target fails if either found one.
LINT_PATHS := lib/owca $(filter-out %.c,$(wildcard bin/owca-*))

.PHONY: lint
lint: venv
	$(PIP) install -q -r requirements/lint.txt
	status=0; \
	$(VENV)/bin/ruff check $(LINT_PATHS) || status=1; \
	$(VENV)/bin/mypy $(LINT_PATHS) || status=1; \
	exit $$status

docs: venv
	$(PY) -m owca.docs > docs/metrics.md

# Root, several minutes; FLOOR=BINARY adds a floor program beside owca-measure
# (benchmarks/README.md).
bench: venv helper
	$(PY) benchmarks/measure_cycle.py --tasks 10,100,1000 --perf-stat --lean \
	  $(if $(FLOOR),--floor $(FLOOR))
	$(PY) benchmarks/pipeline_throughput.py --tasks 100 --cycles 3000 --live-seconds 8
	$(PY) benchmarks/ship_spool.py --tasks 200 --cycles 4000 --spool-cycles 500
	$(PY) benchmarks/allocate_crash_restore.py --trials 10
	$(PY) benchmarks/discover_stop.py --runs 10
	$(PY) benchmarks/prometheus_scrape.py --tasks 200 --scrapes 1000 --parallel 50
	$(PY) benchmarks/ship_faults.py outage --runs 3
	$(PY) benchmarks/ship_faults.py full-disk --cycles 900 --reserve 262144
	$(PY) benchmarks/forward_check.py --tasks 100

clean:
	rm -rf build dist $(VENV) lib/*.egg-info
