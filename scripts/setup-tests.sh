#!/usr/bin/env bash
# What the tests need on top of scripts/setup.sh: cargo-fuzz for the fuzz targets, a
# Python venv at tests/.venv with pytest, Debian's chromium, and Jaeger v2 built into
# .tools/jaeger.
# Idempotent.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/tests/.venv"
export PATH="/usr/local/go/bin:$HOME/.cargo/bin:$PATH"
export DEBIAN_FRONTEND=noninteractive

log() { printf '[setup-tests] %s\n' "$*" >&2; }

PY_DEPS=(pytest pytest-timeout pyyaml)
CARGO_FUZZ_VERSION="0.13.2"

# cargo-fuzz builds on stable; the targets themselves build with setup.sh's pinned nightly.
install_cargo_fuzz() {
  if cargo fuzz --version 2>/dev/null | grep -qx "cargo-fuzz $CARGO_FUZZ_VERSION"; then
    log "cargo-fuzz: present ($CARGO_FUZZ_VERSION)"
    return
  fi
  log "cargo-fuzz: installing $CARGO_FUZZ_VERSION (about 1.5 minutes)"
  cargo install cargo-fuzz --locked --version "$CARGO_FUZZ_VERSION"
}

# Headless Chromium for tests/test_orders.py (the journey page, with screenshots).
# Recommended packages included: they bring the fonts the page is drawn with.
install_chromium() {
  if command -v chromium >/dev/null 2>&1; then
    log "chromium: present"
    return
  fi
  log "chromium: installing Debian's package"
  apt-get update -qq
  apt-get install -y -qq -o DPkg::Lock::Timeout=600 chromium >/dev/null
}

venv_ok() {
  [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import pytest, pytest_timeout, yaml" 2>/dev/null
}

make_venv() {
  if venv_ok; then log "Python venv: present ($VENV)"; return; fi
  rm -rf "$VENV"
  # Any python3 >= 3.9 with venv will do: the one on PATH first, then Debian's.
  local py=""
  for cand in "$(command -v python3 || true)" /usr/bin/python3; do
    [ -n "$cand" ] && [ -x "$cand" ] || continue
    if "$cand" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 9))' 2>/dev/null; then
      py="$cand"; break
    fi
  done
  if [ -z "$py" ]; then
    log "Python venv: installing Debian's python3-venv"
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends python3 python3-venv >/dev/null
    py=/usr/bin/python3
  fi
  log "Python venv: creating $VENV with $py"
  "$py" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "${PY_DEPS[@]}"
  venv_ok || { log "Python venv: pytest still missing after install"; exit 1; }
}

# Real peers: nginx, RabbitMQ, tcpdump/tshark for captures, wrk and bc for bench/,
# capsh (libcap2-bin) for the tests that take a capability away.
SONDE_SETUP_TEST_PEERS=1 "$ROOT/scripts/setup.sh"
install_cargo_fuzz
install_chromium
make_venv
"$ROOT/scripts/build-jaeger.sh"
"$ROOT/scripts/build-helm.sh"
"$ROOT/scripts/build-oidc.sh"
"$ROOT/scripts/setup-bench.sh"
log "done"
