# make run   : install maild (its runtime dependencies only) into .venv and run it in the
#              foreground with ./policies.toml
# make test  : install everything the tests need (test extras, Debian packages), lint, run every test
# make unit  : the tests that need neither root nor Debian packages (no apt-get; a laptop will do)
# make lint  : ruff check, ruff format --check and mypy (config in pyproject.toml)
# make venv  : .venv with the test extras (pytest, hypothesis, ruff, ...), for development
# make bench : run the benchmarks (docs/BENCHMARKS.md)

PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(VENV)/bin/pip
DEB_PACKAGES = postfix swaks dovecot-imapd dovecot-pop3d dovecot-lmtpd systemd postgresql \
               chromium chromium-driver curl rspamd redis-server postfwd
# Test processes in parallel (pytest-xdist), one test module per worker at a time: most of
# the suite waits on real Postfix, Dovecot and PostgreSQL processes, not on the CPU.
TEST_WORKERS ?= 3

.PHONY: run test unit venv deps lint check clean bench

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# One stamp per install: `make run` after `make test` (or before it) still installs its own.
$(VENV)/.installed-run: pyproject.toml | $(PY)
	$(PIP) install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(PY)
	$(PIP) install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed-test

run: $(VENV)/.installed-run
	mkdir -p var
	$(VENV)/bin/maild check-config -c policies.toml
	@# As root (a container, a trial box), keep root: production runs as User=maild under systemd.
	$(VENV)/bin/maild serve -c policies.toml --log stderr $$([ "$$(id -u)" = 0 ] && echo --allow-root)

deps:
	@missing=""; for p in $(DEB_PACKAGES); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  if [ "$$(id -u)" != 0 ]; then echo "make test needs root to install:$$missing" >&2; exit 1; fi; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

LINT_PATHS = maild tests $(wildcard bench)

# Every step runs, so one report shows all three; the target fails if any did.
lint: venv
	@rc=0; \
	$(VENV)/bin/ruff check $(LINT_PATHS) || rc=1; \
	$(VENV)/bin/ruff format --check $(LINT_PATHS) || rc=1; \
	$(VENV)/bin/mypy || rc=1; \
	exit $$rc

# Tests marked integration (tests/conftest.py: real servers, root, Debian binaries, a package
# index) are left out; what remains runs on loopback in-process (tests/golden included).
unit: venv
	$(VENV)/bin/pytest -q -p no:cacheprovider -m "not integration" tests

test: venv deps lint
	$(VENV)/bin/pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadscope --durations=15

bench: venv deps
	$(PY) -m bench.run

clean:
	rm -rf $(VENV) var build *.egg-info
