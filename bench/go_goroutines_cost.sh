#!/bin/bash
# wrk against Go net/http (h2-server -h2c, HTTP/1.1 GET /orders/1): no agent, agent that excludes the server (uprobe traps only), agent tracing it.
S=/work/main/target/release/sonde
cd /tmp
taskset -c 0 /tmp/gobin/sonde-go-clients h2-server -h2c > /tmp/gsrv.out 2>&1 &
SRV=$!
sleep 1; P=$(awk '/PORT/{print $2}' /tmp/gsrv.out)
run() { taskset -c 1 wrk -t1 -c8 -d8s http://127.0.0.1:$P/orders/1 2>&1 | awk '/Requests\/sec/{print $2}'; }
for round in 1 2; do
  echo "round $round none $(run)"
  $S run --output stdout --exclude-comm sonde-go-client > /dev/null 2>/tmp/ag.err & A=$!; sleep 4
  echo "round $round excluded $(run)"; kill -INT $A; wait $A
  $S run --output stdout --admin-addr 127.0.0.1:9464 > /dev/null 2>/tmp/ag2.err & A=$!; sleep 4
  echo "round $round traced $(run)"
  curl -s 127.0.0.1:9464/metrics | grep -E "^sonde_(events_lost|spans_dropped|parent_ambiguous)[a-z_]*" | grep -v " 0$" | head -5
  kill -INT $A; wait $A
done
kill $SRV
