# moat — run as root (eBPF, network namespaces). One cargo profile (release) for build, tests
# and benchmarks, so nothing is compiled twice. Plain cargo commands act on the workspace's
# default members, which leave out the eBPF crate (built by aya-build for its own target).
CARGO ?= cargo
PROFILE := --release
MOAT := $(or $(CARGO_TARGET_DIR),target)/release/moat
SCENARIOS := e2e/scenarios/*.yaml e2e/scenarios/moat/*.yaml

.PHONY: all toolchain debs build fmt-check clippy manifests conformance fuzz fuzz-smoke test \
	demo image e2e-kind bench-datapath bench-agent bench-compiler

all: build

toolchain:
	@scripts/toolchain.sh

debs:
	@scripts/debs.sh

build: toolchain
	$(CARGO) build $(PROFILE)

fmt-check:
	$(CARGO) fmt --all --check

# Host crates on stable; the eBPF crate on nightly for its own target (stable clippy on the
# workspace would try to build it for the host and fail).
clippy: toolchain
	$(CARGO) clippy $(PROFILE) --workspace --exclude moat-ebpf --all-targets -- -D warnings
	cd datapath/ebpf && $(CARGO) +nightly clippy --release --target bpfel-unknown-none \
		-Z build-std=core -- -D warnings

# Static checks of what cannot run here: manifests, CRs against the CRD schemas, scripts,
# the Dockerfile's sources.
manifests:
	scripts/check-manifests.sh

# Every scenario of e2e/scenarios through real agents and real packets (one lab per topology).
conformance: build
	$(MOAT) lab suite $(SCENARIOS)

fuzz:
	scripts/fuzz.sh 600

fuzz-smoke:
	scripts/fuzz.sh 20

# `cargo test` also builds the moat binary (the integration tests run it), so the
# conformance suite uses that one instead of building it again with other features.
test: toolchain debs fmt-check clippy manifests
	$(CARGO) test $(PROFILE)
	$(MOAT) lab suite $(SCENARIOS)
	scripts/fuzz.sh 20

# The main job: the Star Wars demo in a lab on this machine.
demo: build
	$(MOAT) lab demo

image:
	docker build -t moat:dev .

e2e-kind:
	scripts/e2e-kind.sh

bench-datapath: toolchain
	$(CARGO) run $(PROFILE) -p moat-datapath --example bench-datapath

# Needs the agent binary next to the example: build first.
bench-agent: build
	$(CARGO) run $(PROFILE) -p moat --example bench-agent

# The pure compiler on 10,000 pods and 1,000 policies: full compile and one-change recompiles.
bench-compiler: toolchain
	$(CARGO) run $(PROFILE) -p moat --example bench-compiler

# Root, ~30 min: iperf3/wrk/nginx through a lab node with no filter, moat, iptables and
# nftables (interleaved runs; MOAT_BENCH_RUNS, _SECONDS, _CONFIGS shorten it).
.PHONY: bench-throughput
bench-throughput: toolchain debs
	$(CARGO) run $(PROFILE) -p moat-datapath --example bench-throughput

# Root, ~6 min: HTTP through a lab node with wrk and a paced client, direct vs moat's L7 proxy
# vs nginx as reverse proxy (configs in bench/l7/). Needs the agent binary (build first),
# wrk and nginx (debs).
.PHONY: bench-l7
bench-l7: debs build
	$(CARGO) run $(PROFILE) -p moat --example bench-l7
