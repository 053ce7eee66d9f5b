#!/usr/bin/env python3
"""AMQP 0-9-1 publisher and consumer (pika) for sonde's integration tests. Prints one
JSON object on stdout when done; the consumer prints READY first, once it consumes.

  pika_client.py consume --port P [--exchange E --type T] --queue Q:KEY... --count N
                 [--ack manual|auto] [--requeue-first]
      settles N messages; --requeue-first nacks (requeue) each message's first
      delivery and acks its redelivery
  pika_client.py publish --port P [--exchange E --type T] --rk K --count N --size B
                 [--confirm] [--id PREFIX]
"""
import argparse
import json
import sys

import pika


def body(i, size):
    head = '{"order_id":%d,"pad":"' % i
    tail = '"}'
    return (head + "x" * max(0, size - len(head) - len(tail)) + tail).encode()


def connect(port):
    params = pika.ConnectionParameters(host="127.0.0.1", port=port,
                                       credentials=pika.PlainCredentials("guest", "guest"),
                                       heartbeat=0)
    return pika.BlockingConnection(params)


def consume(a):
    conn = connect(a.port)
    ch = conn.channel()
    if a.exchange:
        ch.exchange_declare(a.exchange, exchange_type=a.type, durable=False)
    auto = a.ack == "auto"
    received = []
    settled = 0

    def on_message(ch, method, props, data, queue):
        nonlocal settled
        received.append({"queue": queue, "routing_key": method.routing_key, "size": len(data),
                         "redelivered": method.redelivered, "delivery_tag": method.delivery_tag,
                         "message_id": props.message_id})
        if auto:
            settled += 1
        elif a.requeue_first and not method.redelivered:
            ch.basic_nack(method.delivery_tag, requeue=True)
        else:
            ch.basic_ack(method.delivery_tag)
            settled += 1
        if settled >= a.count:
            ch.stop_consuming()

    for spec in a.queue:
        queue, _, key = spec.partition(":")
        ch.queue_declare(queue, durable=False)
        if a.exchange:
            ch.queue_bind(queue, a.exchange, routing_key=key)
        ch.basic_consume(queue, lambda c, m, p, d, q=queue: on_message(c, m, p, d, q),
                         auto_ack=auto)
    print("READY", flush=True)
    conn.call_later(60, lambda: sys.exit("timed out with %d deliveries" % len(received)))
    ch.start_consuming()
    ch.close()
    conn.close()
    print(json.dumps({"received": received}), flush=True)


def publish(a):
    conn = connect(a.port)
    ch = conn.channel()
    if a.exchange:
        ch.exchange_declare(a.exchange, exchange_type=a.type, durable=False)
    if a.confirm:
        ch.confirm_delivery()
    for i in range(1, a.count + 1):
        props = pika.BasicProperties(content_type="application/json",
                                     message_id="%s-%d" % (a.id, i),
                                     correlation_id="order-%d" % i)
        ch.basic_publish(a.exchange, a.rk, body(i, a.size), props)
    ch.close()
    conn.close()
    print(json.dumps({"published": a.count, "acked": a.count if a.confirm else 0}), flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("cmd", choices=["consume", "publish"])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--exchange", default="")
    p.add_argument("--type", default="direct")
    p.add_argument("--queue", action="append", default=[])
    p.add_argument("--rk", default="")
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--ack", default="manual", choices=["manual", "auto"])
    p.add_argument("--requeue-first", action="store_true")
    p.add_argument("--confirm", action="store_true")
    p.add_argument("--id", default="py")
    a = p.parse_args()
    consume(a) if a.cmd == "consume" else publish(a)


if __name__ == "__main__":
    main()
