"""gRPC unary server and client of test_http2.py, with grpcio and no generated code:
the method /sonde.test.Orders/Get takes an order id as raw bytes and answers its
status, or NOT_FOUND for the id "missing". Plaintext (h2c), as services inside a
cluster often run.

    orders.py serve                     prints "PORT n" once listening on 127.0.0.1:n
    orders.py call --port N ID...       one unary call per id on one channel; prints
                                        {"id": "OK" | status name, ...}
"""
import argparse
import json
import sys
from concurrent import futures

import grpc

METHOD = "/sonde.test.Orders/Get"


def get(request: bytes, context: grpc.ServicerContext) -> bytes:
    if request == b"missing":
        context.abort(grpc.StatusCode.NOT_FOUND, "no such order")
    return b'{"order_id":"' + request + b'","status":"created"}'


def serve() -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    handler = grpc.method_handlers_generic_handler("sonde.test.Orders", {
        "Get": grpc.unary_unary_rpc_method_handler(get),
    })
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"PORT {port}", flush=True)
    server.wait_for_termination()


def call(port: int, ids: list[str]) -> None:
    out = {}
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = channel.unary_unary(METHOD)
        for i in ids:
            try:
                stub(i.encode(), timeout=30)
                out[i] = "OK"
            except grpc.RpcError as e:
                out[i] = e.code().name
    print(json.dumps(out), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("serve")
    c = sub.add_parser("call")
    c.add_argument("--port", type=int, required=True)
    c.add_argument("ids", nargs="+")
    a = ap.parse_args()
    if a.cmd == "serve":
        serve()
    else:
        call(a.port, a.ids)


if __name__ == "__main__":
    sys.exit(main())
