#!/usr/bin/env bash
# What `cargo xtask bench` (bench/bench.py) needs on top of scripts/setup.sh (nginx, wrk,
# openssl, RabbitMQ) and scripts/setup-tests.sh / setup-clients.sh (the Python venv the
# benchmark runs in, the Go AMQP clients): vegeta v12.13.0, the constant-rate load
# generator, built from the Go module proxy (pinned in bench/vegeta/go.mod) into
# .tools/vegeta and cached in ~/.cache/sonde like Jaeger. Idempotent.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PATH="/usr/local/go/bin:$HOME/go/bin:$PATH"
log() { printf '[setup-bench] %s\n' "$*" >&2; }
# shellcheck source=scripts/lib/go-build.sh
. "$ROOT/scripts/lib/go-build.sh"

go_build vegeta "$ROOT/bench/vegeta" 1 "go.mod go.sum" vegeta=github.com/tsenart/vegeta/v12
