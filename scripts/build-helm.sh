#!/usr/bin/env bash
# Builds helm (helm.sh/helm/v3, pinned in tests/helm/go.mod, from the Go module proxy)
# into <repo>/.tools/helm, and tests/helm/kubecheck (strict decoding of manifests into
# the Kubernetes API's Go types, from the same module) into <repo>/.tools/kubecheck,
# for CI's checks of deploy/kubernetes and deploy/helm/sonde. Built when the module's
# files change and cached like Jaeger (scripts/lib/go-build.sh).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PATH="/usr/local/go/bin:$HOME/go/bin:$PATH"
log() { printf '[build-helm] %s\n' "$*" >&2; }
# shellcheck source=scripts/lib/go-build.sh
. "$ROOT/scripts/lib/go-build.sh"

go_build helm "$ROOT/tests/helm" 1 "go.mod go.sum kubecheck/main.go" helm=helm.sh/helm/v3/cmd/helm kubecheck=./kubecheck
