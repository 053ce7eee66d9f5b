#!/usr/bin/env python3
"""The demo's customers (standard library only, no tracing code).

    customer.py SHOP_URL ORDERS_JSON INTERVAL

ORDERS_JSON: a list of {"order_id", "model" (a file path), "material"}. Each order is
POSTed to the Shop on a thread of its own; the next one starts once the previous order
is over or INTERVAL seconds have passed, whichever comes first. After its POST the
customer polls GET /orders/{id} once a second until the order is done or failed. An
order the Shop answered 202 (queued: no production line took it) is not polled. One
JSON line per order on stdout when it is over: {"order_id", "http_status", "status",
"failed_stage", "sent_ns", "ended_ns"}.
"""
import json
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

POLL_LIMIT = 120.0
lock = threading.Lock()


def post(shop, order):
    boundary = uuid.uuid4().hex
    model = Path(order["model"])
    parts = [
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"material\"\r\n\r\n{order['material']}\r\n".encode(),
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"customer\"\r\n\r\n{order.get('customer', 'demo')}\r\n".encode(),
        (f"--{boundary}\r\nContent-Disposition: form-data; name=\"model\"; filename=\"{model.name}\"\r\n"
         "Content-Type: model/stl\r\n\r\n").encode() + model.read_bytes() + b"\r\n",
        f"--{boundary}--\r\n".encode(),
    ]
    req = urllib.request.Request(f"{shop}/orders", data=b"".join(parts), method="POST", headers={
        "Content-Type": f"multipart/form-data; boundary={boundary}", "X-Order-Id": order["order_id"]})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, {"error": e.read().decode(errors="replace")}
    except OSError as e:
        return 0, {"error": str(e)}


def poll(shop, order_id):
    deadline = time.monotonic() + POLL_LIMIT
    body = {}
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{shop}/orders/{order_id}", timeout=10) as r:
                body = json.loads(r.read())
        except (urllib.error.HTTPError, OSError) as e:
            body = {"status": "unknown", "error": str(e)}
        if body.get("status") in ("done", "failed"):
            return body
        time.sleep(1.0)
    return body


def one(shop, order, over: threading.Event):
    sent = time.time_ns()
    code, body = post(shop, order)
    status, stage = body.get("status", "error"), None
    if code == 201:
        final = poll(shop, order["order_id"])
        status, stage = final.get("status", "unknown"), final.get("failed_stage")
    elif code != 202:
        status = f"http_{code}"
    with lock:
        print(json.dumps({"order_id": order["order_id"], "http_status": code, "status": status,
                          "failed_stage": stage, "sent_ns": sent, "ended_ns": time.time_ns()}), flush=True)
    over.set()


def main():
    shop, orders, interval = sys.argv[1], json.loads(sys.argv[2]), float(sys.argv[3])
    threads = []
    for order in orders:
        over = threading.Event()
        t = threading.Thread(target=one, args=(shop, order, over))
        t.start()
        threads.append(t)
        over.wait(interval)
    for t in threads:
        t.join()


if __name__ == "__main__":
    main()
