#!/usr/bin/env bash
# Overhead of tracing on an HTTP server: the same wrk load against nginx, untraced and
# then traced by sonde, in one run; prints both and their ratios, the agent's own CPU
# time and memory, and what it lost: events the kernel could not deliver, spans dropped
# by reason, and every other loss counter on /metrics. Run as root after a release build:
#   bash bench/http_overhead.sh [seconds] [connections]
# Not a pass/fail test: numbers on a shared 2-core VM move; the ratios are the point.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SONDE="${SONDE_BIN:-$ROOT/target/release/sonde}"
SECS="${1:-10}"
CONNS="${2:-16}"
PORT=18990
WORK="$(mktemp -d)"
trap 'kill $(cat "$WORK/nginx.pid" 2>/dev/null) 2>/dev/null || true; [ -n "${AGENT:-}" ] && kill -INT $AGENT 2>/dev/null || true; rm -rf "$WORK"' EXIT

head -c 1024 /dev/urandom | base64 > "$WORK/index.html"
cat > "$WORK/nginx.conf" <<CONF
worker_processes 1;
daemon on;
pid $WORK/nginx.pid;
error_log $WORK/error.log;
events { worker_connections 1024; }
http {
  access_log off;
  sendfile on;
  server { listen 127.0.0.1:$PORT; root $WORK; location /orders/ { return 200 '{"status":"ok"}'; } }
}
CONF
nginx -c "$WORK/nginx.conf"
sleep 0.5

run_wrk() {
  wrk -t1 -c"$CONNS" -d"${SECS}s" --latency "http://127.0.0.1:$PORT/orders/42" 2>&1
}
rps() { awk '/Requests\/sec/ {print $2}'; }
p99() { awk '$1=="99%" {print $2}'; }

echo "== untraced: wrk -t1 -c$CONNS -d${SECS}s against nginx"
base="$(run_wrk)"; echo "$base" | grep -E "Requests/sec|99%"

"$SONDE" run --output otlp-json --output-file "$WORK/spans.jsonl" --admin-addr 127.0.0.1:18991 2>"$WORK/agent.log" &
AGENT=$!
for _ in $(seq 1 100); do curl -sf http://127.0.0.1:18991/readyz >/dev/null && break; sleep 0.1; done
ticks0=$(awk '{print $14+$15}' /proc/$AGENT/stat)

echo "== traced by sonde"
traced="$(run_wrk)"; echo "$traced" | grep -E "Requests/sec|99%"
# Spans still in the export queue are not lost yet: wait (up to 30 s) until it drains.
for _ in $(seq 1 300); do
  queued=$(curl -s http://127.0.0.1:18991/metrics | awk '/^sonde_export_queue_spans / {print $2}')
  [ "${queued:-0}" = "0" ] && break
  sleep 0.1
done
ticks1=$(awk '{print $14+$15}' /proc/$AGENT/stat)
rss_kb=$(awk '/VmHWM/ {print $2}' /proc/$AGENT/status)
metrics="$(curl -s http://127.0.0.1:18991/metrics)"
kill -INT $AGENT; wait $AGENT || true; AGENT=

b=$(echo "$base" | rps); t=$(echo "$traced" | rps)
hz=$(getconf CLK_TCK)
reqs=$(echo "$t * $SECS" | bc)
sample() { echo "$metrics" | awk -v m="$1" '$1 == m {print $2; found=1} END {if (!found) print 0}'; }
spans=$(sample sonde_spans_built_total)
exported=$(sample sonde_spans_exported_total)
dropped=$(echo "$metrics" | awk '/^sonde_spans_dropped_total/ {n += $2} END {print n + 0}')
cpu_s=$(echo "scale=3; ($ticks1 - $ticks0) / $hz" | bc)
echo
echo "requests/s untraced      $b"
echo "requests/s traced        $t"
echo "throughput ratio         $(echo "scale=3; $t / $b" | bc)   (traced / untraced; 1.0 = no cost)"
echo "p99 untraced / traced    $(echo "$base" | p99) / $(echo "$traced" | p99)"
echo "agent CPU                ${cpu_s}s for ~${reqs%.*} requests = $(echo "scale=2; $cpu_s * 1000000 / $reqs" | bc) µs per request"
echo "agent peak RSS           $((rss_kb / 1024)) MiB"
echo "spans built / exported   $spans / $exported (still queued: $(sample sonde_export_queue_spans))"
if [ "${spans:-0}" -gt 0 ]; then
  echo "spans dropped            $dropped ($(echo "scale=2; 100 * $dropped / $spans" | bc)% of built)"
fi
echo "lost events              $(sample sonde_events_lost_total)"
# Every counter that says something was lost, dropped, missed or skipped, by name, so
# one added later shows up here without a change to this script.
echo "loss counters (README: \"What can be lost\"):"
echo "$metrics" | grep -E '^sonde_[a-z_]*(lost|dropped|missed|evicted|skipped|malformed|failures|unconfirmed|overflow)[a-z_]*(\{[^}]*\})? ' \
  | awk '{printf "  %-56s %s\n", $1, $2}'
