#!/usr/bin/env python3
"""A small HTTP/1.1 server for sonde's integration tests (no tracing code in it).

Usage: app.py [PORT]   (0 or nothing: pick a free port; prints "PORT <n>" when listening)

Endpoints:
  GET  /orders/<id>        200, JSON body with Content-Length
  GET  /stream/chunks      200, Transfer-Encoding: chunked, CHUNKS chunks of CHUNK_BODY
  GET  /missing            404 with a small body
  GET  /boom               500 with a small body
  GET  /never              never answers: waits until the client gives up and closes its
                           end, then closes the connection without a response
  POST /upload             reads the whole body (streamed, discarded), 200 with its size
Keep-alive on (HTTP/1.1), one thread per connection.
"""
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CHUNKS = [b"first chunk\n", b"second, a little longer chunk\n", b"third\n"]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "sonde-test-app"
    sys_version = ""

    def log_message(self, format, *args):  # keep test output quiet
        pass

    def _send(self, code, body, ctype="application/json"):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        path = self.path.split("?", 1)[0]
        if path.startswith("/orders/"):
            oid = path[len("/orders/"):]
            self._send(200, json.dumps({"id": oid, "status": "created"}).encode())
        elif path == "/stream/chunks":
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for c in CHUNKS:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(c), c))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
        elif path == "/missing":
            self._send(404, b'{"error":"not found"}')
        elif path == "/boom":
            self._send(500, b'{"error":"internal"}')
        elif path == "/never":
            # Blocks until the client closes its end (EOF), then closes without a word.
            self.rfile.read(1)
            self.close_connection = True
        else:
            self._send(404, b'{"error":"no such endpoint"}')

    def do_POST(self):
        length = int(self.headers.get("Content-Length", "0"))
        left = length
        while left > 0:
            got = self.rfile.read(min(left, 1 << 20))
            if not got:
                break
            left -= len(got)
        self._send(200, json.dumps({"received": length - left}).encode())


def main():
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    srv = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    srv.daemon_threads = True
    print("PORT", srv.server_address[1], flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
