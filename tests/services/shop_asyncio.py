#!/usr/bin/env python3
"""An event-loop order service for sonde's whole-trace tests: no tracing code.

    shop_asyncio.py AMQP_PORT EXCHANGE ROUTING_KEY

One asyncio event loop (one thread) serves HTTP/1.1 on 127.0.0.1:0 and prints
"PORT n". POST /orders with {"order_id": ...}: waits 100 ms (so that the orders
arriving together are all in flight at once), publishes {"order_id": ..., "status":
"created"} to RabbitMQ on the loop's thread, then answers 201.
"""
import asyncio
import json
import sys

import pika

PORT, EXCHANGE, RK = int(sys.argv[1]), sys.argv[2], sys.argv[3]
params = pika.ConnectionParameters(host="127.0.0.1", port=PORT,
                                   credentials=pika.PlainCredentials("guest", "guest"), heartbeat=0)
channel = pika.BlockingConnection(params).channel()
channel.exchange_declare(EXCHANGE, exchange_type="direct")


async def handle(reader, writer):
    while True:
        head = await reader.readuntil(b"\r\n\r\n") if not reader.at_eof() else b""
        if not head:
            break
        lines = head.decode().split("\r\n")
        length = next((int(l.split(":", 1)[1]) for l in lines if l.lower().startswith("content-length:")), 0)
        body = json.loads(await reader.readexactly(length) if length else b"{}")
        await asyncio.sleep(0.1)
        oid = body.get("order_id")
        channel.basic_publish(EXCHANGE, RK, json.dumps({"order_id": oid, "status": "created"}).encode(),
                              pika.BasicProperties(content_type="application/json"))
        out = json.dumps({"order_id": oid, "status": "created"}).encode()
        writer.write(b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Length: "
                     + str(len(out)).encode() + b"\r\n\r\n" + out)
        await writer.drain()
        if any(l.lower() == "connection: close" for l in lines):
            break
    writer.close()


async def main():
    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    print(f"PORT {srv.sockets[0].getsockname()[1]}", flush=True)
    await srv.serve_forever()


asyncio.run(main())
