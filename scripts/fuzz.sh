#!/usr/bin/env bash
# Fuzzes the L7 proxy's request framing (operator/fuzz, target request_head) for SECONDS
# (default 30) with cargo-fuzz on the nightly toolchain. Installs cargo-fuzz when missing.
# New inputs go to operator/fuzz/corpus/ (ignored by git); the committed seeds are read only.
# A crash leaves its input under operator/fuzz/artifacts/ and fails the script.
set -euo pipefail

secs="${1:-30}"
root="$(cd "$(dirname "$0")/.." && pwd)"

if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    cargo install --locked cargo-fuzz
fi

cd "$root/operator/fuzz"
mkdir -p corpus/request_head
# -rss_limit_mb bounds the fuzzer itself; -max_len covers heads past the 16 KiB limit.
cargo +nightly fuzz run request_head corpus/request_head seeds/request_head -- \
    -max_total_time="$secs" -max_len=40000 -rss_limit_mb=2048 -print_final_stats=1
