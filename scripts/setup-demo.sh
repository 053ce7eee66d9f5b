#!/usr/bin/env bash
# What the demo (cargo xtask demo, tests/test_demo.py) needs on top of scripts/setup.sh
# and scripts/setup-tests.sh (RabbitMQ, Jaeger): Debian's admesh and prusa-slicer, the
# Shop's Python venv (.tools/demo-venv, deploy/demo/shop/requirements.txt), the model
# store (versitygw v1.8.0 from the Go module proxy, pinned in deploy/demo/store/go.mod),
# the MES (deploy/demo/mes, Go) and a self-signed CA with a certificate for 127.0.0.1
# (.tools/demo-tls). Idempotent: each step is skipped when done; versitygw (about 3 min
# to build on 2 cores) is kept in $SONDE_TOOLS_CACHE (default ~/.cache/sonde), keyed by
# the hash of its go.mod and go.sum, as Jaeger is.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEMO="$ROOT/deploy/demo"
TOOLS="$ROOT/.tools"
export PATH="/usr/local/go/bin:$HOME/.cargo/bin:$PATH"
export DEBIAN_FRONTEND=noninteractive

log() { printf '[setup-demo] %s\n' "$*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
  log "run as root (sudo $0): it installs Debian packages"
  exit 1
fi
mkdir -p "$TOOLS"

# -- Debian: the mesh checker and the slicer (prusa-slicer runs headless: --export-gcode).
missing=()
for p in admesh prusa-slicer openssl python3-venv; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  log "Debian packages: present"
else
  log "Debian packages: installing ${missing[*]}"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
for p in node go rabbitmq-server; do
  command -v "$p" >/dev/null || { log "$p is missing: run scripts/setup.sh and scripts/setup-tests.sh first"; exit 1; }
done

# -- The Shop's venv.
VENV="$TOOLS/demo-venv"
req="$DEMO/shop/requirements.txt"
want="$(sha256sum "$req" | cut -d' ' -f1)"
if [ -x "$VENV/bin/python" ] && [ "$(cat "$VENV/.sonde-req.sha256" 2>/dev/null)" = "$want" ]; then
  log "Shop venv: present ($VENV)"
else
  log "Shop venv: creating $VENV"
  rm -rf "$VENV"
  /usr/bin/python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$req"
  echo "$want" > "$VENV/.sonde-req.sha256"
fi

# -- Go programs: built when their sources change; the store is also cached across clones.
# shellcheck source=scripts/lib/go-build.sh
. "$ROOT/scripts/lib/go-build.sh"
go_build versitygw "$DEMO/store" 1 "go.mod go.sum *.go" versitygw=github.com/versity/versitygw/cmd/versitygw
go_build demo-mes "$DEMO/mes" 0 "go.mod go.sum *.go" demo-mes=.

# -- TLS: a CA of the demo's own and a certificate for 127.0.0.1 and localhost.
TLS="$TOOLS/demo-tls"
if [ -f "$TLS/ca.pem" ] && [ -f "$TLS/server.pem" ] && [ -f "$TLS/server.key" ]; then
  log "TLS certificates: present ($TLS)"
else
  log "TLS certificates: making a CA and a server certificate in $TLS"
  mkdir -p "$TLS"
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=sonde demo CA" \
    -keyout "$TLS/ca.key" -out "$TLS/ca.pem" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" \
    -keyout "$TLS/server.key" -out "$TLS/server.csr" 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n' > "$TLS/ext.cnf"
  openssl x509 -req -in "$TLS/server.csr" -CA "$TLS/ca.pem" -CAkey "$TLS/ca.key" -CAcreateserial \
    -days 3650 -extfile "$TLS/ext.cnf" -out "$TLS/server.pem" 2>/dev/null
fi
log "done"
