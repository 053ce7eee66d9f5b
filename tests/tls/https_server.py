#!/usr/bin/env python3
"""HTTPS server for sonde's TLS tests: http.server with HTTP/1.1 keep-alive behind
Python's ssl module (OpenSSL's SSL_read_ex/SSL_write_ex from libssl.so.3).

  https_server.py CERT KEY      listens on 127.0.0.1:0, prints "PORT n"

Routes as tests/go/main.go: GET /orders/{id}, GET /big?size=N, POST /upload,
GET /missing (404), GET /boom (500).
"""
import http.server
import json
import re
import ssl
import sys
from urllib.parse import parse_qs, urlsplit


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        sys.stderr.write(fmt % args + "\n")

    def send(self, status, body, ctype="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        url = urlsplit(self.path)
        m = re.fullmatch(r"/orders/([^/]+)", url.path)
        if m:
            self.send(200, json.dumps({"order_id": m.group(1), "status": "created"}).encode())
        elif url.path == "/big":
            size = int(parse_qs(url.query)["size"][0])
            self.send(200, b"b" * size, "application/octet-stream")
        elif url.path == "/boom":
            self.send(500, b"boom\n", "text/plain")
        else:
            self.send(404, b"not found\n", "text/plain")

    def do_POST(self):
        n = int(self.headers.get("Content-Length", "0"))
        left = n
        while left:
            chunk = self.rfile.read(min(left, 65536))
            if not chunk:
                break
            left -= len(chunk)
        self.send(200, json.dumps({"received": n - left}).encode())


def main():
    cert, key = sys.argv[1], sys.argv[2]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(["http/1.1"])
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    print(f"PORT {srv.server_address[1]}", flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
