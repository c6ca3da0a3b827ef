#!/usr/bin/env bash
# The whole test suite: format and lint gates, then every unit and
# multi-process test (they start real brokers on 127.0.0.1 with free ports).
set -euo pipefail
cd "$(dirname "$0")"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The multi-process tests run the debug `coremq` binary; build it first.
cargo build --workspace --locked
if command -v cargo-nextest >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast
else
  cargo test --workspace --locked --no-fail-fast
fi
