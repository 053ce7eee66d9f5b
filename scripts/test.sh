#!/usr/bin/env bash
# Runs every test of sonde: installs what is missing (scripts/setup.sh and
# scripts/setup-tests.sh: Python venv, Jaeger v2; scripts/setup-clients.sh: Node.js
# and Go test clients; scripts/setup-vm.sh: QEMU, virtme-ng, Debian's 6.1 and 6.12
# kernels, only for --vm), unit tests (cargo test), release build, the privileged
# integration and end-to-end suite (pytest tests/, as root). The subset on Debian's
# kernels in QEMU (cargo xtask vm-test) runs with `cargo xtask test --vm` or on its
# own; it is not in CI yet (20-30 min per kernel under emulation, issue 14).
# Extra arguments go to pytest, e.g. scripts/test.sh -k keepalive -x
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PATH="$HOME/.cargo/bin:/usr/local/go/bin:$PATH"
SUDO=()
[ "$(id -u)" -eq 0 ] || SUDO=(sudo -E env "PATH=$PATH")

"${SUDO[@]}" "$ROOT/scripts/setup.sh"
"${SUDO[@]}" "$ROOT/scripts/setup-tests.sh"
"${SUDO[@]}" "$ROOT/scripts/setup-clients.sh"
cd "$ROOT"
exec cargo xtask test --skip-setup -- "$@"
