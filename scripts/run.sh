#!/usr/bin/env bash
# Runs the sonde agent on this machine: installs what is missing (scripts/setup.sh),
# builds it, and starts `sonde run` as root. With no arguments spans are printed to
# stdout, or sent over OTLP instead when OTEL_EXPORTER_OTLP_ENDPOINT is set.
# Arguments go to `sonde run`, e.g. scripts/run.sh --output otlp --otlp-endpoint http://127.0.0.1:4317
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PATH="$HOME/.cargo/bin:/usr/local/go/bin:$PATH"
SUDO=()
[ "$(id -u)" -eq 0 ] || SUDO=(sudo -E env "PATH=$PATH")

"${SUDO[@]}" "$ROOT/scripts/setup.sh"
cd "$ROOT"
exec cargo xtask run --skip-setup -- "$@"
