#!/usr/bin/env python3
"""A consumer for sonde's whole-trace tests: no tracing code.

    mes_consumer.py AMQP_PORT EXCHANGE ROUTING_KEY QUEUE CA DOWNSTREAM_BASE COUNT

Consumes COUNT messages one at a time (prefetch 1, manual ack). For each, GET
DOWNSTREAM_BASE/orders/{order_id} over HTTPS, then ack. Prints READY once consuming.
"""
import json
import ssl
import sys
import urllib.request

import pika

port, exchange, rk, queue, ca, base, count = sys.argv[1:8]
ctx = ssl.create_default_context(cafile=ca)
ch = pika.BlockingConnection(pika.ConnectionParameters(
    host="127.0.0.1", port=int(port), credentials=pika.PlainCredentials("guest", "guest"),
    heartbeat=0)).channel()
ch.exchange_declare(exchange, exchange_type="direct")
ch.queue_declare(queue)
ch.queue_bind(queue, exchange, rk)
ch.basic_qos(prefetch_count=1)
left = [int(count)]


def on_message(ch, method, props, body):
    oid = json.loads(body)["order_id"]
    with urllib.request.urlopen(f"{base}/orders/{oid}", context=ctx, timeout=10) as r:
        r.read()
    ch.basic_ack(method.delivery_tag)
    left[0] -= 1
    if left[0] == 0:
        ch.stop_consuming()


ch.basic_consume(queue, on_message)
print("READY", flush=True)
ch.start_consuming()
print(json.dumps({"consumed": int(count)}), flush=True)
