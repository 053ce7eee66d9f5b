"""The pika publisher of the AMQP injection tests: publishes each case of CASES to
QUEUE (default exchange) on one channel, and prints what it sent as one JSON line
per case (the same shape as amqp_consumer.py's).

usage: amqp_publisher.py PORT QUEUE
"""
import json
import sys

import pika

from amqp_consumer import PROPS, plain

GIVEN = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
BIG = bytes(range(256)) * 800  # 204,800 bytes, every byte value

CASES = [
    ("no_properties", pika.BasicProperties(), b"plain body"),
    ("headers_and_more", pika.BasicProperties(
        content_type="application/json", content_encoding="identity",
        headers={"x-order": "7", "n": 5, "nested": {"a": b"\x00\x01"}, "list": [1, "two"]},
        delivery_mode=2, priority=3, correlation_id="order-7", reply_to="replies",
        expiration="60000", message_id="m-2", timestamp=1700000000, type="order.created",
        app_id="shop"), b'{"order_id":7}'),
    ("content_type_only", pika.BasicProperties(content_type="text/plain", message_id="m-3"),
     b"text"),
    ("big_body", pika.BasicProperties(message_id="m-4", headers={}), BIG),
    ("traceparent_given", pika.BasicProperties(headers={"traceparent": GIVEN, "k": "v"}),
     b"given"),
]


def main() -> None:
    port, queue = int(sys.argv[1]), sys.argv[2]
    params = pika.ConnectionParameters(host="127.0.0.1", port=port, heartbeat=0,
                                       credentials=pika.PlainCredentials("guest", "guest"))
    conn = pika.BlockingConnection(params)
    ch = conn.channel()
    ch.confirm_delivery()
    for name, props, body in CASES:
        ch.basic_publish("", queue, body, props)
        print(json.dumps({"case": name, "props": {p: plain(getattr(props, p)) for p in PROPS},
                          "body": body.hex()}), flush=True)
    ch.close()
    conn.close()


if __name__ == "__main__":
    main()
