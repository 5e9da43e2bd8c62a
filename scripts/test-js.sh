#!/usr/bin/env bash
# The JavaScript client (clients/js): install its pinned dev tools, build
# it, check that the live view embedded in the CLI is the one it builds,
# type-check, then run its tests — Node against a real `statesync serve`,
# and real Chromium.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build -p statesync
# Where cargo put it: a CARGO_TARGET_DIR elsewhere is honoured.
export STATESYNC_BIN="${CARGO_TARGET_DIR:-$PWD/target}/debug/statesync"
cd clients/js
npm ci --no-audit --no-fund --loglevel=error
node scripts/build.mjs --check
npm run typecheck --silent
npm test
