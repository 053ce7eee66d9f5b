#!/usr/bin/env bash
# Builds Jaeger v2 (the module pinned in tests/jaeger/go.mod) into <repo>/.tools/jaeger,
# when go.mod/go.sum changed, and keeps it in ~/.cache/sonde (scripts/lib/go-build.sh)
# so that a fresh clone on the same machine (CI) does not build it again.
# Measured on a 2-core machine: module download ~35 s (~280 MB of module zips,
# ~1.3 GB unpacked in the Go module cache), build ~5 min from a cold cache.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PATH="/usr/local/go/bin:$HOME/go/bin:$PATH"
log() { printf '[build-jaeger] %s\n' "$*" >&2; }
# shellcheck source=scripts/lib/go-build.sh
. "$ROOT/scripts/lib/go-build.sh"

go_build jaeger "$ROOT/tests/jaeger" 1 "go.mod go.sum" jaeger=github.com/jaegertracing/jaeger/cmd/jaeger
