#!/usr/bin/env python3
"""HTTPS client for sonde's TLS tests: http.client over Python's ssl module, every
request on one keep-alive connection. Prints one JSON object on stdout.

  https_client.py [--delay SECONDS] [--pause-after N] CA HOST PORT REQ...
  https_client.py --concurrent CA HOST PORT REQ...

REQ is GET:/path or POST:/path:SIZE. With --delay the program sleeps first and only
then imports ssl (and http.client, which imports it), so libssl.so.3 is loaded into an
already running process: the agent must pick up a library mapped after exec.
With --pause-after N it prints PAUSED after the Nth response and waits for a line on
standard input before the next request (same connection).
With --concurrent the first REQ goes alone on a connection of its own, then every other
REQ at once, each from its own thread on its own connection (orders arriving together).
"""
import json
import sys
import time


def main(argv):
    pause_after = None
    concurrent = False
    while argv and argv[0].startswith("--"):
        if argv[0] == "--concurrent":
            concurrent = True
            argv = argv[1:]
            continue
        if argv[0] == "--delay":
            time.sleep(float(argv[1]))
        elif argv[0] == "--pause-after":
            pause_after = int(argv[1])
        else:
            sys.exit(f"unknown option {argv[0]}")
        argv = argv[2:]
    assert "ssl" not in sys.modules and "_ssl" not in sys.modules
    import http.client
    import ssl

    ca, host, port, specs = argv[0], argv[1], int(argv[2]), argv[3:]
    ctx = ssl.create_default_context(cafile=ca)
    ctx.set_alpn_protocols(["http/1.1"])
    if concurrent:
        print(json.dumps(run_concurrent(http.client, ctx, host, port, specs)))
        return
    conn = http.client.HTTPSConnection(host, port, context=ctx, timeout=120)
    out = []
    local = set()
    for i, spec in enumerate(specs):
        if i == pause_after:
            print("PAUSED", flush=True)
            sys.stdin.readline()
        parts = spec.split(":")
        method, path = parts[0], parts[1]
        body = b"p" * int(parts[2]) if method == "POST" else None
        headers = {"User-Agent": "sonde-test-pyhttps/1.0"}
        if body is not None:
            headers["Content-Type"] = "application/octet-stream"
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        local.add(conn.sock.getsockname())
        out.append({"method": method, "path": path, "status": resp.status, "len": len(data)})
    conn.close()
    print(json.dumps({"responses": out, "connections": len(local)}))


def one_request(http_client, ctx, host, port, spec, start=None):
    parts = spec.split(":")
    method, path = parts[0], parts[1]
    body = b"p" * int(parts[2]) if method == "POST" else None
    headers = {"User-Agent": "sonde-test-pyhttps/1.0"}
    if body is not None:
        headers["Content-Type"] = "application/octet-stream"
    conn = http_client.HTTPSConnection(host, port, context=ctx, timeout=120)
    if start is not None:
        start.wait()
    conn.request(method, path, body=body, headers=headers)
    resp = conn.getresponse()
    data = resp.read()
    local = conn.sock.getsockname()
    conn.close()
    return {"method": method, "path": path, "status": resp.status, "len": len(data),
            "local": list(local)}


def run_concurrent(http_client, ctx, host, port, specs):
    import threading
    out = [one_request(http_client, ctx, host, port, specs[0])]
    rest = specs[1:]
    results = [None] * len(rest)
    # Every thread starts together: handshakes and requests of all sessions interleave.
    start = threading.Barrier(len(rest))

    def worker(i):
        results[i] = one_request(http_client, ctx, host, port, rest[i], start)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(rest))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.extend(results)
    return {"responses": out, "connections": len({tuple(r["local"]) for r in out})}


if __name__ == "__main__":
    main(sys.argv[1:])
