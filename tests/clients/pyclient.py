#!/usr/bin/env python3
"""HTTP clients for sonde's integration tests, run as their own processes so that
their spans can be selected by pid. Prints one JSON object on stdout.

  pyclient.py get HOST PORT PATH...            http.client, all requests on one connection
  pyclient.py upload HOST PORT SIZE PATH...    POST /upload with SIZE bytes, then GET each PATH,
                                               all on one connection
  pyclient.py pipeline HOST PORT PATH...       raw socket: every request in a single write
  pyclient.py garbage HOST PORT NBYTES         raw socket: NBYTES of non-HTTP bytes
"""
import http.client
import json
import random
import socket
import time
import sys


def cmd_get(host, port, paths):
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    out = []
    local = set()
    for p in paths:
        conn.request("GET", p, headers={"User-Agent": "sonde-test-pyclient/1.0"})
        resp = conn.getresponse()
        body = resp.read()
        local.add(conn.sock.getsockname() if conn.sock else None)
        out.append({"path": p, "status": resp.status, "len": len(body)})
    conn.close()
    return {"responses": out, "connections": len(local)}


def cmd_upload(host, port, size, paths):
    size = int(size)
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    out = []
    local = set()
    body = b"x" * size
    conn.request("POST", "/upload", body=body,
                 headers={"User-Agent": "sonde-test-pyclient/1.0",
                          "Content-Type": "application/octet-stream"})
    resp = conn.getresponse()
    rbody = resp.read()
    local.add(conn.sock.getsockname())
    out.append({"path": "/upload", "status": resp.status, "len": len(rbody),
                "body": rbody.decode(errors="replace")})
    for p in paths:
        conn.request("GET", p, headers={"User-Agent": "sonde-test-pyclient/1.0"})
        resp = conn.getresponse()
        rbody = resp.read()
        local.add(conn.sock.getsockname())
        out.append({"path": p, "status": resp.status, "len": len(rbody)})
    conn.close()
    return {"responses": out, "connections": len(local)}


def pipelined_gets(host, port, paths):
    """GET requests for every path, back to back; the last one asks to close."""
    reqs = []
    for i, p in enumerate(paths):
        last = i == len(paths) - 1
        reqs.append(
            f"GET {p} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: sonde-test-pipeline/1.0\r\n"
            + ("Connection: close\r\n" if last else "")
            + "\r\n"
        )
    return "".join(reqs).encode()


def cmd_pipeline(host, port, paths):
    data = pipelined_gets(host, port, paths)
    s = socket.create_connection((host, int(port)), timeout=30)
    s.sendall(data)  # one write: the server sees all requests at once
    got = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        got += chunk
    s.close()
    return {"bytes_sent": len(data), "writes": 1,
            "status_lines": got.count(b"HTTP/1.1 "), "bytes_received": len(got)}


def cmd_pipeline_slow_reader(host, port, paths):
    """As cmd_pipeline, but the first recv takes only the first response's head and a
    little body, then the client pauses before reading the rest in large reads: one of
    them holds the end of the first body and the next responses."""
    data = pipelined_gets(host, port, paths)
    s = socket.create_connection((host, int(port)), timeout=30)
    s.sendall(data)
    got = s.recv(2048)
    time.sleep(0.5)
    reads = 1
    while True:
        chunk = s.recv(1 << 20)
        if not chunk:
            break
        reads += 1
        got += chunk
    s.close()
    return {"bytes_sent": len(data), "reads": reads,
            "status_lines": got.count(b"HTTP/1.1 "), "bytes_received": len(got)}


def cmd_pipeline_late_reader(host, port, paths):
    """As cmd_pipeline, but the client waits before its first recv, then reads in 1 MiB
    reads: the first one holds several whole responses at once."""
    data = pipelined_gets(host, port, paths)
    s = socket.create_connection((host, int(port)), timeout=30)
    s.sendall(data)
    time.sleep(0.5)
    got = b""
    sizes = []
    while True:
        chunk = s.recv(1 << 20)
        if not chunk:
            break
        sizes.append(len(chunk))
        got += chunk
    s.close()
    return {"bytes_sent": len(data), "read_sizes": sizes,
            "status_lines": got.count(b"HTTP/1.1 "), "bytes_received": len(got)}


def cmd_garbage(host, port, nbytes):
    rnd = random.Random(1234)
    # Starts with bytes no HTTP method can start with; no CRLF CRLF in it.
    data = bytes([0x00, 0xFF, 0x13, 0x37]) + bytes(rnd.randrange(0x80, 0x100) for _ in range(int(nbytes) - 4))
    s = socket.create_connection((host, int(port)), timeout=5)
    s.sendall(data)
    s.shutdown(socket.SHUT_WR)
    got = b""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
    except socket.timeout:
        pass
    s.close()
    return {"bytes_sent": len(data), "bytes_received": len(got)}


def main():
    cmd, host, port, *rest = sys.argv[1:]
    if cmd == "get":
        res = cmd_get(host, port, rest)
    elif cmd == "upload":
        res = cmd_upload(host, port, rest[0], rest[1:])
    elif cmd == "pipeline":
        res = cmd_pipeline(host, port, rest)
    elif cmd == "pipeline-slow-reader":
        res = cmd_pipeline_slow_reader(host, port, rest)
    elif cmd == "pipeline-late-reader":
        res = cmd_pipeline_late_reader(host, port, rest)
    elif cmd == "garbage":
        res = cmd_garbage(host, port, rest[0])
    else:
        sys.exit(f"unknown command {cmd}")
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
