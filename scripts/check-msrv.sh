#!/usr/bin/env bash
# Checks that no dependency needs a newer Rust than the workspace's
# `rust-version` (clippy's `incompatible_msrv` checks our own use of std).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo metadata --format-version 1 --locked | python3 -c '
import json, sys
meta = json.load(sys.stdin)
ours = {p["id"] for p in meta["packages"] if p["source"] is None}
def version(v):
    return tuple(int(x) for x in v.split("."))
msrv = max(version(p["rust_version"]) for p in meta["packages"] if p["id"] in ours)
newer = [(p["name"], p["version"], p["rust_version"]) for p in meta["packages"]
         if p["id"] not in ours and p.get("rust_version") and version(p["rust_version"]) > msrv]
if newer:
    sys.exit("dependencies need a newer Rust than rust-version %s: %s" % (".".join(map(str, msrv)), newer))
print("rust-version %s covers every dependency" % ".".join(map(str, msrv)))
'
