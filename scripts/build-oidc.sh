#!/usr/bin/env bash
# Builds oauth2-proxy (github.com/oauth2-proxy/oauth2-proxy/v7, pinned in
# tests/oidc/go.mod, from the Go module proxy) into <repo>/.tools/oauth2-proxy, and
# tests/oidc/mockoidc (a mock OIDC provider, github.com/oauth2-proxy/mockoidc) into
# <repo>/.tools/mockoidc, for the access tests of deploy/jaeger. Built when the
# module's files change and cached like Jaeger (scripts/lib/go-build.sh).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PATH="/usr/local/go/bin:$HOME/go/bin:$PATH"
log() { printf '[build-oidc] %s\n' "$*" >&2; }
# shellcheck source=scripts/lib/go-build.sh
. "$ROOT/scripts/lib/go-build.sh"

go_build oidc "$ROOT/tests/oidc" 1 "go.mod go.sum mockoidc/main.go" oauth2-proxy=github.com/oauth2-proxy/oauth2-proxy/v7 mockoidc=./mockoidc
