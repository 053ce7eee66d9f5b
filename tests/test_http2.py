"""HTTP/2 and gRPC (issue 13): the real agent, real HTTP/2 servers and clients.

Go's net/http with its defaults (HTTP/2 over TLS through ALPN, requests multiplexed on
one connection, Go crypto/tls), curl --http2 (OpenSSL) against it, curl
--http2-prior-knowledge against Go's h2c server (plaintext), curl --http2 upgrading an
HTTP/1.1 connection to h2c (`Upgrade: h2c`, x/net's h2c handler), nginx with `http2 on`, and
gRPC unary calls between Python grpcio client and server over h2c, and between Go
google.golang.org/grpc client and server over TLS (tests/grpc-go). Every test asserts
exactly one server span and one client span per request or call, their method, path,
status and gRPC fields, network.protocol.version=2, and the server span as the child of
its client span (same node, same connection). grpcio writes a header block over 25
iovecs of one sendmsg: the probes copy up to 64. Runs as root.
"""
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from clientlib import (
    GO_SERVICE, TOOLS, HttpsServer, SETUP_HINT, check_https_pair, exactly,
    make_cert, require_go, run_json, start_port_server, wait_tls_attached,
)
from sonde_testlib import (
    CLIENT, PY, SERVER, STATUS_ERROR, STATUS_UNSET, TESTS, by_kind, descendants, fmt_spans,
    free_port, wait_listening,
)

CURL = shutil.which("curl") or "/usr/bin/curl"
GRPC_GO = Path(os.environ.get("SONDE_GRPC_GO", TOOLS / "sonde-grpc-go"))


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    return make_cert(tmp_path_factory.mktemp("tls"))


def start_go_h2(tmp_path, agent, cert=None):
    go = require_go()
    args = ["-cert", cert.cert, "-key", cert.key] if cert else ["-h2c"]
    s = start_port_server([go, "h2-server", *args], tmp_path, "go h2-server")
    if cert:
        wait_tls_attached(agent, go)
    return s


def by_path(spans):
    out = {}
    for s in spans:
        out.setdefault(s.attrs.get("url.path"), []).append(s)
    return out


def route_of(path):
    return "/orders/{id}" if path.startswith("/orders/") else path


def check_pairs(srv, cli, port, paths_status, *, scheme, ua=None):
    """One server and one client span per path, each pair linked, HTTP/2 attributes."""
    assert by_kind(srv, SERVER) == srv, f"server process produced non-server spans:\n{fmt_spans(srv)}"
    assert by_kind(cli, CLIENT) == cli, f"client process produced non-client spans:\n{fmt_spans(cli)}"
    sp, cp = by_path(srv), by_path(cli)
    for path, status in paths_status:
        assert len(sp.get(path, [])) == 1 and len(cp.get(path, [])) == 1, (
            f"expected one server and one client span for {path}:\n{fmt_spans(srv + cli)}")
        check_https_pair(sp[path][0], cp[path][0], port, srv + cli, method="GET", path=path,
                         route=route_of(path), status=status, version="2", scheme=scheme, ua=ua)


def run_curl_h2(urls, extra):
    """One curl process for these URLs (one connection); returns its pid and
    [(http_version, code)] per URL."""
    cmd = [CURL, "-sS", "-w", "%{http_version} %{http_code}\\n", *extra]
    for u in urls:
        cmd += ["-o", "/dev/null", u]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         stdin=subprocess.DEVNULL)
    out, err = p.communicate(timeout=60)
    got = [tuple(line.split()) for line in out.splitlines()]
    assert p.returncode == 0 and len(got) == len(urls), f"curl failed ({p.returncode}): {err}\n{out}"
    return p.pid, got


def test_go_default_https_multiplexed_streams(agent, cert, tmp_path, t0):
    """Go client and server with their defaults: HTTP/2 over TLS; one request makes the
    connection, then 8 concurrent ones are streams on it (one ends in 404)."""
    s = start_go_h2(tmp_path, agent, cert)
    try:
        n = 8
        c = run_json([require_go(), "h2-client", "-ca", cert.cert, "-base",
                      f"https://127.0.0.1:{s.port}", "-n", n], what="go h2-client")
        resp = c.out["responses"]
        assert all(r["proto"] == "HTTP/2.0" for r in resp), c.out
        assert all(r["reused"] for r in resp[1:]), f"requests not on one connection: {c.out}"
        paths = [(r["path"], r["status"]) for r in resp]
        assert ("/missing", 404) in paths
        srv = exactly(agent, s.pids, n + 1, "from the Go h2 server")
        cli = exactly(agent, [c.pid], n + 1, "from the Go h2 client")
        check_pairs(srv, cli, s.port, paths, scheme="https", ua="sonde-test-go-h2/")
        for sp in srv + cli:
            assert sp.service == GO_SERVICE, f"service.name: {sp}"
            assert t0 - 2_000_000_000 <= sp.start <= time.time_ns(), f"start outside the test: {sp}"
    finally:
        s.stop()


def test_curl_http2_against_go_https(agent, cert, tmp_path):
    """curl --http2 (OpenSSL, ALPN h2) against Go's default HTTPS server: two requests on
    one connection."""
    s = start_go_h2(tmp_path, agent, cert)
    try:
        paths = [("/orders/31", 200), ("/missing", 404)]
        pid, got = run_curl_h2([f"https://127.0.0.1:{s.port}{path}" for path, _ in paths],
                             ["--http2", "--cacert", str(cert.cert)])
        assert got == [("2", "200"), ("2", "404")], got
        srv = exactly(agent, s.pids, 2, "from the Go h2 server (curl)")
        cli = exactly(agent, [pid], 2, "from curl")
        check_pairs(srv, cli, s.port, paths, scheme="https", ua="curl/")
    finally:
        s.stop()


def test_curl_prior_knowledge_against_go_h2c(agent, tmp_path):
    """curl --http2-prior-knowledge against Go's plaintext HTTP/2 server (h2c): the
    preface is on the socket, no TLS library involved. One request per curl (curl 7.88
    fails its second request on a prior-knowledge connection to Go's server)."""
    s = start_go_h2(tmp_path, agent)
    try:
        paths = [("/orders/41", 200), ("/missing", 404)]
        pids = []
        for path, status in paths:
            pid, got = run_curl_h2([f"http://127.0.0.1:{s.port}{path}"], ["--http2-prior-knowledge"])
            assert got == [("2", str(status))], got
            pids.append(pid)
        srv = exactly(agent, s.pids, 2, "from the Go h2c server")
        cli = exactly(agent, pids, 2, "from the curl processes")
        check_pairs(srv, cli, s.port, paths, scheme="http", ua="curl/")
    finally:
        s.stop()


def test_curl_http2_upgrade_against_go_h2c(agent, tmp_path):
    """curl --http2 on plaintext asks to upgrade (HTTP/1.1 `Upgrade: h2c`); Go's x/net
    h2c handler answers 101 and the connection goes on as HTTP/2. The upgrading request
    is one exchange (no span for the 101) whose response is read on stream 1; the second
    URL is stream 3 of the same connection."""
    go = require_go()
    s = start_port_server([go, "h2-server", "-h2c-upgrade"], tmp_path, "go h2-server -h2c-upgrade")
    try:
        paths = [("/orders/51", 200), ("/missing", 404)]
        pid, got = run_curl_h2([f"http://127.0.0.1:{s.port}{path}" for path, _ in paths],
                               ["--http2"])
        assert got == [("2", "200"), ("2", "404")], got
        srv = exactly(agent, s.pids, 2, "from the Go h2c server (upgrade)")
        cli = exactly(agent, [pid], 2, "from curl (upgrade)")
        everything = srv + cli
        assert all(sp.attrs.get("http.response.status_code") != 101 for sp in everything), (
            f"the 101 became a span of its own:\n{fmt_spans(everything)}")
        sp, cp = by_path(srv), by_path(cli)
        # The upgrading request went as HTTP/1.1 (its response as HTTP/2 on stream 1).
        for (path, status), version in zip(paths, ["1.1", "2"]):
            assert len(sp.get(path, [])) == 1 and len(cp.get(path, [])) == 1, (
                f"expected one server and one client span for {path}:\n{fmt_spans(everything)}")
            check_https_pair(sp[path][0], cp[path][0], s.port, everything, method="GET",
                             path=path, route=route_of(path), status=status, version=version,
                             scheme="http", ua="curl/")
        # One connection: the server saw one peer port.
        assert len({x.attrs.get("network.peer.port") for x in srv}) == 1, fmt_spans(srv)
    finally:
        s.stop()


NGINX_H2_CONF = """\
daemon off;
master_process on;
worker_processes 1;
user root;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log {d}/access.log;
    client_body_temp_path {d}/tmp/client_body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
    server {{
        listen 127.0.0.1:{port} ssl {http2_listen};
        {http2_on}
        server_name localhost;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        location /orders/ {{
            default_type application/json;
            return 200 '{{"status":"created"}}';
        }}
        location = /missing {{ return 404; }}
    }}
}}
"""


def test_nginx_http2_on(agent, cert, tmp_path):
    """Our own nginx with `http2 on` (or `listen ... http2` before nginx 1.25.1), through
    OpenSSL, curl --http2: two requests on one connection."""
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.path.exists(nginx):
        pytest.fail("nginx is not installed (scripts/setup.sh installs it)", pytrace=False)
    d = tmp_path / "nginx-h2"
    (d / "tmp").mkdir(parents=True)
    port = free_port()
    conf = d / "nginx.conf"
    # `http2 on` from nginx 1.25.1; older ones (Debian 12 has 1.22) take it on `listen`.
    v = subprocess.run([nginx, "-v"], capture_output=True, text=True).stderr
    version = tuple(int(x) for x in v.strip().rsplit("/", 1)[-1].split(".")[:3])
    on = version >= (1, 25, 1)
    conf.write_text(NGINX_H2_CONF.format(d=d, port=port, cert=cert.cert, key=cert.key,
                                         http2_listen="" if on else "http2",
                                         http2_on="http2 on;" if on else ""))
    log = d / "stderr.log"
    proc = subprocess.Popen([nginx, "-p", str(d), "-e", str(d / "error.log"), "-c", str(conf)],
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    s = HttpsServer(proc, port, "nginx", log)
    try:
        wait_listening(port, proc, what="nginx (http2)", log=log)
        deadline = time.monotonic() + 10
        while len(descendants(proc.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # the TLS uprobes of the new worker
        paths = [("/orders/51", 200), ("/missing", 404)]
        pid, got = run_curl_h2([f"https://127.0.0.1:{port}{path}" for path, _ in paths],
                               ["--http2", "--cacert", str(cert.cert)])
        assert got == [("2", "200"), ("2", "404")], got
        srv = exactly(agent, s.pids, 2, "from nginx (http2)")
        cli = exactly(agent, [pid], 2, "from curl")
        check_pairs(srv, cli, port, paths, scheme="https", ua="curl/")
    finally:
        s.stop()


def require_grpcio():
    r = subprocess.run([PY, "-c", "import grpc"], capture_output=True)
    if r.returncode != 0:
        pytest.fail(f"grpcio is not installed in {PY}: {SETUP_HINT}", pytrace=False)


GRPC_CALLS = ["7", "8", "missing"]


def grpc_calls(agent, tmp_path):
    """grpcio server and client (plaintext h2c), three unary calls on one channel: two
    OK, one that ends in NOT_FOUND (status 5 in the trailers)."""
    require_grpcio()
    script = TESTS / "grpc" / "orders.py"
    srv = start_port_server([PY, script, "serve"], tmp_path, "grpc server")
    try:
        c = run_json([PY, script, "call", "--port", srv.port, *GRPC_CALLS], what="grpc client")
        assert c.out == {"7": "OK", "8": "OK", "missing": "NOT_FOUND"}, c.out
        spans = exactly(agent, srv.pids, len(GRPC_CALLS), "from the grpc server")
    finally:
        srv.stop()
    return srv, c, spans


def check_grpc_span(sp, port, ctx):
    a = sp.attrs
    ctx = f"{sp}\n--- all ---\n{ctx}"
    assert sp.name == "sonde.test.Orders/Get", ctx
    assert a.get("rpc.system") == "grpc", ctx
    assert a.get("rpc.service") == "sonde.test.Orders", ctx
    assert a.get("rpc.method") == "Get", ctx
    assert a.get("http.request.method") == "POST", ctx
    assert a.get("url.path") == "/sonde.test.Orders/Get", ctx
    assert a.get("http.response.status_code") == 200, ctx
    assert a.get("network.protocol.version") == "2", ctx
    assert a.get("server.port") == port, ctx
    assert "sonde.http2.header_table_unknown" not in a, ctx
    failed = a.get("rpc.grpc.status_code") == 5
    assert sp.status_code == (STATUS_ERROR if failed else STATUS_UNSET), ctx
    assert (a.get("error.type") == "5") == failed, ctx


def test_grpc_python_server_spans(agent, tmp_path):
    """The grpcio server's side: one server span per call with the rpc.* attributes,
    the status from the trailers, NOT_FOUND an error."""
    srv, _, spans = grpc_calls(agent, tmp_path)
    assert by_kind(spans, SERVER) == spans, fmt_spans(spans)
    for sp in spans:
        check_grpc_span(sp, srv.port, fmt_spans(spans))
    codes = sorted(sp.attrs.get("rpc.grpc.status_code", -1) for sp in spans)
    assert codes == [0, 0, 5], fmt_spans(spans)


def test_grpc_python_client_spans_linked(agent, tmp_path):
    """The grpcio client's side: one client span per call, the parent of its server
    span."""
    srv, c, spans = grpc_calls(agent, tmp_path)
    cli = exactly(agent, [c.pid], len(GRPC_CALLS), "from the grpc client")
    everything = fmt_spans(spans + cli)
    assert by_kind(cli, CLIENT) == cli, everything
    for sp in cli:
        check_grpc_span(sp, srv.port, everything)
    by_id = {sp.span_id: sp for sp in cli}
    for sp in spans:
        parent = by_id.get(sp.parent_span_id)
        assert parent is not None and parent.trace_id == sp.trace_id, (
            f"server span not linked to a client span:\n{everything}")
        assert parent.attrs.get("rpc.grpc.status_code") == sp.attrs.get("rpc.grpc.status_code")


def require_grpc_go() -> Path:
    if not (GRPC_GO.is_file() and os.access(GRPC_GO, os.X_OK)):
        pytest.fail(f"Go gRPC test program missing at {GRPC_GO}: {SETUP_HINT}", pytrace=False)
    return GRPC_GO


def test_grpc_go_over_tls(agent, cert, tmp_path):
    """Go google.golang.org/grpc server and client over TLS (Go crypto/tls, ALPN h2),
    three unary calls on one connection, the last one NOT_FOUND: one server and one
    client span per call with the rpc.* attributes and the status from the trailers,
    NOT_FOUND an error on both sides, each server span the child of its client span."""
    go = require_grpc_go()
    srv = start_port_server([go, "serve", "-cert", cert.cert, "-key", cert.key], tmp_path,
                            "go grpc server")
    try:
        wait_tls_attached(agent, go)
        c = run_json([go, "call", "-ca", cert.cert, "-port", srv.port, *GRPC_CALLS],
                     what="go grpc client")
        assert c.out == {"7": "OK", "8": "OK", "missing": "NotFound"}, c.out
        spans = exactly(agent, srv.pids, len(GRPC_CALLS), "from the Go grpc server")
        cli = exactly(agent, [c.pid], len(GRPC_CALLS), "from the Go grpc client")
    finally:
        srv.stop()
    everything = fmt_spans(spans + cli)
    assert by_kind(spans, SERVER) == spans, everything
    assert by_kind(cli, CLIENT) == cli, everything
    for sp in spans + cli:
        check_grpc_span(sp, srv.port, everything)
        assert sp.service == "sonde-grpc-go", f"service.name: {sp}"
        assert sp.attrs.get("url.scheme") == "https", f"url.scheme: {sp}\n{everything}"
    peers = {sp.attrs.get("network.peer.port") for sp in spans}
    assert len(peers) == 1, f"calls not on one connection:\n{everything}"
    for side in (spans, cli):
        codes = sorted(sp.attrs.get("rpc.grpc.status_code", -1) for sp in side)
        assert codes == [0, 0, 5], everything
    by_id = {sp.span_id: sp for sp in cli}
    for sp in spans:
        parent = by_id.get(sp.parent_span_id)
        assert parent is not None and parent.trace_id == sp.trace_id, (
            f"server span not linked to a client span:\n{everything}")
        assert parent.attrs.get("rpc.grpc.status_code") == sp.attrs.get("rpc.grpc.status_code")


def test_http2_counters_are_on_metrics(agent):
    """What the HTTP/2 parser drops or reads only in part is counted on /metrics."""
    code, body = agent.get("/metrics")
    assert code == 200
    for name in ("sonde_http2_streams_dropped_total", "sonde_http2_header_blocks_too_large_total",
                 "sonde_http2_header_blocks_undecodable_total", "sonde_http2_sync_lost_total",
                 "sonde_http2_header_table_unknown_total"):
        assert any(line.startswith(name + " ") for line in body.splitlines()), f"{name} missing:\n{body}"
