# moat — run as root (eBPF, network namespaces). One cargo profile (release) for build, tests
# and benchmarks, so nothing is compiled twice.
CARGO ?= cargo
PROFILE := --release

.PHONY: all toolchain debs build fmt-check clippy test test-datapath bench-datapath

all: build

toolchain:
	@scripts/toolchain.sh

debs:
	@scripts/debs.sh

build: toolchain
	$(CARGO) build $(PROFILE) --workspace

fmt-check:
	$(CARGO) fmt --all --check

# Host crates on stable; the eBPF crate on nightly for its own target (stable clippy on the
# workspace would try to build it for the host and fail).
clippy: toolchain
	$(CARGO) clippy $(PROFILE) --workspace --exclude moat-ebpf --all-targets -- -D warnings
	cd datapath/ebpf && $(CARGO) +nightly clippy --release --target bpfel-unknown-none \
		-Z build-std=core -- -D warnings

test: toolchain debs fmt-check clippy
	$(CARGO) test $(PROFILE) --workspace

bench-datapath: toolchain
	$(CARGO) run $(PROFILE) -p moat-datapath --example bench-datapath
