# Everything runs from its own virtual environment; nothing relies on what
# happens to be installed. Root is needed (ptrace of other users' processes,
# network namespaces, apt-get for the Debian packages the tests drive).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
# Debian packages the suite and the demo drive for real.
DEBS   := gcc libc6-dev libssl-dev strace curl iproute2 tmux redis-server redis-tools gdb nginx tcpdump \
          postgresql-15 postgresql-client-15
# Another apt run (unattended-upgrades, a second make) holds apt's locks: wait
# up to APT_LOCK_WAIT seconds for each rather than fail at once. `install`
# waits by itself (DPkg::Lock::Timeout); `update` has no such option (apt 2.6)
# and is tried again while it fails for a lock.
APT_LOCK_WAIT ?= 600

.PHONY: demo test lint bench fuzz soak system-deps bytecode clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# The home shadow's native relay pump (hijack/shadow/pump.py); without it relays
# are spliced in Python, slower.
NATIVE := hijack/native/relay-pump hijack/native/shadow-holder
hijack/native/relay-pump: hijack/native/relay_pump.c $(STAMP) system-deps
	$(PY) -m hijack.shadow.pump
# The resting form of an idle shadow (hijack/shadow/holder.py); without it every
# shadow stays in Python (about 12 MiB PSS each).
hijack/native/shadow-holder: hijack/native/shadow_holder.c $(STAMP) system-deps
	$(PY) -m hijack.shadow.holder

# Every `hijack` command, shadow and daemon is a Python start: with no bytecode cached
# (the package is installed editable, and PYTHONDONTWRITEBYTECODE may be set, as on the
# CI machine) each compiled all of hijack's modules again: 0.9 s a start instead of 0.5.
# compileall writes the caches whatever that variable says; a changed source only makes
# its cache stale, and Python then compiles it as before.
bytecode: $(STAMP)
	$(PY) -m compileall -q -j 0 hijack bench tests

system-deps:
	@missing=""; for p in $(DEBS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  waited=0; \
	  until output=$$(apt-get update -qq 2>&1); do \
	    case "$$output" in *"Could not get lock"*) ;; *) echo "$$output" >&2; exit 1;; esac; \
	    [ $$waited -lt $(APT_LOCK_WAIT) ] || { echo "$$output" >&2; exit 1; }; \
	    sleep 1; waited=$$((waited + 1)); \
	  done; \
	  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=$(APT_LOCK_WAIT) \
	    install -y -qq $$missing >/dev/null; \
	fi

lint: $(STAMP)
	$(VENV)/bin/ruff check hijack tests bench
	$(VENV)/bin/mypy

test: $(STAMP) system-deps lint bytecode $(NATIVE)
	$(VENV)/bin/pytest -q --durations=20 tests

demo: $(STAMP) system-deps bytecode $(NATIVE)
	$(PY) -m hijack.demo

bench: $(STAMP) system-deps bytecode $(NATIVE)
	$(PY) -m bench

# Coverage-guided fuzzing (atheris) of the CRF reader and the node protocol:
# FUZZ_SECONDS per target; findings are saved as build/fuzz/TARGET-crash-*
# (tests/fuzz/run.py tells how to replay one).
FUZZ_SECONDS ?= 60
FUZZ_TARGETS := crf_reader node_handshake node_client node_certificate node_session
fuzz: $(STAMP)
	$(PY) -c 'import atheris' 2>/dev/null || $(PY) -m pip install --quiet atheris
	mkdir -p build/fuzz
	for target in $(FUZZ_TARGETS); do \
	  log=build/fuzz/$$target.log; echo "fuzzing $$target for $(FUZZ_SECONDS) s"; \
	  $(PY) tests/fuzz/run.py $$target -max_total_time=$(FUZZ_SECONDS) 2>$$log \
	    || { tail -30 $$log; exit 1; }; \
	  tail -1 $$log; \
	done

# The full soak (the suite runs a short one): 50 moves between three nodes under load.
soak: $(STAMP) system-deps $(NATIVE)
	SOAK_MOVES=50 $(VENV)/bin/pytest -q -s tests/test_soak.py

clean:
	rm -rf $(VENV) build *.egg-info
