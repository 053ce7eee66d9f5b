#!/usr/bin/env bash
# Builds Jaeger v2 (the module pinned in tests/jaeger/go.mod) into <repo>/.tools/jaeger.
# Idempotent: skips the build when the binary is there and was built from the same
# go.mod/go.sum (a stamp file beside it records their hash). Built binaries are also
# kept in $SONDE_TOOLS_CACHE (default ~/.cache/sonde), keyed by that hash, so a fresh
# clone on the same machine (CI) reuses them instead of building again.
# Measured on a 2-core machine: module download ~35 s (~280 MB of module zips,
# ~1.3 GB unpacked in the Go module cache), build ~5 min from a cold cache.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MOD="$ROOT/tests/jaeger"
OUT="$ROOT/.tools/jaeger"
STAMP="$ROOT/.tools/jaeger.stamp"
CACHE="${SONDE_TOOLS_CACHE:-$HOME/.cache/sonde}"
export PATH="/usr/local/go/bin:$HOME/go/bin:$PATH"

log() { printf '[build-jaeger] %s\n' "$*" >&2; }

if ! command -v go >/dev/null; then
  log "Go is not installed (expected at /usr/local/go/bin/go); Jaeger cannot be built"
  exit 1
fi

want="$(cat "$MOD/go.mod" "$MOD/go.sum" | sha256sum | cut -d' ' -f1)"
if [ -x "$OUT" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  log "present: $OUT ($(grep -m1 'jaegertracing/jaeger ' "$MOD/go.mod" | awk '{print $2}'))"
  exit 0
fi

mkdir -p "$ROOT/.tools"
cached="$CACHE/jaeger-$want"
if [ -x "$cached" ]; then
  cp -f "$cached" "$OUT.tmp" && mv -f "$OUT.tmp" "$OUT"
  echo "$want" > "$STAMP"
  log "present: $OUT (from $cached)"
  exit 0
fi

log "building $(grep -m1 'jaegertracing/jaeger ' "$MOD/go.mod" | xargs) (several minutes on 2 cores)"
start=$(date +%s)
(
  cd "$MOD"
  # -p 2: this machine has 2 cores; GOFLAGS from the caller could make the build write go.mod.
  GOFLAGS=-mod=readonly go build -p 2 -trimpath -o "$OUT.tmp" github.com/jaegertracing/jaeger/cmd/jaeger
)
mv -f "$OUT.tmp" "$OUT"
echo "$want" > "$STAMP"
if mkdir -p "$CACHE" 2>/dev/null && cp -f "$OUT" "$cached.tmp" 2>/dev/null; then
  mv -f "$cached.tmp" "$cached"
fi
log "built $OUT in $(( $(date +%s) - start )) s"
