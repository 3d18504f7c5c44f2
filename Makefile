# make demo       the portal protecting a sample database on http://127.0.0.1:8000 (Ctrl-C stops it)
# make test       the whole test suite
# make demo-stop  stop a demo left running in the background
# make lint       ruff, as before every commit
# make bench       the full benchmark (~1 GB dataset; see bench/RESULTS.md), make bench-quick under 15 min
#
# PYTHON picks the interpreter for the venv (3.11 or newer); PORT the demo's web port.

# The system's Python when it is new enough: the tests run the venv's interpreter as unprivileged
# users, who cannot reach one under root's home directory (pyenv); else python3 from PATH.
PYTHON ?= $(shell for p in /usr/bin/python3 python3; do $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null && { echo $$p; break; }; done)
VENV ?= .venv
PORT ?= 8000
PYTEST_ARGS ?= -q
# The suite waits on PostgreSQL, gpg and subprocesses: two workers more than the cores (at most
# 4) keep CI's two cores busy while workers wait (on a 2-core AMD EPYC machine, 2026-12-07: three
# workers 35.4 min, four 32.5 min). A file's tests stay on one worker (module fixtures).
# PARALLEL= runs it in one process.
WORKERS ?= $(shell $(PYTHON) -c 'import os; print(min(4, (os.cpu_count() or 1) + 2))')
PARALLEL ?= --numprocesses=$(WORKERS) --dist=loadfile
# A copy of the requirements the venv was built from: a changed requirements.txt reinstalls.
STAMP := $(VENV)/.requirements.txt

.PHONY: system venv demo demo-stop test lint bench bench-quick

# The Debian packages (scripts/system-packages installs what is missing, as root).
system:
	@scripts/system-packages

venv: $(STAMP)

$(STAMP): requirements.txt
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || { \
	  echo "make: backupportal needs Python 3.11 or newer as '$(PYTHON)': install it, or make PYTHON=python3.11 ..." >&2; exit 1; }
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); \
	  echo "make: could not create $(VENV): on Debian, apt-get install python3-venv" >&2; exit 1; }
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
	@cp requirements.txt $@

demo: system venv
	$(VENV)/bin/python scripts/demo.py --port $(PORT)

demo-stop:
	@if [ -x $(VENV)/bin/python ]; then $(VENV)/bin/python scripts/demo.py --stop; else echo "demo: nothing was running"; fi

# pytest exits 5 when it collected no test: that is a failure here, never a silent pass.
test: system venv
	@$(VENV)/bin/python -m pytest $(PARALLEL) $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; fi; exit $$rc

lint: venv
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

# Both write bench/RESULTS.md; BENCH_ARGS adds options (python bench/run.py --help).
bench: venv
	$(VENV)/bin/python bench/run.py $(BENCH_ARGS)

bench-quick: venv
	$(VENV)/bin/python bench/run.py --quick $(BENCH_ARGS)
