# Meridian. `make test` and `make demo` install what they need on a fresh machine.
SHELL := /bin/bash
CARGO ?= cargo
FUZZ_SECONDS ?= 60
BENCH_ARGS ?=

.PHONY: all build test demo bench fuzz lint clean install

all: build

build:
	$(CARGO) build --workspace --release

## Run the whole test suite (real files, O_DIRECT, fdatasync, SIGKILLed child processes).
test:
	scripts/install-deps.sh test
	$(CARGO) nextest run --workspace --no-fail-fast --profile ci

## What exists so far: one real data node (durable puts) under 1..256 clients next to
## redis-server (appendfsync always), a 3-node control plane next to a 3-member etcd, then three
## regions replicating over QUIC through the WAN proxy (RPO, lost writes, QUIC vs iperf3).
## (The orchestrated multi-region report arrives with the orchestrator issue.)
demo:
	scripts/install-deps.sh bench
	$(CARGO) build --release -p dataplane -p controlplane -p bench
	./target/release/bench kv --duration-ms 2000 --warmup-ms 500
	./target/release/bench control --duration-ms 2000 --warmup-ms 500
	./target/release/bench geo --duration-ms 20000 --catch-up-mib 64

## Full benchmarks; JSON with BENCH_ARGS=--json. See bench/README.md.
bench:
	scripts/install-deps.sh bench
	$(CARGO) build --release -p dataplane -p controlplane -p bench
	./target/release/bench wal $(BENCH_ARGS)
	./target/release/bench kv $(BENCH_ARGS)
	./target/release/bench control $(BENCH_ARGS)
	./target/release/bench geo $(BENCH_ARGS)

## Fuzz every decoder for FUZZ_SECONDS each (nightly + cargo-fuzz).
fuzz:
	scripts/install-deps.sh fuzz
	cd fuzz && for target in $$($(CARGO) +nightly fuzz list); do \
	  $(CARGO) +nightly fuzz run $$target -- -max_total_time=$(FUZZ_SECONDS) || exit 1; \
	done

## Install binaries, systemd units, example configs and the meridian user (as root).
## Stage into a directory instead with DESTDIR=/some/dir.
DESTDIR ?=
PREFIX ?= /usr/local
install: build
	scripts/install.sh --prefix $(PREFIX) $(if $(DESTDIR),--destdir $(DESTDIR))

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

clean:
	$(CARGO) clean
	rm -rf bench-data
