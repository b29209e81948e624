# make run   : install maild (its runtime dependencies only) into .venv and run it in the
#              foreground with ./policies.toml
# make test  : install everything the tests need (test extras, Debian packages) and run every test
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

.PHONY: run test venv deps lint check clean bench

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

lint: venv
	$(VENV)/bin/ruff check maild tests $(wildcard bench)

test: venv deps lint
	$(VENV)/bin/pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadscope --durations=15

bench: venv deps
	$(PY) -m bench.run

clean:
	rm -rf $(VENV) var build *.egg-info
