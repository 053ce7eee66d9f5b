#!/usr/bin/env bash
# What following goroutines (--follow-goroutines) costs a Go net/http server, in one run:
# wrk (1 thread, 8 connections, 8 s per round, pinned to CPU 1) against the Go test
# server (tests/go `h2-server -h2c`: HTTP/1.1 GET /orders/1, pinned to CPU 0) with no
# agent, with the agent excluding the server (--exclude-comm: only the probes' traps
# and in-kernel filtering), and with the agent tracing it; each agent mode with and
# without --follow-goroutines. Prints requests/s per mode and its ratio to untraced,
# ROUNDS times (default 2). Needs root, wrk, target/release/sonde and
# .tools/sonde-go-clients (scripts/setup-clients.sh).
#
#   sudo bash bench/go_goroutines_cost.sh [ROUNDS]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROUNDS=${1:-2}
SONDE=${SONDE_BIN:-target/release/sonde}
GO=${SONDE_GO_CLIENTS:-.tools/sonde-go-clients}
for f in "$SONDE" "$GO"; do
  [ -x "$f" ] || { echo "go_goroutines_cost: $f is missing (cargo build --release; scripts/setup-clients.sh)" >&2; exit 1; }
done
command -v wrk >/dev/null || { echo "go_goroutines_cost: wrk is not installed (apt-get install wrk)" >&2; exit 1; }
work=$(mktemp -d)
taskset -c 0 "$GO" h2-server -h2c >"$work/server.out" 2>&1 &
server=$!
agent=
cleanup() {
  [ -n "$agent" ] && kill -INT "$agent" 2>/dev/null && wait "$agent" 2>/dev/null
  kill "$server" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
for _ in $(seq 50); do grep -q PORT "$work/server.out" && break; sleep 0.1; done
port=$(awk '/PORT/{print $2}' "$work/server.out")
comm=$(basename "$GO" | cut -c1-15)

rps() { taskset -c 1 wrk -t1 -c8 -d8s "http://127.0.0.1:$port/orders/1" | awk '/Requests\/sec/{print $2}'; }
with_agent() { # args: agent flags...
  "$SONDE" run --output stdout --admin-addr 127.0.0.1:0 "$@" >/dev/null 2>"$work/agent.err" &
  agent=$!
  for _ in $(seq 100); do grep -q "sonde is tracing" "$work/agent.err" && break; sleep 0.1; done
  sleep 1
  rps
  grep -q "TLS uprobes attached" "$work/agent.err" || echo "go_goroutines_cost: warning: no uprobes were attached to $GO" >&2
  kill -INT "$agent"; wait "$agent" || true; agent=
}

printf '%-6s %-34s %12s %8s\n' round mode requests/s ratio
for r in $(seq "$ROUNDS"); do
  base=$(rps)
  printf '%-6s %-34s %12s %8s\n' "$r" "untraced" "$base" "1.00"
  for mode in "excluded" "excluded --follow-goroutines" "traced" "traced --follow-goroutines"; do
    flags=()
    case $mode in excluded*) flags+=(--exclude-comm "$comm") ;; esac
    case $mode in *--follow-goroutines) flags+=(--follow-goroutines) ;; esac
    got=$(with_agent "${flags[@]}")
    printf '%-6s %-34s %12s %8.2f\n' "$r" "$mode" "$got" "$(awk -v a="$got" -v b="$base" 'BEGIN{print a/b}')"
  done
done
