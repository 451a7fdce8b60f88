# moat — run as root (eBPF, network namespaces). One cargo profile (release) for build, tests
# and benchmarks, so nothing is compiled twice. Plain cargo commands act on the workspace's
# default members, which leave out the eBPF crate (built by aya-build for its own target).
CARGO ?= cargo
PROFILE := --release

.PHONY: all toolchain debs build fmt-check clippy test bench-datapath

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

test: toolchain debs fmt-check clippy
	$(CARGO) test $(PROFILE)

bench-datapath: toolchain
	$(CARGO) run $(PROFILE) -p moat-datapath --example bench-datapath
