#!/usr/bin/env bash
# What the TLS and RabbitMQ integration tests need on top of scripts/setup-tests.sh:
# pika in the tests' Python venv (tests/.venv), amqplib in tests/node (npm ci), and the
# Go test program (tests/go: TLS HTTP server/client, AMQP publisher/consumer) built
# into .tools/sonde-go-clients. Idempotent: each step is skipped when already done.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/tests/.venv"
TOOLS="$ROOT/.tools"
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
GO_DIR="$ROOT/tests/go"
command -v go >/dev/null || { log "go is not installed (scripts/setup.sh)"; exit 1; }
mkdir -p "$TOOLS"
bin="$TOOLS/sonde-go-clients"
gostamp="$TOOLS/sonde-go-clients.stamp"
gowant="$(cd "$GO_DIR" && cat go.mod go.sum *.go | sha256sum | cut -d' ' -f1)"
if [ -x "$bin" ] && [ -f "$gostamp" ] && [ "$(cat "$gostamp")" = "$gowant" ]; then
  log "Go test program: present ($bin)"
else
  log "Go test program: building $bin"
  (cd "$GO_DIR" && go build -trimpath -buildvcs=false -o "$bin.tmp" . && mv "$bin.tmp" "$bin")
  echo "$gowant" > "$gostamp"
fi
log "done"
