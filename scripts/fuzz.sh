#!/usr/bin/env bash
# Runs every fuzz target for FUZZ_SECONDS (default 20) each, on the nightly
# toolchain, starting from the seed corpora. Installs cargo-fuzz if needed.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds="${FUZZ_SECONDS:-20}"
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked
fi
for target in $(cargo +nightly fuzz list); do
  echo "== fuzz $target (${seconds}s)"
  # Work on a copy: the committed seeds stay as they are.
  work="$(mktemp -d)"
  cp -r "corpus/$target/." "$work/"
  cargo +nightly fuzz run "$target" "$work" -- -max_total_time="$seconds" -rss_limit_mb=2048
  rm -rf "$work"
done
