#!/usr/bin/env python3
"""A thread-per-request order service for sonde's whole-trace tests: no tracing code.

    shop.py CA DOWNSTREAM_BASE [--stall-path PATH]

Listens on 127.0.0.1:0 and prints "PORT n". POST /orders with {"order_id": ...}: runs
one child program per order (`sleep 0.05`, as a service would run a converter), then
GET DOWNSTREAM_BASE/orders/{id} over HTTPS (the downstream's certificate is CA), and
answers {"order_id": ..., "status": "accepted"}. GET /hang sleeps for the seconds in
?s= before answering (a stuck request).
"""
import ssl
import subprocess
import sys
import time
import urllib.parse
import urllib.request

from jsonhttp import JsonHandler, serve

CA, BASE = sys.argv[1], sys.argv[2]
CTX = ssl.create_default_context(cafile=CA)


class Handler(JsonHandler):
    def do_GET(self):
        url = urllib.parse.urlsplit(self.path)
        if url.path == "/hang":
            time.sleep(float(urllib.parse.parse_qs(url.query).get("s", ["1"])[0]))
            return self.answer(200, {"status": "late"})
        self.answer(404, {"error": "not found"})

    def do_POST(self):
        order = self.json_body()
        oid = order.get("order_id")
        if self.path != "/orders" or not oid:
            return self.answer(400, {"error": "bad order"})
        subprocess.run(["sleep", "0.05"], check=True)
        with urllib.request.urlopen(f"{BASE}/orders/{oid}", context=CTX, timeout=10) as r:
            r.read()
        self.answer(201, {"order_id": oid, "status": "accepted"})


serve(Handler)
