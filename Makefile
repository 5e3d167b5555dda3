# nid: the two commands a newcomer needs are `make run` and `make test`.
#
# Every target uses ONE cargo profile (`dev`, tuned release-grade in Cargo.toml) and ONE target
# directory outside the clone, so RocksDB's C++ (about 25 minutes on 2 cores) compiles once per
# machine and every clone, CI run and benchmark reuses it.

SHELL := /bin/bash
export CARGO_TARGET_DIR ?= $(HOME)/.cache/nid/target
CARGO ?= cargo
DEV_DIR ?= $(CURDIR)/.nid/dev

# Debian packages the build and tests need: bindgen (RocksDB) needs libclang; our protos and
# raft-proto need protoc 3.x; the load-test harness's comparison peer is etcd 3.4 (etcd-server,
# with etcdctl from etcd-client).
DEBIAN_PACKAGES := clang libclang-dev protobuf-compiler etcd-server etcd-client

.PHONY: all deps build test rebalance-test bench-rebalance run fmt lint ci clean-dev help bench bench-cell bench-router bench-scale install \
	deploy-check compose-test images compose-up compose-down

all: build

help:
	@echo "make run    build and start a local development cluster"
	@echo "make test   build and run the test suite (what CI runs)"
	@echo "make lint   rustfmt --check and clippy -D warnings"
	@echo "make ci     lint + test, as .ci/run does"
	@echo "make rebalance-test  cell addition and drain under load, leaders killed mid-move, a lost destination"
	@echo "make bench  the benchmark suite (ceiling, enrol, auth, etcd, scale-out) -> BENCHMARKS.md"
	@echo "make bench-rebalance  a fifth cell joins four holding 200,000 identities under load"
	@echo "make bench-cell  write throughput/latency of one 3-replica cell"
	@echo "make bench-router  latency and CPU the router adds to a read"
	@echo "make bench-scale  one cell filled to 1,000,000 identities: disk, RSS, auth, restart and wiped-replica catch-up"
	@echo "make install  put nidctl, nid-cell, nid-router, nid-loadtest in PREFIX/bin (default /usr/local as root, ~/.local otherwise)"
	@echo "make deploy-check  every offline check of deploy/ (lint, promtool, kustomize, structure)"
	@echo "make compose-test  end-to-end test of the compose cluster (needs root, docker.io)"
	@echo "make images        build the container images from the built binaries (BIN_DIR=...)"
	@echo "make compose-up    start the compose cluster; make compose-down stops it"

deps:
	@missing=""; \
	command -v protoc >/dev/null 2>&1 || missing="$$missing protobuf-compiler"; \
	command -v clang >/dev/null 2>&1 || missing="$$missing clang"; \
	command -v etcd >/dev/null 2>&1 || missing="$$missing etcd-server"; \
	command -v etcdctl >/dev/null 2>&1 || missing="$$missing etcd-client"; \
	ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1 || ls /usr/lib/*/libclang*.so* >/dev/null 2>&1 || missing="$$missing libclang-dev"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing build dependencies:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(DEBIAN_PACKAGES) >/dev/null; \
	  else \
	    echo "missing build dependencies:$$missing"; \
	    echo "install them with: sudo apt-get install -y $(DEBIAN_PACKAGES)"; \
	    exit 1; \
	  fi; \
	fi

build: deps
	$(CARGO) build --workspace --locked

# Cross-process tests start the workspace's binaries, so build them first.
test: deps
	$(CARGO) build --workspace --locked
	$(CARGO) test --workspace --locked

# Online cell addition end to end, with the fault-injection cases (leaders SIGKILLed mid-move, a
# destination lost before commit): a few minutes.
rebalance-test: deps
	$(CARGO) build --workspace --locked
	$(CARGO) test -p nid-tests --locked --test rebalance -- $(or $(REBALANCE_ARGS),--include-ignored)

lint: deps
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

ci: lint test

# The standard suite: no-op ceiling, enrolment, authentication (plaintext and mutual TLS),
# overload at 3x a capped cell's maximum and a noisy partner, etcd 3.4 (3 members) with the same
# harness, scale-out over 1/2/4/8 cells under equal cgroup CPU quotas (needs root), and a cell
# joining four under load. Starts and
# stops everything itself; prints one table and writes it to BENCHMARKS.md (hand-written text below
# its generated part is kept). Reports and SVG plots go to .nid/bench. ARGS="--seconds 5"
bench: deps
	$(CARGO) build --workspace --locked
	"$(CARGO_TARGET_DIR)/debug/bench-suite" --out $(CURDIR)/BENCHMARKS.md --results $(CURDIR)/.nid/bench $(ARGS)

# Write throughput and p50/p99 of one 3-replica cell at several concurrencies, beside the disk's
# fdatasync latency. Prints figures; not a test. ARGS="--seconds 5 --concurrency 1,64"
# Section 6 of make bench alone: 4 cells holding 200,000 identities gain a fifth under half-maximum
# authentication and enrolment. ARGS="--cells 4 --identities 200000"
bench-rebalance: deps
	$(CARGO) build --workspace --locked
	"$(CARGO_TARGET_DIR)/debug/bench-rebalance" --results $(CURDIR)/.nid/bench $(ARGS)

bench-cell: deps
	$(CARGO) build --workspace --locked
	"$(CARGO_TARGET_DIR)/debug/bench-cell" $(ARGS)

# What the router adds: the same read through the router and straight to the cell leader, p50/p99
# and the router's CPU per request. Prints figures; not a test. ARGS="--seconds 5"
bench-router: deps
	$(CARGO) build --workspace --locked
	"$(CARGO_TARGET_DIR)/debug/bench-router" $(ARGS)

# One cell at 10,000 then 1,000,000 identities (about 10 minutes here): bytes on disk, RSS, auth
# throughput and p99, enrolment over the fill, restart-to-serving, wiped-replica catch-up.
# Writes .nid/bench/scale/scale.md. ARGS="--identities 200000" for a shorter run.
bench-scale: deps
	$(CARGO) build --workspace --locked
	"$(CARGO_TARGET_DIR)/debug/bench-scale" --results $(CURDIR)/.nid/bench/scale $(ARGS)

# A local cluster: a control cell, 2 data cells of 3 replicas (zone-a/b/c) and a router, as real
# processes on 127.0.0.1. Ctrl-C stops it; `make run` again resumes the same data.
run: build
	"$(CARGO_TARGET_DIR)/debug/nidctl" dev up --cells 2 --data-dir $(DEV_DIR)

# Puts the binaries where people look for them. PREFIX defaults to /usr/local as root and ~/.local
# otherwise; shell completions: `nidctl completion bash|zsh|fish`.
PREFIX ?= $(if $(filter 0,$(shell id -u)),/usr/local,$(HOME)/.local)
install: build
	install -d "$(DESTDIR)$(PREFIX)/bin"
	install -m 0755 "$(CARGO_TARGET_DIR)/debug/nidctl" "$(CARGO_TARGET_DIR)/debug/nid-cell" \
	  "$(CARGO_TARGET_DIR)/debug/nid-router" "$(CARGO_TARGET_DIR)/debug/nid-loadtest" "$(DESTDIR)$(PREFIX)/bin/"
	@echo "installed nidctl nid-cell nid-router nid-loadtest in $(DESTDIR)$(PREFIX)/bin"
	@case ":$$PATH:" in *":$(PREFIX)/bin:"*) ;; *) echo "note: $(PREFIX)/bin is not on your PATH";; esac

clean-dev:
	rm -rf $(DEV_DIR)

# ---- deploy/ (images, compose, Kubernetes, monitoring); none of these builds Rust ----
BIN_DIR ?= $(CARGO_TARGET_DIR)/debug
COMPOSE := docker-compose -f deploy/compose/docker-compose.yml -p nid

# Every offline check of deploy/ in seconds: shellcheck, hadolint, yamllint, compose config,
# promtool, kustomize + kubernetes-validate + structure test, dashboard freshness. Installs its
# tools when missing (Debian packages as root, a venv under ~/.cache/nid/venv).
deploy-check:
	bash deploy/scripts/deploy-check.sh

# The compose cluster end to end with the built binaries (root; starts dockerd when needed).
compose-test:
	bash deploy/compose/test.sh $(BIN_DIR)

images:
	bash deploy/scripts/ensure-tools.sh --docker >/dev/null
	bash deploy/scripts/dockerd.sh start >/dev/null
	bash deploy/images/build.sh $(BIN_DIR)

compose-up: images
	NIDCTL=$(BIN_DIR)/nidctl bash deploy/compose/gen-secrets.sh
	$(COMPOSE) up -d
	@echo "router: $$($(COMPOSE) port router 7000)  prometheus: $$($(COMPOSE) port prometheus 9090)"

compose-down:
	$(COMPOSE) down
