#!/usr/bin/env bash
# What the TLS and RabbitMQ integration tests need on top of scripts/setup-tests.sh:
# pika and grpcio in the tests' Python venv (tests/.venv), amqplib in tests/node (npm ci), and the
# Go test programs (tests/go: TLS HTTP server/client, AMQP publisher/consumer; tests/grpc-go:
# gRPC server/client) built into .tools/sonde-go-clients and .tools/sonde-grpc-go.
# Idempotent: each step is skipped when already done.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/tests/.venv"
export PATH="/usr/local/go/bin:$PATH"

log() { printf '[setup-clients] %s\n' "$*" >&2; }

# -- Python: pika, in the venv scripts/setup-tests.sh makes.
if [ ! -x "$VENV/bin/python" ]; then
  log "no venv at $VENV: run scripts/setup-tests.sh first"
  exit 1
fi
if "$VENV/bin/python" -c "import pika" 2>/dev/null; then
  log "pika: present"
else
  log "pika: installing into $VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "pika>=1.3,<2"
fi
# grpcio: the gRPC client and server of tests/test_http2.py (tests/grpc/orders.py).
if "$VENV/bin/python" -c "import grpc" 2>/dev/null; then
  log "grpcio: present"
else
  log "grpcio: installing into $VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "grpcio>=1.60,<2"
fi

# -- Node.js: amqplib from tests/node/package-lock.json.
NODE_DIR="$ROOT/tests/node"
command -v node >/dev/null || { log "node is not installed (scripts/setup.sh)"; exit 1; }
stamp="$NODE_DIR/node_modules/.sonde-lock.sha256"
want="$(sha256sum "$NODE_DIR/package-lock.json" | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -d "$NODE_DIR/node_modules/amqplib" ]; then
  log "node_modules: present"
else
  log "node_modules: npm ci in $NODE_DIR"
  (cd "$NODE_DIR" && npm ci --no-audit --no-fund --loglevel=error)
  echo "$want" > "$stamp"
fi

# -- Go: one binary with every Go test program, rebuilt when its sources change.
# shellcheck source=scripts/lib/go-build.sh
. "$ROOT/scripts/lib/go-build.sh"
go_build sonde-go-clients "$ROOT/tests/go" 0 "go.mod go.sum *.go" sonde-go-clients=.
# The Go gRPC (google.golang.org/grpc) server and client of tests/test_http2.py, a module
# of its own (tests/grpc-go) so the other Go programs do not carry grpc.
go_build sonde-grpc-go "$ROOT/tests/grpc-go" 0 "go.mod go.sum *.go" sonde-grpc-go=.
log "done"
