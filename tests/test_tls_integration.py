"""Integration over TLS (issue 3): the real agent, real HTTPS servers and clients.

OpenSSL as a shared library (curl, nginx, Python's ssl module: libssl.so.3), OpenSSL
linked statically into node, and Go's crypto/tls. Every test asserts the exact spans on
both ends, as over plain HTTP, with url.scheme=https and url.full https://...: how many,
kind, name, status code, key attributes, body sizes, and the server span as the child
of the client span on the same connection. Every server and client here starts after the
agent; test_started_after_agent_node_and_late_ssl_import makes that its point. Runs as
root.
"""
import pytest

from clientlib import (
    GO_SERVICE, NGINX_ORDER_BODY, NGINX_STATIC_SIZE, NODE, NODE_DIR, PY, TLS_DIR, Background,
    check_https_pair, exactly, make_cert, require_go, require_node, run_json, start_nginx_tls,
    start_port_server, wait_tls_attached,
)
from sonde_testlib import CLIENT, SERVER, Agent, by_kind, fmt_spans, run_curl

UPLOAD = 2 * 1024 * 1024
BIG = 1024 * 1024

# The requests of the keep-alive tests (one connection): (method, path, route, status).
KEEPALIVE = [
    ("GET", "/orders/1", "/orders/{id}", 200),
    ("GET", "/orders/22", "/orders/{id}", 200),
    ("GET", "/missing", "/missing", 404),
    ("GET", "/boom", "/boom", 500),
]


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    return make_cert(tmp_path_factory.mktemp("tls"))


def both_ends(agent, server, client_pid, n, what):
    srv = exactly(agent, server.pids, n, f"from the server ({what})")
    cli = exactly(agent, [client_pid], n, f"from the client ({what})")
    assert by_kind(srv, SERVER) == srv, f"server process produced non-server spans:\n{fmt_spans(srv)}"
    assert by_kind(cli, CLIENT) == cli, f"client process produced non-client spans:\n{fmt_spans(cli)}"
    return srv, cli


def specs(reqs):
    return [f"{m}:{p}" for m, p, _, _ in reqs]


def check_keepalive(agent, server, client, ua, t0, server_service, client_service, reqs=KEEPALIVE):
    assert client.out["connections"] == 1, f"client did not keep one connection: {client.out}"
    got = [(r["path"], r["status"]) for r in client.out["responses"]]
    assert got == [(p, st) for _, p, _, st in reqs], client.out
    srv, cli = both_ends(agent, server, client.pid, len(reqs), f"{len(reqs)} requests on one TLS connection")
    for s, c, (method, path, route, status), r in zip(srv, cli, reqs, client.out["responses"]):
        check_https_pair(s, c, server.port, srv + cli, method=method, path=path, route=route,
                         status=status, ua=ua, req_body=0, resp_body=r["len"], t0=t0)
    for s in srv:
        assert s.service == server_service, f"service.name: {s}"
    for s in cli:
        assert s.service == client_service, f"service.name: {s}"


def check_large(agent, server, client, ua, t0):
    """POST /upload of UPLOAD bytes, then GET /big?size=BIG, on one connection."""
    r = client.out["responses"]
    assert client.out["connections"] == 1, client.out
    assert [(x["path"], x["status"]) for x in r] == [("/upload", 200), (f"/big?size={BIG}", 200)], client.out
    assert r[1]["len"] == BIG, client.out
    srv, cli = both_ends(agent, server, client.pid, 2, "a 2 MB POST and a 1 MB response over TLS")
    try:
        check_https_pair(srv[0], cli[0], server.port, srv + cli, method="POST", path="/upload",
                         route="/upload", status=200, ua=ua, req_body=UPLOAD, resp_body=r[0]["len"],
                         t0=t0)
        check_https_pair(srv[1], cli[1], server.port, srv + cli, method="GET", path="/big",
                         query=f"size={BIG}", route="/big", status=200, ua=ua, req_body=0,
                         resp_body=BIG, t0=t0)
    except AssertionError as e:
        # Large bodies are where events get lost: say whether any were, and where.
        raise AssertionError(f"{e}\n--- the agent's loss counters (whole module) ---\n"
                             f"{loss_counters(agent)}") from None


LOSS_COUNTERS = ("sonde_events_lost", "sonde_bytes_skipped", "sonde_message_starts_missed",
                 "sonde_parse_failures", "sonde_events_malformed", "sonde_connections_evicted",
                 "sonde_tls_sockets_")


def loss_counters(agent):
    return "\n".join(line for line in agent.get("/metrics")[1].splitlines()
                     if line.startswith(LOSS_COUNTERS))


# ---------------------------------------------------------------- before the agent

def test_connection_opened_before_agent(cert, tmp_path, t0):
    """A keep-alive HTTPS connection (Python on both ends, libssl.so.3) is open, with one
    exchange done, before the agent starts; the agent must trace the exchanges that follow
    on it. Its own agent: this test runs before the module's.

    One thing no uprobe can give: the server's thread sits inside SSL_read_ex, waiting, when
    the agent attaches, so that call's return is never probed and the first request after
    the start (/orders/2) may be invisible on the server's side. Every later one must be
    complete on both sides, and every one on the client's."""
    s = start_port_server([PY, TLS_DIR / "https_server.py", cert.cert, cert.key], tmp_path,
                          "https_server.py")
    paths = ["/orders/1", "/orders/2", "/orders/3", "/orders/4"]
    c = Background([PY, TLS_DIR / "https_client.py", "--pause-after", "1", cert.cert, "127.0.0.1",
                    s.port, *[f"GET:{p}" for p in paths]],
                   "https_client.py --pause-after 1", stdin=True)
    agent = Agent(tmp_path / "agent")
    try:
        c.wait_ready(marker="PAUSED")
        agent.start()
        c.send_line()
        run = c.finish()
        assert run.out["connections"] == 1 and [r["status"] for r in run.out["responses"]] == [200] * 4
        cli = exactly(agent, [run.pid], 3, "from the client (the 3 exchanges after the agent started)")
        srv = agent.wait_spans(s.pids, 2, what="from the server")
        everything = srv + cli
        assert [x.attrs.get("url.path") for x in cli] == paths[1:], fmt_spans(everything)
        assert [x.attrs.get("url.path") for x in srv] in (paths[1:], paths[2:]), \
            f"server spans: /orders/3 and /orders/4, /orders/2 optional:\n{fmt_spans(everything)}"
        for sv in srv:
            cl = [x for x in cli if x.attrs.get("url.path") == sv.attrs.get("url.path")][0]
            check_https_pair(sv, cl, s.port, everything, method="GET", path=cl.attrs["url.path"],
                             route="/orders/{id}", status=200, ua="sonde-test-pyhttps/", req_body=0,
                             resp_body=run.out["responses"][0]["len"], t0=t0)
        for cl in cli:
            assert cl.attrs.get("http.response.status_code") == 200 and cl.status_code == 0, cl
    finally:
        c.kill()
        s.stop()
        code = agent.stop()
    assert code == 0, f"agent exited with {code}\n{agent.stderr_tail()}"


# ---------------------------------------------------------------- curl -> nginx

def test_curl_nginx_keepalive(agent, cert, tmp_path, t0):
    """curl (libcurl, SSL_read/SSL_write of libssl.so.3) -> nginx with ssl (libssl.so.3):
    five requests on one connection: 200, 200, 404, a 1 MB static file (nginx does not
    sendfile over TLS) and 500."""
    nginx = start_nginx_tls(tmp_path, cert)
    try:
        # nginx closes the connection after a 500: /boom comes last.
        paths = ["/orders/1", "/orders/2", "/missing", "/static/big.bin", "/boom"]
        c = run_curl([nginx.url(p) for p in paths], extra=["--cacert", str(cert.cert)])
        assert [r["code"] for r in c.out] == [200, 200, 404, 200, 500], c.out
        assert [r["connects"] for r in c.out] == [1, 0, 0, 0, 0], f"no connection reuse: {c.out}"
        assert c.out[3]["size"] == NGINX_STATIC_SIZE
        srv, cli = both_ends(agent, nginx, c.pid, 5, "5 requests on one TLS connection")
        routes = ["/orders/{id}", "/orders/{id}", "/missing", "/static/big.bin", "/boom"]
        for s, k, p, route, r in zip(srv, cli, paths, routes, c.out):
            check_https_pair(s, k, nginx.port, srv + cli, method="GET", path=p, route=route,
                             status=r["code"], ua="curl/", req_body=0, resp_body=r["size"], t0=t0)
        assert srv[0].attrs["http.response.body.size"] == len(NGINX_ORDER_BODY)
        assert all(s.service == "nginx" for s in srv), fmt_spans(srv)
        assert all(s.service == "curl" for s in cli), fmt_spans(cli)
    finally:
        nginx.stop()


# ---------------------------------------------------------------- Python ssl

def start_py_server(tmp_path, cert):
    return start_port_server([PY, TLS_DIR / "https_server.py", cert.cert, cert.key], tmp_path,
                             "https_server.py")


def py_client(cert, port, *reqs, delay=None):
    cmd = [PY, TLS_DIR / "https_client.py"]
    if delay is not None:
        cmd += ["--delay", str(delay)]
    return run_json(cmd + [cert.cert, "127.0.0.1", port, *reqs], what="https_client.py")


def test_python_server_python_client_keepalive(agent, cert, tmp_path, t0):
    """http.server behind ssl (SSL_read_ex/SSL_write_ex) <- http.client over ssl, one
    keep-alive connection."""
    s = start_py_server(tmp_path, cert)
    try:
        c = py_client(cert, s.port, *specs(KEEPALIVE))
        check_keepalive(agent, s, c, "sonde-test-pyhttps/", t0, "https_server", "https_client")
    finally:
        s.stop()


def test_python_large_bodies(agent, cert, tmp_path, t0):
    s = start_py_server(tmp_path, cert)
    try:
        c = py_client(cert, s.port, f"POST:/upload:{UPLOAD}", f"GET:/big?size={BIG}")
        assert c.out["responses"][0]["len"] > 0
        check_large(agent, s, c, "sonde-test-pyhttps/", t0)
    finally:
        s.stop()


def test_curl_python_server(agent, cert, tmp_path, t0):
    """curl's SSL_write/SSL_read against Python's SSL_read_ex/SSL_write_ex, with a 2 MB
    upload."""
    s = start_py_server(tmp_path, cert)
    body = tmp_path / "upload.bin"
    body.write_bytes(b"u" * UPLOAD)
    try:
        c = run_curl([s.url("/orders/5")], extra=["--cacert", str(cert.cert)])
        c2 = run_curl([s.url("/upload")], extra=["--cacert", str(cert.cert), "--data-binary",
                                                  f"@{body}", "-H", "Content-Type: application/octet-stream"])
        assert c.out[0]["code"] == 200 and c2.out[0]["code"] == 200
        srv = exactly(agent, s.pids, 2, "from the Python server (2 connections)")
        cli1 = exactly(agent, [c.pid], 1, "from curl (GET)")
        cli2 = exactly(agent, [c2.pid], 1, "from curl (POST)")
        check_https_pair(srv[0], cli1[0], s.port, srv + cli1 + cli2, method="GET", path="/orders/5",
                         route="/orders/{id}", status=200, ua="curl/", req_body=0,
                         resp_body=c.out[0]["size"], t0=t0)
        check_https_pair(srv[1], cli2[0], s.port, srv + cli1 + cli2, method="POST", path="/upload",
                         route="/upload", status=200, ua="curl/", req_body=UPLOAD,
                         resp_body=c2.out[0]["size"], t0=t0)
    finally:
        s.stop()


# ---------------------------------------------------------------- Node.js (static OpenSSL)

def start_node_server(tmp_path, cert, agent):
    require_node()
    s = start_port_server([NODE, NODE_DIR / "https.js", "server", cert.cert, cert.key], tmp_path,
                          "https.js server")
    wait_tls_attached(agent, NODE)
    return s


def node_client(cert, port, *reqs):
    return run_json([NODE, NODE_DIR / "https.js", "client", cert.cert, f"https://127.0.0.1:{port}", *reqs],
                    what="https.js client")


def test_node_server_node_client_keepalive(agent, cert, tmp_path, t0):
    """https.createServer <- https.request with a keep-alive agent: node's own,
    statically linked OpenSSL on both ends."""
    s = start_node_server(tmp_path, cert, agent)
    try:
        c = node_client(cert, s.port, *specs(KEEPALIVE))
        check_keepalive(agent, s, c, "sonde-test-node/", t0, "https", "https")
    finally:
        s.stop()


def tls_socket_counters(agent):
    """sonde_tls_sockets_*_total by their middle word: guessed, confirmed, corrected."""
    out = {}
    for line in agent.get("/metrics")[1].splitlines():
        if line.startswith("sonde_tls_sockets_"):
            name, value = line.split()
            out[name.removeprefix("sonde_tls_sockets_").removesuffix("_total")] = float(value)
    return out


def check_concurrent_python_clients(agent, s, cert, t0):
    """One order, then ten at once, each on its own HTTPS connection from its own Python
    thread, into server `s`: every request is one server span with its own path, paired
    with its client span, and every server session's socket was confirmed, none guessed."""
    before = tls_socket_counters(agent)
    reqs = [f"GET:/orders/{i}" for i in range(1, 12)]
    c = run_json([PY, TLS_DIR / "https_client.py", "--concurrent", cert.cert, "127.0.0.1",
                  str(s.port), *reqs], what="https_client.py --concurrent")
    got = sorted(r["path"] for r in c.out["responses"])
    assert got == sorted(p.split(":")[1] for p in reqs), c.out
    assert all(r["status"] == 200 for r in c.out["responses"]), c.out
    assert c.out["connections"] == 11, c.out
    srv, cli = both_ends(agent, s, c.pid, 11, "11 orders over 11 HTTPS connections, 10 at once, "
                         f"with TLS socket counters {tls_socket_counters(agent)} "
                         f"(before: {before})\n")
    by_path = {sp.attrs["url.path"]: sp for sp in cli}
    assert sorted(by_path) == got, f"client spans:\n{fmt_spans(cli)}"
    for sp in srv:
        path = sp.attrs["url.path"]
        assert path in by_path, f"server span for an unknown path:\n{fmt_spans(srv)}"
        r = next(r for r in c.out["responses"] if r["path"] == path)
        check_https_pair(sp, by_path[path], s.port, srv + cli, method="GET", path=path,
                         route="/orders/{id}", status=200, ua="sonde-test-pyhttps/", req_body=0,
                         resp_body=r["len"], t0=t0)
    assert sorted(sp.attrs["url.path"] for sp in srv) == got, f"server spans:\n{fmt_spans(srv)}"
    after = tls_socket_counters(agent)
    delta = {k: after[k] - before.get(k, 0) for k in after}
    assert delta["guessed"] == 0 and delta["corrected"] == 0 and delta["confirmed"] >= 11, \
        f"the server's 11 sessions must each be confirmed by its own records: {delta}"


def test_node_server_concurrent_python_clients(agent, cert, tmp_path, t0):
    """Node.js moves the ciphertext of all eleven sessions on one thread (memory BIOs),
    writes a session's records when it likes (batched, after other sessions' calls) and
    reuses the addresses of freed SSL objects, so each session's socket must be told by
    what its socket writes carry."""
    s = start_node_server(tmp_path, cert, agent)
    try:
        check_concurrent_python_clients(agent, s, cert, t0)
    finally:
        s.stop()


def test_asyncio_server_concurrent_python_clients(agent, cert, tmp_path, t0):
    """The same with Python's asyncio: ssl.SSLObject on memory BIOs of the shared libssl,
    whose records pass through BIO_write in libcrypto."""
    s = start_port_server([PY, TLS_DIR / "asyncio_server.py", cert.cert, cert.key], tmp_path,
                          "asyncio_server.py")
    try:
        check_concurrent_python_clients(agent, s, cert, t0)
    finally:
        s.stop()


def test_node_large_bodies(agent, cert, tmp_path, t0):
    s = start_node_server(tmp_path, cert, agent)
    try:
        c = node_client(cert, s.port, f"POST:/upload:{UPLOAD}", f"GET:/big?size={BIG}")
        check_large(agent, s, c, "sonde-test-node/", t0)
    finally:
        s.stop()


# ---------------------------------------------------------------- Go crypto/tls

def start_go_server(tmp_path, cert, agent):
    go = require_go()
    s = start_port_server([go, "tls-server", "-cert", cert.cert, "-key", cert.key], tmp_path,
                          "go tls-server")
    wait_tls_attached(agent, go)
    return s


def go_client(cert, port, *reqs):
    return run_json([require_go(), "tls-client", "-ca", cert.cert, "-base", f"https://127.0.0.1:{port}",
                     *reqs], what="go tls-client")


def test_go_server_go_client_keepalive(agent, cert, tmp_path, t0):
    """net/http over crypto/tls on both ends (HTTP/1.1: TLSNextProto empty on both)."""
    s = start_go_server(tmp_path, cert, agent)
    try:
        c = go_client(cert, s.port, *specs(KEEPALIVE))
        assert all(r["proto"] == "HTTP/1.1" for r in c.out["responses"]), c.out
        check_keepalive(agent, s, c, "sonde-test-go/", t0, GO_SERVICE, GO_SERVICE)
    finally:
        s.stop()


def test_go_large_bodies(agent, cert, tmp_path, t0):
    s = start_go_server(tmp_path, cert, agent)
    try:
        c = go_client(cert, s.port, f"POST:/upload:{UPLOAD}", f"GET:/big?size={BIG}")
        check_large(agent, s, c, "sonde-test-go/", t0)
    finally:
        s.stop()


# ---------------------------------------------------------------- mixed stacks

def test_go_client_node_server_and_node_client_go_server(agent, cert, tmp_path, t0):
    """The TLS libraries of the two ends differ: Go crypto/tls against node's OpenSSL."""
    ns = start_node_server(tmp_path, cert, agent)
    gs = start_go_server(tmp_path, cert, agent)
    try:
        reqs = KEEPALIVE[:2]
        gc = go_client(cert, ns.port, *specs(reqs))
        nc = node_client(cert, gs.port, *specs(reqs))
        check_keepalive(agent, ns, gc, "sonde-test-go/", t0, "https", GO_SERVICE, reqs=reqs)
        check_keepalive(agent, gs, nc, "sonde-test-node/", t0, GO_SERVICE, "https", reqs=reqs)
    finally:
        ns.stop()
        gs.stop()


# ---------------------------------------------------------------- after the agent

def test_started_after_agent_node_and_late_ssl_import(agent, cert, tmp_path, t0):
    """The agent runs first; then a brand-new node server and client start (static OpenSSL
    found by exec events), and a Python client that loads libssl.so.3 only after 2 s of
    running (import ssl late: a library mapped after exec must be found too)."""
    agent.alive()
    s = start_node_server(tmp_path, cert, agent)
    try:
        nc = node_client(cert, s.port, "GET:/orders/7", "GET:/orders/8")
        pc = py_client(cert, s.port, "GET:/orders/9", f"POST:/upload:{64 * 1024}", delay=2)
        srv = exactly(agent, s.pids, 4, "from the node server (2 connections)")
        cli_n = exactly(agent, [nc.pid], 2, "from the node client")
        cli_p = exactly(agent, [pc.pid], 2, "from the late-ssl Python client")
        everything = srv + cli_n + cli_p
        assert by_kind(srv, SERVER) == srv, fmt_spans(srv)
        for c, path in zip(cli_n, ["/orders/7", "/orders/8"]):
            ss = [x for x in srv if x.parent_span_id == c.span_id]
            assert len(ss) == 1, f"no server span for {c}\n{fmt_spans(everything)}"
            check_https_pair(ss[0], c, s.port, everything, method="GET", path=path, route="/orders/{id}",
                             status=200, ua="sonde-test-node/", req_body=0, t0=t0)
        for c, (m, path, route, body) in zip(cli_p, [("GET", "/orders/9", "/orders/{id}", 0),
                                                     ("POST", "/upload", "/upload", 64 * 1024)]):
            ss = [x for x in srv if x.parent_span_id == c.span_id]
            assert len(ss) == 1, f"no server span for {c}\n{fmt_spans(everything)}"
            check_https_pair(ss[0], c, s.port, everything, method=m, path=path, route=route,
                             status=200, ua="sonde-test-pyhttps/", req_body=body, t0=t0)
        assert all(x.service == "https_client" for x in cli_p), fmt_spans(cli_p)
    finally:
        s.stop()


# ---------------------------------------------------------------- timing

@pytest.mark.parametrize("stack", ["curl-nginx", "python", "node", "go"])
def test_client_span_encloses_server_span(agent, cert, tmp_path, stack):
    """As over plain HTTP, each server span lies inside its client span in time: the client
    starts sending before the server starts reading, and has the whole response only after
    the server wrote it. Five GETs on one connection, per TLS stack."""
    paths = [f"/orders/{i}" for i in range(1, 6)]
    if stack == "curl-nginx":
        s = start_nginx_tls(tmp_path, cert)
        c = run_curl([s.url(p) for p in paths], extra=["--cacert", str(cert.cert)])
        pid, lens = c.pid, [r["size"] for r in c.out]
    elif stack == "python":
        s = start_py_server(tmp_path, cert)
        c = py_client(cert, s.port, *[f"GET:{p}" for p in paths])
        pid, lens = c.pid, [r["len"] for r in c.out["responses"]]
    elif stack == "node":
        s = start_node_server(tmp_path, cert, agent)
        c = node_client(cert, s.port, *[f"GET:{p}" for p in paths])
        pid, lens = c.pid, [r["len"] for r in c.out["responses"]]
    else:
        s = start_go_server(tmp_path, cert, agent)
        c = go_client(cert, s.port, *[f"GET:{p}" for p in paths])
        pid, lens = c.pid, [r["len"] for r in c.out["responses"]]
    try:
        srv, cli = both_ends(agent, s, pid, 5, "5 GETs on one TLS connection")
        for sv, cl, p, n in zip(srv, cli, paths, lens):
            check_https_pair(sv, cl, s.port, srv + cli, timing=True, method="GET", path=p,
                             route="/orders/{id}", status=200, req_body=0, resp_body=n)
    finally:
        s.stop()
