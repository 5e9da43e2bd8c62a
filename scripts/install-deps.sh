#!/usr/bin/env bash
# Installs what the tests need, unless it is already there: the system
# libraries of Tauri's Linux backend (WebKitGTK), Node.js and npm
# (JavaScript tests), Chromium (browser tests), Redis and PostgreSQL
# (shared-storage tests). One `apt-get update`, then one `apt-get install`. Needs root for
# apt-get.
set -euo pipefail

missing=()
if ! pkg-config --exists webkit2gtk-4.1 javascriptcoregtk-4.1 libsoup-3.0 gtk+-3.0 2>/dev/null; then
  missing+=(pkg-config libwebkit2gtk-4.1-dev libgtk-3-dev libsoup-3.0-dev libjavascriptcoregtk-4.1-dev)
fi
if ! command -v node >/dev/null 2>&1; then
  missing+=(nodejs)
fi
# The JavaScript client's build and tests (clients/js).
if ! command -v npm >/dev/null 2>&1; then
  missing+=(npm)
fi
# ... and its browser tests, in a real Chromium.
if ! command -v chromium >/dev/null 2>&1; then
  missing+=(chromium)
fi
# The shared-storage tests start a real Redis.
if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
  missing+=(redis-server redis-tools)
fi
# ... and a real PostgreSQL (Debian's layout: /usr/lib/postgresql/*/bin).
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  missing+=(postgresql)
fi
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install these (or your system's equivalents): ${missing[*]}" >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
