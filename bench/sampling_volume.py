#!/usr/bin/env python3
"""What sampling saves: the OTLP bytes the agent sends per order and per second, with
and without `--sample-ratio`, on one workload in one run.

The workload is tests/services/orders_api.py (a Python order API) and a Python client
sending orders at a fixed rate, each a POST /orders and a GET /orders/ID on one
keep-alive connection, one order in 50 failing with HTTP 500; both in a cgroup of
their own that the agent is limited to (`--cgroup`), so only their spans count. The
agent exports over OTLP http/protobuf to a receiver in this script that counts the
request bodies' bytes (what would reach Jaeger); the spans are the agent's
sonde_spans_exported_total.

    bench/sampling_volume.py [--orders N] [--rate PER_SEC] [--ratios 1,0.1]

Run as root; SONDE_BIN picks the agent (default target/release/sonde).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
import uuid
from http.server import ThreadingHTTPServer
from pathlib import Path

from bench import Receiver, cgroup2_root, free_port  # bench/bench.py, beside this file

REPO = Path(__file__).resolve().parent.parent


CLIENT = r'''
import http.client, json, socket, sys, time
port, prefix, n, rate = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
c.connect()
c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
start = time.monotonic()
for i in range(n):
    time.sleep(max(0.0, start + i / rate - time.monotonic()))
    oid = f"{prefix}-{i}" + ("-F" if i % 50 == 7 else "")
    c.request("POST", "/orders", json.dumps({"order_id": oid}), {"Content-Type": "application/json"})
    c.getresponse().read()
    c.request("GET", f"/orders/{oid}")
    c.getresponse().read()
print(f"{time.monotonic() - start:.3f}", flush=True)
'''


def run(ratio: float, orders: int, rate: float, sonde: str, otlp_port: int) -> dict:
    cg = cgroup2_root() / f"sonde-bench-{os.getpid()}-{str(ratio).replace('.', '_')}"
    cg.mkdir(exist_ok=True)

    def enter():
        (cg / "cgroup.procs").write_text(str(os.getpid()))

    port, admin = free_port(), free_port()
    server = subprocess.Popen([sys.executable, str(REPO / "tests/services/orders_api.py"), str(port)],
                              preexec_fn=enter)
    agent = subprocess.Popen(
        [sonde, "run", "--cgroup", str(cg), "--sample-ratio", str(ratio), "--output", "otlp",
         "--otlp-endpoint", f"http://127.0.0.1:{otlp_port}", "--otlp-protocol", "http/protobuf",
         "--admin-addr", f"127.0.0.1:{admin}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import urllib.request
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.3)
        with Receiver.lock:
            Receiver.bytes = 0
        out = subprocess.run([sys.executable, "-c", CLIENT, str(port), "B" + uuid.uuid4().hex[:8],
                              str(orders), str(rate)], preexec_fn=enter, capture_output=True,
                             text=True, check=True)
        seconds = float(out.stdout.strip())
        # Kept orders leave within the link and order holds (2.5 s); dropped ones never.
        time.sleep(5)
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5).read().decode()
        spans = next(int(float(line.split()[-1])) for line in metrics.splitlines()
                     if line.startswith("sonde_spans_exported_total"))
        agent.send_signal(2)
        agent.wait(timeout=60)
        with Receiver.lock:
            return {"ratio": ratio, "orders": orders, "seconds": seconds,
                    "bytes": Receiver.bytes, "spans": spans}
    finally:
        for p in (agent, server):
            if p.poll() is None:
                p.kill()
            p.wait()
        for pid in (cg / "cgroup.procs").read_text().split():
            os.kill(int(pid), 9)
        time.sleep(0.2)
        cg.rmdir()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--orders", type=int, default=2000)
    ap.add_argument("--rate", type=float, default=200.0, help="orders per second")
    ap.add_argument("--ratios", default="1,0.1")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: the agent loads eBPF programs")
    sonde = os.environ.get("SONDE_BIN", str(REPO / "target/release/sonde"))
    receiver = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    results = [run(float(r), args.orders, args.rate, sonde, receiver.server_address[1])
               for r in args.ratios.split(",")]
    base = results[0]
    print(f"{args.orders} orders at {args.rate:g}/s (2 requests each, both ends traced: 4 spans per order)")
    print(f"{'ratio':>6} {'spans':>7} {'OTLP bytes':>11} {'bytes/order':>12} {'bytes/s':>9} {'vs first':>9}")
    for r in results:
        print(f"{r['ratio']:>6g} {r['spans']:>7} {r['bytes']:>11} {r['bytes'] / r['orders']:>12.0f} "
              f"{r['bytes'] / r['seconds']:>9.0f} {r['bytes'] / max(1, base['bytes']):>9.3f}")


if __name__ == "__main__":
    main()
