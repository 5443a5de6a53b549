# mkc — build, test and install.
#
#   make build       release binary: target/release/mkc
#   make demo        build and run `mkc demo` (no Kafka or database needed)
#   make test        install packages and (once) the test broker, start it and
#                    MariaDB and Redis when they do not answer, run every test;
#                    stops the broker afterwards if it started it (KEEP_BROKER=1: not)
#   make install     PREFIX=/usr/local/mkc DESTDIR= : binary (debug info stripped
#                    into $(BIN).debug), conf, logs, run, systemd unit
#   make deb         release build, then target/deb/mkc_VERSION_ARCH.deb and
#                    mkc-dbgsym_VERSION_ARCH.deb (scripts/deb.sh)
#   make man         target/man/mkc.1 from the clap definitions (`mkc man`)
#                    (make install also puts the man page and shell completions under $(PREFIX)/share)
#   make fmt         cargo fmt
#   make clippy      cargo clippy --all-targets -- -D warnings
#   make kafka-start / kafka-stop   the test broker (scripts/kafka.sh)
#   make fuzz        every cargo-fuzz target of fuzz/ for FUZZ_SECONDS (30) each
#                    (scripts/fuzz.sh; stable Rust with RUSTC_BOOTSTRAP=1; not in `make test`)
#   make bench       throughput benchmark (docs/bench.md); BENCH_ARGS=--quick for a smoke run
#   make bench-instructions   mkc's instructions per delivered message (valgrind),
#                    every Kafka mkc row at 0 ms (ordered 1w and 6w, keyed, unordered,
#                    unordered with a script, with batch 100), with msgs/s and CPU of a short run
#                    (BEFORE=path/to/old/mkc: that binary's rows beside them)
#   make clean       cargo clean and stop the broker

CARGO   ?= cargo
PREFIX  ?= /usr/local/mkc
DESTDIR ?=
INSTALL ?= install
# The binary `make install` installs (tests point it at their debug build).
BIN     ?= target/release/mkc
# Where `make install` keeps the debug information it strips from $(BIN).
DEBUG_FILE ?= $(BIN).debug
# Two test binaries at a time: every end-to-end test runs a broker client,
# an HTTP sink and mkc's master and workers, on a 2-core machine.
TEST_THREADS ?= 2

SYSTEMD_UNIT := systemd/mkc.service
UNIT_DIR     := $(DESTDIR)/lib/systemd/system

MAN_DIR  := $(DESTDIR)$(PREFIX)/share/man/man1
BASH_DIR := $(DESTDIR)$(PREFIX)/share/bash-completion/completions
ZSH_DIR  := $(DESTDIR)$(PREFIX)/share/zsh/site-functions
FISH_DIR := $(DESTDIR)$(PREFIX)/share/fish/vendor_completions.d

.PHONY: man all build demo setup setup-test setup-bench test bench bench-instructions fuzz install deb fmt clippy kafka-install kafka-start kafka-stop services clean

all: build

build:
	$(CARGO) build --release

# Debian packages (skipped when present): to build, and to run the tests.
setup:
	scripts/setup.sh build

setup-test:
	scripts/setup.sh test

setup-bench:
	scripts/setup.sh bench

# `mkc demo`: an embedded broker, a printing receiver and the real mkc.
demo: setup
	$(CARGO) run --quiet -- demo --exit-after-delivery

# The tests find the broker through MKC_TEST_BROKERS; it follows
# MKC_KAFKA_PORT, the port scripts/kafka.sh starts the broker on. A broker
# this run started is stopped when the tests end (also when they fail or
# are interrupted); one that was running already is left running, and so
# is every broker with KEEP_BROKER=1 (repeated runs skip its start).
KEEP_BROKER ?=
test: setup-test kafka-install services
	@started=; \
	if ! scripts/kafka.sh status >/dev/null 2>&1; then \
		scripts/kafka.sh start || exit 1; \
		[ -n "$(KEEP_BROKER)" ] || started=1; \
	fi; \
	trap '[ -z "$$started" ] || scripts/kafka.sh stop' EXIT; \
	trap 'exit 130' INT TERM; \
	MKC_TEST_BROKERS="$${MKC_TEST_BROKERS:-127.0.0.1:$${MKC_KAFKA_PORT:-9092}}" \
	$(CARGO) test --lib --bins --tests -- --test-threads=$(TEST_THREADS)

# Not part of `make test` or CI: a program that prints figures, about half
# an hour (benches/mkc_bench/main.rs says what it measures). It builds mkc
# in release, starts its own broker (memory engine) and sink on free ports,
# and writes target/bench/results.json.
BENCH_ARGS ?=
bench: kafka-install
	$(CARGO) bench --bench mkc_bench -- $(BENCH_ARGS)

# Instructions per delivered message of mkc (master and workers), counted
# by valgrind: a figure that does not move with the machine's load, so
# that a change can be judged in one run on a busy machine. The ordered
# 1-worker, keyed and unordered rows (with and without a script) at the
# 0 ms sink each run natively (60,000 messages: msgs/s, CPU) and twice
# under valgrind (20,000 and 40,000 messages: the slope); about 5
# minutes. BEFORE=path/to/mkc (absolute or relative) adds that binary's
# rows, each measured right after this tree's (e.g. one built from an
# older commit in another worktree).
BEFORE ?=
bench-instructions: setup-bench kafka-install
	$(CARGO) bench --bench mkc_bench -- --instructions --latencies 0 --runs 1 \
		--messages 60000 --only ordered,keyed,unordered \
		$(if $(BEFORE),--mkc-before $(BEFORE)) $(BENCH_ARGS)

kafka-install:
	scripts/kafka.sh install

# MariaDB and Redis on 127.0.0.1 (started when they do not answer).
services:
	scripts/services.sh start

kafka-start: kafka-install
	scripts/kafka.sh start

kafka-stop:
	scripts/kafka.sh stop

# install builds only when there is no release binary yet, so that
# `make build && sudo make install` needs no cargo for root. An operator's
# server.conf is never overwritten: the shipped one lands beside it as
# server.conf.default. The installed binary keeps its symbol table (function
# names in panics and perf) but not its debug information: that goes to
# $(DEBUG_FILE), which the binary names (.gnu_debuglink) so that gdb and
# RUST_BACKTRACE find it once it is copied beside the binary (README, Install).
install: $(BIN)
	$(INSTALL) -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/conf \
		$(DESTDIR)$(PREFIX)/logs $(DESTDIR)$(PREFIX)/run
	objcopy --only-keep-debug $(BIN) $(DEBUG_FILE)
	objcopy --strip-debug --add-gnu-debuglink=$(DEBUG_FILE) $(BIN) $(DESTDIR)$(PREFIX)/bin/mkc
	chmod 0755 $(DESTDIR)$(PREFIX)/bin/mkc
	@if [ -e $(DESTDIR)$(PREFIX)/conf/server.conf ]; then \
		echo "keeping existing $(DESTDIR)$(PREFIX)/conf/server.conf (new one: server.conf.default)"; \
		$(INSTALL) -m 0644 conf/server.conf $(DESTDIR)$(PREFIX)/conf/server.conf.default; \
	else \
		$(INSTALL) -m 0644 conf/server.conf $(DESTDIR)$(PREFIX)/conf/server.conf; \
	fi
	$(INSTALL) -m 0644 conf/module-example.conf $(DESTDIR)$(PREFIX)/conf/module-example.conf
	$(INSTALL) -m 0644 conf/module-example.lua $(DESTDIR)$(PREFIX)/conf/module-example.lua
	$(INSTALL) -m 0644 conf/route.lua $(DESTDIR)$(PREFIX)/conf/route.lua
	@if [ -f $(SYSTEMD_UNIT) ]; then \
		echo "$(INSTALL) -D -m 0644 $(SYSTEMD_UNIT) $(UNIT_DIR)/mkc.service"; \
		$(INSTALL) -D -m 0644 $(SYSTEMD_UNIT) $(UNIT_DIR)/mkc.service; \
	fi
	$(INSTALL) -D -m 0644 systemd/mkc.logrotate $(DESTDIR)/etc/logrotate.d/mkc
	$(INSTALL) -d $(MAN_DIR) $(BASH_DIR) $(ZSH_DIR) $(FISH_DIR)
	$(BIN) man > $(MAN_DIR)/mkc.1
	$(BIN) completions bash > $(BASH_DIR)/mkc
	$(BIN) completions zsh > $(ZSH_DIR)/_mkc
	$(BIN) completions fish > $(FISH_DIR)/mkc.fish

# The man page, generated from the clap definitions of the built binary.
man: $(BIN)
	mkdir -p target/man
	$(BIN) man > target/man/mkc.1

target/release/mkc:
	$(CARGO) build --release

# Always from a fresh release build (a package must not carry a stale
# binary). DEB_MAINTAINER="Name <mail>" sets the Maintainer field.
deb: build
	scripts/deb.sh --bin target/release/mkc --out target/deb

fmt:
	$(CARGO) fmt

clippy:
	$(CARGO) clippy --all-targets -- -D warnings

# Not part of `make test`: the fuzz crate (fuzz/) is outside the workspace.
fuzz:
	scripts/fuzz.sh

clean:
	-scripts/kafka.sh stop
	$(CARGO) clean
