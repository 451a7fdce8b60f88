# syntax=docker/dockerfile:1
# moat's image: the agent (`moat agent`) and the e2e workload (`moat serve …`, the lab's echo
# servers and the Star Wars deathstar API) are the same binary, so the kind suite pulls no
# third-party image. `make image` builds it as moat:dev.

# ---- build: stable for the host crates, nightly + rust-src + bpf-linker for the eBPF object,
# installed by the very script developers and CI use.
FROM rust:1.95-bookworm AS build
WORKDIR /src
RUN rustup toolchain install nightly --profile minimal
COPY scripts/toolchain.sh scripts/toolchain.sh
# An image build cannot mount bpffs and does not need it.
RUN MOAT_SKIP_BPFFS=1 scripts/toolchain.sh
COPY Cargo.toml Cargo.lock ./
COPY datapath datapath
COPY operator operator
COPY crd-gen crd-gen
COPY e2e e2e
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p moat --bin moat \
 && install -D -m 0755 target/release/moat /out/moat

# ---- runtime: the binary and the few tools the agent's init step and debugging use.
FROM debian:bookworm-slim
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      ca-certificates iproute2 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/moat /usr/local/bin/moat
ENTRYPOINT ["moat"]
