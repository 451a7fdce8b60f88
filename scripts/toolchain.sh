#!/usr/bin/env bash
# Installs what building moat's eBPF programs needs, idempotently and fast when already done:
# nightly's rust-src (build-std) and bpf-linker built against the very libLLVM that nightly
# rustc uses (../shared/notes/toolchain.md). A bpf-linker that no longer starts (a different
# nightly ships a different libLLVM) is rebuilt.
set -euo pipefail

BPF_LINKER_VERSION=0.13.0
LLVM_PREFIX=/opt/rust-llvm

if ! rustup component list --toolchain nightly --installed 2>/dev/null | grep -q '^rust-src'; then
  echo "toolchain: adding rust-src to nightly"
  rustup component add rust-src --toolchain nightly
fi

sysroot=$(rustup run nightly rustc --print sysroot)
major=$(rustup run nightly rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
# shellcheck disable=SC2012 # one well-known file name, no globbing surprises
soname=$(cd "$sysroot/lib" && ls libLLVM.so.* | head -n1)
mkdir -p "$LLVM_PREFIX/lib"
# The soname link is needed at run time (DT_NEEDED), the plain one at link time (-lLLVM).
ln -sf "$sysroot/lib/$soname" "$LLVM_PREFIX/lib/$soname"
ln -sf "$sysroot/lib/$soname" "$LLVM_PREFIX/lib/libLLVM.so"

if ! bpf-linker --version 2>/dev/null | grep -q "$BPF_LINKER_VERSION"; then
  echo "toolchain: building bpf-linker $BPF_LINKER_VERSION against nightly's LLVM $major"
  LLVM_PREFIX=$LLVM_PREFIX cargo install --locked --force "bpf-linker@$BPF_LINKER_VERSION" \
    --no-default-features --features "llvm-$major"
  bpf-linker --version
fi

# Image builds set MOAT_SKIP_BPFFS=1: they cannot mount and the image does not need it.
if [ -z "${MOAT_SKIP_BPFFS:-}" ] && ! mountpoint -q /sys/fs/bpf; then
  mount -t bpf bpf /sys/fs/bpf
fi
