"""What the tests' small JSON services share: a thread-per-request HTTP/1.1 handler
that answers JSON, and a server that prints the port it got ("PORT n")."""
import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class JsonHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def answer(self, status, obj):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length", "0")))

    def json_body(self):
        return json.loads(self.body() or b"{}")


def serve(handler, port: int = 0, announce: bool = True) -> None:
    """Serves on 127.0.0.1:port (0: any free port, printed as "PORT n") for ever."""
    srv = ThreadingHTTPServer(("127.0.0.1", port), handler)
    if announce:
        print(f"PORT {srv.server_address[1]}", flush=True)
    srv.serve_forever()
