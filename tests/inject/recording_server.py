"""An HTTP/1.1 server for the injection tests that records, byte for byte, what each
connection brought: `<dir>/<client port>.bin`. It answers every request (its
Content-Length body read whole) with `200 ok`, pipelined requests in order.

usage: recording_server.py PORT DIR
"""
import os
import socket
import sys
import threading


def serve(conn: socket.socket, directory: str) -> None:
    port = conn.getpeername()[1]
    received = bytearray()
    pending = bytearray()
    with conn:
        while True:
            chunk = conn.recv(65536)
            if not chunk:
                break
            received += chunk
            pending += chunk
            while True:
                end = pending.find(b"\r\n\r\n")
                if end < 0:
                    break
                head = bytes(pending[:end]).decode("latin-1").split("\r\n")
                length = 0
                for line in head[1:]:
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value.strip())
                if len(pending) < end + 4 + length:
                    break
                del pending[:end + 4 + length]
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    tmp = os.path.join(directory, f"{port}.tmp")
    with open(tmp, "wb") as f:
        f.write(received)
    os.rename(tmp, os.path.join(directory, f"{port}.bin"))


def main() -> None:
    port, directory = int(sys.argv[1]), sys.argv[2]
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port))
    srv.listen(64)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=serve, args=(conn, directory), daemon=True).start()


if __name__ == "__main__":
    main()
