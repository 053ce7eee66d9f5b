#!/usr/bin/env python3
"""A model store and an order shop for `sonde orders`' tests: no tracing code.

    order_shop.py store
    order_shop.py shop STORE_PORT AMQP_PORT EXCHANGE ROUTING_KEY SLICER

Each listens on 127.0.0.1:0 (thread per request) and prints "PORT n".

store: PUT /models/NAME keeps the body and answers 200; a NAME containing "hang" makes
it wait ?wait= seconds first (default 30): a stuck store.

shop: POST /orders with {"order_id": ..., "model": ...}: PUTs a small STL model to the
store (plain HTTP, with an X-Order-Id header), runs SLICER MODEL (a separate program;
it exits 1 for a broken model), then publishes {"order_id", "status": "sliced"} to
RabbitMQ and answers 201 {"order_id", "status": "accepted"}; a failed slice answers 422
{"order_id", "status": "failed"}.
"""
import json
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request

from jsonhttp import JsonHandler, serve

STL = b"solid cube\n" + b"facet normal 0 0 1\n outer loop\n  vertex 0 0 1\n  vertex 1 0 1\n  vertex 0 1 1\n endloop\nendfacet\n" * 8 + b"endsolid cube\n"


class Store(JsonHandler):
    models = {}

    def do_PUT(self):
        url = urllib.parse.urlsplit(self.path)
        data = self.body()
        if "hang" in url.path:
            time.sleep(float(urllib.parse.parse_qs(url.query).get("wait", ["30"])[0]))
        self.models[url.path] = data
        self.answer(200, {"stored": len(data)})


class Shop(JsonHandler):
    lock = threading.Lock()

    def do_POST(self):
        order = self.json_body()
        oid, model = order.get("order_id"), order.get("model", "good")
        if self.path != "/orders" or not oid:
            return self.answer(400, {"error": "bad order"})
        req = urllib.request.Request(f"http://127.0.0.1:{STORE_PORT}/models/{oid}.stl", data=STL,
                                     method="PUT", headers={"X-Order-Id": oid,
                                                            "Content-Type": "model/stl"})
        with urllib.request.urlopen(req, timeout=60) as r:
            r.read()
        if subprocess.run([SLICER, model]).returncode != 0:
            return self.answer(422, {"order_id": oid, "status": "failed"})
        with self.lock:
            CHANNEL.basic_publish(EXCHANGE, RK, json.dumps({"order_id": oid, "status": "sliced"}).encode(),
                                  pika.BasicProperties(content_type="application/json"))
        self.answer(201, {"order_id": oid, "status": "accepted"})


if sys.argv[1] == "store":
    handler = Store
else:
    import pika
    STORE_PORT, AMQP_PORT, EXCHANGE, RK, SLICER = sys.argv[2:7]
    CHANNEL = pika.BlockingConnection(pika.ConnectionParameters(
        host="127.0.0.1", port=int(AMQP_PORT), credentials=pika.PlainCredentials("guest", "guest"),
        heartbeat=0)).channel()
    CHANNEL.exchange_declare(EXCHANGE, exchange_type="direct")
    handler = Shop
serve(handler)
