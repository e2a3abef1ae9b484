# Everything runs from its own virtual environment; nothing relies on what
# happens to be installed. Root is needed (ptrace of other users' processes,
# network namespaces, apt-get for the Debian packages the tests drive).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
# Debian packages the suite and the demo drive for real.
DEBS   := gcc libc6-dev strace curl iproute2 tmux redis-server redis-tools

.PHONY: demo test lint bench system-deps clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

system-deps:
	@missing=""; for p in $(DEBS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

lint: $(STAMP)
	$(VENV)/bin/ruff check hijack tests bench
	$(VENV)/bin/mypy

test: $(STAMP) system-deps lint
	$(VENV)/bin/pytest -q tests

demo: $(STAMP) system-deps
	$(PY) -m hijack.demo

bench: $(STAMP) system-deps
	$(PY) -m bench

clean:
	rm -rf $(VENV) build *.egg-info
