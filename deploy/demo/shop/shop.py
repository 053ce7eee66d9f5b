#!/usr/bin/env python3
"""The demo's Shop API: aiohttp (asyncio), no tracing code.

    shop.py PORT

Configuration from the environment: SHOP_AMQP (RabbitMQ URL), SHOP_STORE (S3
endpoint), SHOP_BUCKET, SHOP_CRM (CRM base URL, https), SHOP_CA (CA file for the
CRM's certificate), SHOP_ACCEPT_WAIT (seconds a new order waits for the MES to accept
it), AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (the store's credentials).

    POST /orders        multipart: `model` (an STL file), `material` (pla, resin),
                        `customer`; the header X-Order-Id is the customer's own id for
                        the order (so a retried POST is the same order). Puts the model
                        in the store, registers the order at the CRM, publishes
                        order.created.<material>, and waits up to SHOP_ACCEPT_WAIT s for
                        the MES to accept it: 201 when it did, 202 "queued" when not.
    GET  /orders/{id}   the order's last status, from the order.status events.
"""
import asyncio
import json
import os
import ssl
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import aio_pika
import aiohttp
import boto3
from aiohttp import web
from botocore.config import Config

FINAL = {"done", "failed"}


class Shop:
    def __init__(self):
        self.amqp_url = os.environ.get("SHOP_AMQP", "amqp://guest:guest@127.0.0.1:5672/")
        self.crm = os.environ.get("SHOP_CRM", "https://127.0.0.1:8443")
        self.bucket = os.environ.get("SHOP_BUCKET", "models")
        self.accept_wait = float(os.environ.get("SHOP_ACCEPT_WAIT", "15"))
        self.ssl = ssl.create_default_context(cafile=os.environ.get("SHOP_CA"))
        # Path-style keys (/bucket/orders/ID/model.stl); checksums only where S3 needs
        # them, so a PUT is one plain request.
        self.s3 = boto3.client(
            "s3", endpoint_url=os.environ.get("SHOP_STORE", "http://127.0.0.1:7070"),
            region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2},
                          request_checksum_calculation="when_required",
                          response_checksum_validation="when_required"))
        self.pool = ThreadPoolExecutor(4)
        self.orders: dict[str, dict] = {}
        self.changed: dict[str, asyncio.Event] = {}

    async def start(self, app):
        self.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=self.ssl))
        self.amqp = await aio_pika.connect_robust(self.amqp_url)
        self.channel = await self.amqp.channel()
        self.exchange = await self.channel.declare_exchange("shop", aio_pika.ExchangeType.TOPIC, durable=True)
        # Every production line's queue exists even while its line is down, so an order
        # for it waits in the queue instead of being dropped as unroutable.
        for line in ("pla", "resin"):
            q = await self.channel.declare_queue(f"mes.{line}", durable=True)
            await q.bind(self.exchange, f"order.created.{line}")
        statuses = await self.channel.declare_queue("shop.status", durable=True)
        await statuses.bind(self.exchange, "order.status")
        await statuses.consume(self.on_status)
        await self.blocking(self._ensure_bucket)

    async def stop(self, app):
        await self.http.close()
        await self.amqp.close()
        self.pool.shutdown(wait=False)

    def _ensure_bucket(self):
        try:
            self.s3.create_bucket(Bucket=self.bucket)
        except self.s3.exceptions.BucketAlreadyOwnedByYou:
            pass

    async def blocking(self, fn, *args, **kw):
        return await asyncio.get_running_loop().run_in_executor(self.pool, lambda: fn(*args, **kw))

    async def on_status(self, message: aio_pika.abc.AbstractIncomingMessage):
        async with message.process():
            event = json.loads(message.body)
            o = self.orders.setdefault(event["order_id"], {"order_id": event["order_id"], "history": []})
            o["status"] = event["status"]
            o["history"].append({"status": event["status"], "stage": event.get("stage") or None,
                                 "at": time.time()})
            if event["status"] == "failed":
                o["failed_stage"] = event.get("stage")
            ev = self.changed.get(event["order_id"])
            if ev:
                ev.set()

    async def create(self, request: web.Request):
        order_id = request.headers.get("X-Order-Id", "").strip()
        if not order_id or "/" in order_id:
            return web.json_response({"error": "the X-Order-Id header names the order (no '/')"}, status=400)
        form = await request.post()
        model = form.get("model")
        material = str(form.get("material", "pla"))
        if model is None or not hasattr(model, "file"):
            return web.json_response({"error": "the `model` field must be an uploaded STL file"}, status=400)
        if material not in ("pla", "resin"):
            return web.json_response({"error": f"unknown material {material!r} (pla, resin)"}, status=400)
        data = model.file.read()
        key = f"orders/{order_id}/model.stl"
        self.orders[order_id] = {"order_id": order_id, "status": "new", "history": []}
        self.changed[order_id] = asyncio.Event()
        await self.blocking(self.s3.put_object, Bucket=self.bucket, Key=key, Body=data,
                            ContentType="model/stl")
        async with self.http.post(f"{self.crm}/orders", json={
                "order_id": order_id, "customer": str(form.get("customer", "")), "material": material}) as r:
            if r.status >= 300:
                return web.json_response({"order_id": order_id, "error": f"CRM answered {r.status}"}, status=502)
        await self.exchange.publish(
            aio_pika.Message(json.dumps({"order_id": order_id, "model_key": key, "material": material}).encode(),
                             content_type="application/json", delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            routing_key=f"order.created.{material}")
        deadline = time.monotonic() + self.accept_wait
        while self.orders[order_id]["status"] == "new":
            left = deadline - time.monotonic()
            if left <= 0:
                return web.json_response({"order_id": order_id, "status": "queued"}, status=202)
            self.changed[order_id].clear()
            try:
                await asyncio.wait_for(self.changed[order_id].wait(), left)
            except asyncio.TimeoutError:
                pass
        return web.json_response({"order_id": order_id, "status": self.orders[order_id]["status"]}, status=201)

    async def show(self, request: web.Request):
        o = self.orders.get(request.match_info["order_id"])
        if o is None:
            return web.json_response({"error": "no such order"}, status=404)
        return web.json_response(o)


def main():
    port = int(sys.argv[1])
    shop = Shop()
    app = web.Application(client_max_size=16 * 1024 * 1024)
    app.router.add_post("/orders", shop.create)
    app.router.add_get("/orders/{order_id}", shop.show)
    app.on_startup.append(shop.start)
    app.on_cleanup.append(shop.stop)
    web.run_app(app, host="127.0.0.1", port=port, print=lambda *_: print("READY", flush=True),
                access_log=None)


if __name__ == "__main__":
    main()
