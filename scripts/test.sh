#!/usr/bin/env bash
# Runs every test of sonde: installs what is missing (scripts/setup.sh and
# scripts/setup-tests.sh: Python venv, Jaeger v2; scripts/setup-clients.sh: Node.js
# and Go test clients; scripts/setup-demo.sh: the demo's services, store and programs
# for tests/test_demo.py; scripts/setup-vm.sh: QEMU, virtme-ng, Debian's 6.1 and 6.12
# kernels), unit tests (cargo test), release build, the privileged integration and
# end-to-end suite (pytest tests/, as root), then the CI subset on Debian's 6.1 and 6.12
# kernels in QEMU (`cargo xtask vm-test --ci`, both kernels at once, each with both
# socket backends; about 10 min under emulation). SONDE_SKIP_VM=1 leaves the VM part
# (and its setup) out, and says so.
# Extra arguments go to pytest, e.g. scripts/test.sh -k keepalive -x
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PATH="$HOME/.cargo/bin:/usr/local/go/bin:$PATH"
SUDO=()
[ "$(id -u)" -eq 0 ] || SUDO=(sudo -E env "PATH=$PATH")

"${SUDO[@]}" "$ROOT/scripts/setup.sh"
"${SUDO[@]}" "$ROOT/scripts/setup-tests.sh"
"${SUDO[@]}" "$ROOT/scripts/setup-clients.sh"
"${SUDO[@]}" "$ROOT/scripts/setup-demo.sh"
vm=(--vm)
if [ "${SONDE_SKIP_VM:-}" = 1 ]; then
  echo "scripts/test.sh: SONDE_SKIP_VM=1: the VM subset on Debian's 6.1 and 6.12 kernels is NOT run" >&2
  vm=()
else
  "${SUDO[@]}" "$ROOT/scripts/setup-vm.sh"
fi
if [ "${SONDE_CI:-}" = 1 ] && command -v go >/dev/null; then
  # CI (.ci/run) has no later use for Go's build cache: the Go programs are built and
  # cached as binaries by now. It is the largest tree after cargo's (about 3 GB).
  go clean -cache && echo "scripts/test.sh: SONDE_CI=1: Go's build cache removed" >&2
fi
cd "$ROOT"
exec cargo xtask test --skip-setup "${vm[@]}" -- "$@"
