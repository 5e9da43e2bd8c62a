#!/usr/bin/env bash
# Installs the system libraries the workspace needs (Tauri's Linux backend,
# WebKitGTK), unless they are already there. Needs root for apt-get.
set -euo pipefail

if pkg-config --exists webkit2gtk-4.1 javascriptcoregtk-4.1 libsoup-3.0 gtk+-3.0 2>/dev/null; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install WebKitGTK 4.1, GTK 3 and libsoup 3 development packages for your system" >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq pkg-config libwebkit2gtk-4.1-dev libgtk-3-dev libsoup-3.0-dev \
  libjavascriptcoregtk-4.1-dev >/dev/null
