"""The consumer of the AMQP injection tests (pika): declares QUEUE, prints READY,
then prints one JSON line per message received (its properties exactly as the broker
delivered them, and its body in hex), acks it, and exits after COUNT.

usage: amqp_consumer.py PORT QUEUE COUNT
"""
import json
import sys

import pika

PROPS = ["content_type", "content_encoding", "headers", "delivery_mode", "priority",
         "correlation_id", "reply_to", "expiration", "message_id", "timestamp", "type",
         "user_id", "app_id", "cluster_id"]


def plain(v):
    """A header value as JSON can carry it: bytes as {"bytes": hex}."""
    if isinstance(v, bytes):
        return {"bytes": v.hex()}
    if isinstance(v, dict):
        return {k: plain(x) for k, x in v.items()}
    if isinstance(v, list):
        return [plain(x) for x in v]
    return v


def main() -> None:
    port, queue, count = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    params = pika.ConnectionParameters(host="127.0.0.1", port=port, heartbeat=0,
                                       credentials=pika.PlainCredentials("guest", "guest"))
    conn = pika.BlockingConnection(params)
    ch = conn.channel()
    ch.queue_declare(queue, durable=False, auto_delete=False)
    print("READY", flush=True)
    got = 0
    for method, props, body in ch.consume(queue, auto_ack=False, inactivity_timeout=60):
        if method is None:
            raise SystemExit(f"no message within 60 s after {got} of {count}")
        print(json.dumps({"props": {p: plain(getattr(props, p)) for p in PROPS},
                          "body": body.hex()}), flush=True)
        ch.basic_ack(method.delivery_tag)
        got += 1
        if got == count:
            break
    ch.cancel()
    ch.queue_delete(queue)
    conn.close()


if __name__ == "__main__":
    main()
