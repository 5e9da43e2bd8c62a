#!/usr/bin/env bash
# Runs the whole test suite: unit, integration, property, multi-process
# and doc tests, then the JavaScript client's (Node and Chromium). Installs what the tests need first (the system libraries of
# Tauri's Linux backend); cargo-nextest is used when present, plain
# `cargo test` otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/install-deps.sh

if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --all-features --no-fail-fast
else
  cargo test --workspace --all-features --lib --bins --tests --examples
fi
# nextest does not run doctests.
cargo test --workspace --all-features --doc
# The JavaScript client, in Node and in Chromium.
./scripts/test-js.sh
