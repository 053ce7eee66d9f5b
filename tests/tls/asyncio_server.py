#!/usr/bin/env python3
"""HTTPS server for sonde's TLS tests on asyncio: its TLS runs on ssl.SSLObject with
memory BIOs (libssl.so.3), and the event loop moves every session's ciphertext on one
thread, as Node.js does.

  asyncio_server.py CERT KEY    listens on 127.0.0.1:0, prints "PORT n"

One route: GET /orders/{id} (HTTP/1.1 keep-alive, no request bodies).
"""
import asyncio
import json
import re
import ssl
import sys


async def serve(reader, writer):
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            path = head.split(b"\r\n", 1)[0].split(b" ")[1].decode()
            m = re.fullmatch(r"/orders/([^/]+)", path)
            if m:
                status, body = "200 OK", json.dumps({"order_id": m.group(1), "status": "created"}).encode()
            else:
                status, body = "404 Not Found", b"not found\n"
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def main(cert, key):
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=ctx)
    print(f"PORT {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
