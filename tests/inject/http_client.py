"""The client of the HTTP injection tests: sends each case on its own connection,
reads every response, and prints one JSON line per connection: its local port, the
requests it sent (hex), and what FIONREAD said while a response was waiting.

usage: http_client.py PORT
"""
import fcntl
import json
import select
import socket
import sys
import termios

BODY_1MIB = bytes(range(256)) * 4096
GIVEN = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def request(method: str, path: str, body: bytes = b"", extra: str = "") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}"
    if body or method == "POST":
        head += f"Content-Length: {len(body)}\r\n"
    return (head + "\r\n").encode() + body


def read_responses(sock: socket.socket, n: int) -> int:
    """Reads n `200 ok` responses; returns FIONREAD as seen once the first arrived."""
    want = len(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok") * n
    got = b""
    fionread = None
    while len(got) < want:
        select.select([sock], [], [], 10)
        if fionread is None:
            fionread = int.from_bytes(fcntl.ioctl(sock, termios.FIONREAD, b"\0\0\0\0"), "little")
        chunk = sock.recv(65536)
        if not chunk:
            raise SystemExit(f"connection closed after {len(got)} of {want} response bytes")
        got += chunk
    return fionread


def run(port: int, name: str, writes: list[bytes], requests: list[bytes], responses: int) -> None:
    sock = socket.create_connection(("127.0.0.1", port))
    for w in writes:
        sock.sendall(w)
    fionread = read_responses(sock, responses)
    local = sock.getsockname()[1]
    sock.close()
    print(json.dumps({"case": name, "port": local, "fionread": fionread,
                      "requests": [r.hex() for r in requests]}), flush=True)


def main() -> None:
    port = int(sys.argv[1])
    big = request("POST", "/upload/big", BODY_1MIB)
    run(port, "big_body_one_write", [big], [big], 1)
    head, _, _ = big.partition(b"\r\n\r\n")
    run(port, "big_body_head_then_body", [head + b"\r\n\r\n", BODY_1MIB], [big], 1)
    pipelined = [request("GET", "/pipe/a"), request("POST", "/pipe/b", b"x=1&y=2"),
                 request("GET", "/pipe/c")]
    run(port, "pipelined_one_write", [b"".join(pipelined)], pipelined, 3)
    run(port, "pipelined_three_writes", pipelined, pipelined, 3)
    given = request("GET", "/given", extra=f"traceparent: {GIVEN}\r\n")
    run(port, "traceparent_given", [given], [given], 1)
    split = request("GET", "/split")
    run(port, "head_split_over_two_writes", [split[:-2], split[-2:]], [split], 1)


if __name__ == "__main__":
    main()
