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
## As root (CI runs as root) the tests that need root run too (the full-disk test loop-mounts a
## small ext4); elsewhere the summary lists them as skipped. The etcd peer's test stays out.
ROOT_TESTS = $(if $(filter 0,$(shell id -u)),--run-ignored all -E 'not (package(bench) & test(cluster_takes_puts))')
test:
	scripts/install-deps.sh test
	$(CARGO) nextest run --workspace --no-fail-fast --profile ci $(ROOT_TESTS)

## The main job: a 3-node control plane and three regions (20 ms one way through the WAN proxy)
## on this machine, an open-loop write load with live progress, and a report folder (report.json,
## report.md, SVG/PNG plots, logs) whose path is the last line. Options: DEMO_ARGS, e.g.
## DEMO_ARGS="--partition c@30s+10s --kill-node b@45s" (see ./target/release/bench cluster --help).
DEMO_ARGS ?=
demo:
	scripts/install-deps.sh bench
	$(CARGO) build --release -p dataplane -p controlplane -p bench
	./target/release/bench cluster $(DEMO_ARGS)

## Full benchmarks; JSON with BENCH_ARGS=--json. See bench/README.md.
bench:
	scripts/install-deps.sh bench
	$(CARGO) build --release -p dataplane -p controlplane -p bench
	./target/release/bench wal $(BENCH_ARGS)
	./target/release/bench engine $(BENCH_ARGS)
	./target/release/bench store $(BENCH_ARGS)
	./target/release/bench kv $(BENCH_ARGS)
	./target/release/bench control $(BENCH_ARGS)
	./target/release/bench geo $(BENCH_ARGS)
	./target/release/bench cluster $(BENCH_ARGS)
	./target/release/bench snapshot $(BENCH_ARGS)
	./target/release/bench replicas $(BENCH_ARGS)

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
