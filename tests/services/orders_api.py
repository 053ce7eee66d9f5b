"""A small order API for the sampling test: POST /orders with {"order_id": ...} creates
an order (500 for ids ending in "-F", a failure), GET /orders/ID reads it. Threads,
keep-alive. Usage: orders_api.py PORT"""
import sys

from jsonhttp import JsonHandler, serve


class Handler(JsonHandler):
    # Head and body go in two writes: without this, Nagle and delayed ACKs add 40 ms.
    disable_nagle_algorithm = True
    orders: dict = {}

    def do_POST(self):
        order = self.json_body()
        oid = order.get("order_id", "")
        if oid.endswith("-F"):
            self.answer(500, {"order_id": oid, "error": "the model could not be stored"})
            return
        self.orders[oid] = "created"
        self.answer(201, {"order_id": oid, "status": "created"})

    def do_GET(self):
        oid = self.path.rsplit("/", 1)[-1]
        self.answer(200, {"order_id": oid, "status": self.orders.get(oid, "unknown")})


if __name__ == "__main__":
    serve(Handler, int(sys.argv[1]), announce=False)
