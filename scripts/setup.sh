#!/usr/bin/env bash
# Installs everything sonde needs to build, run and test on a fresh Debian 12 machine.
# Idempotent: every step checks first and does nothing when its piece is already there.
# Used by both README commands and by .ci/run.
set -euo pipefail

NIGHTLY="nightly-2026-05-20"          # rustc with LLVM 22, the LLVM Debian ships
BPF_LINKER_VERSION="0.13.0"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PATH="$HOME/.cargo/bin:$PATH"
export DEBIAN_FRONTEND=noninteractive

log() { printf '[setup] %s\n' "$*" >&2; }

need_root() {
  if [ "$(id -u)" -ne 0 ]; then
    log "setup installs Debian packages and loads eBPF programs: run it as root (sudo $0)"
    exit 1
  fi
}

apt_packages=(
  # eBPF toolchain
  llvm-22-dev libpolly-22-dev libzstd-dev clang-22
  # build helpers
  pkg-config build-essential ca-certificates curl
)
# The real peers the tests drive (nginx, RabbitMQ, capture tools...) are installed by
# scripts/setup-tests.sh, so that running the agent does not pull them in.
if [ "${SONDE_SETUP_TEST_PEERS:-0}" = 1 ]; then
  # libcap2-bin: capsh, to run the agent with the DaemonSet's capabilities only.
  # openjdk-17-jdk-headless: javac and java for the Java service (tests/test_java_threads.py).
  apt_packages+=(nginx rabbitmq-server tshark tcpdump wrk openssl bc libcap2-bin openjdk-17-jdk-headless)
fi

install_debian() {
  local missing=()
  for p in "${apt_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -eq 0 ]; then log "Debian packages: present"; return; fi
  log "Debian packages: installing ${missing[*]}"
  apt-get update -qq
  # Services must not start on install: the tests start their own instances.
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  echo "wireshark-common wireshark-common/install-setuid boolean false" | debconf-set-selections
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  rm -f /usr/sbin/policy-rc.d
}

install_rust() {
  if ! command -v rustup >/dev/null; then
    log "rustup is missing: this machine kind ships Rust through rustup; install it first"
    exit 1
  fi
  # rust-src for -Z build-std=core; clippy for linting agent-ebpf on its own target.
  local nightly_have
  nightly_have="$(rustup component list --toolchain "$NIGHTLY" --installed 2>/dev/null || true)"
  if ! rustup run "$NIGHTLY" rustc --version >/dev/null 2>&1 \
     || ! grep -q '^rust-src' <<<"$nightly_have" || ! grep -q '^clippy' <<<"$nightly_have"; then
    log "Rust: installing $NIGHTLY with rust-src and clippy"
    rustup toolchain install "$NIGHTLY" --profile minimal --component rust-src --component clippy --no-self-update
  fi
  rustup component list --installed 2>/dev/null | grep -q clippy || rustup component add clippy rustfmt
  if ! bpf-linker --version 2>/dev/null | grep -q "$BPF_LINKER_VERSION"; then
    log "Rust: building bpf-linker $BPF_LINKER_VERSION against LLVM 22 (about a minute)"
    PATH=/usr/lib/llvm-22/bin:$PATH LLVM_PREFIX=/usr/lib/llvm-22 \
      cargo install bpf-linker --locked --version "$BPF_LINKER_VERSION" --no-default-features --features llvm-22
  fi
}

mount_fs() {
  if [ ! -e /sys/kernel/tracing/events ]; then
    mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null || log "tracefs: could not mount (the agent will retry)"
  fi
}

need_root
install_debian
install_rust
mount_fs
log "done"
