"""Integration: the real agent, real servers (Python, nginx), real clients (curl, Python).

Every test asserts the exact spans on both ends where both ends are traced: how many,
their names, kinds, status codes and key attributes. Runs as root.
"""
import pytest

from sonde_testlib import (
    CLIENT, HELLO, NGINX_ORDER_BODY, SERVER, SMALL_STATIC_SIZE, STATIC_SIZE, by_kind, check_span, fmt_spans, run_curl,
    run_pyclient,
)

CURL_UA = "curl/"
PY_UA = "sonde-test-pyclient/"


def expect(agent, pids, n, what):
    spans = agent.wait_spans(pids, n, what=what)
    assert len(spans) == n, f"expected exactly {n} span(s) {what}, got {len(spans)}:\n{fmt_spans(spans)}"
    return spans


_seen = []  # the spans of the current test, shown when a check fails


def both_ends(agent, server, client, n_each, what):
    """Waits for n_each server spans (server's pids) and n_each client spans (client pid)."""
    srv = expect(agent, server.pids, n_each, f"from the server ({what})")
    cli = expect(agent, [client.pid], n_each, f"from the client ({what})")
    _seen[:] = srv + cli
    assert by_kind(srv, SERVER) == srv, f"server process produced non-server spans:\n{fmt_spans(srv)}"
    assert by_kind(cli, CLIENT) == cli, f"client process produced non-client spans:\n{fmt_spans(cli)}"
    return srv, cli


def check_pair(srv, cli, port, *, name, path, route, status, method="GET", ua=None,
               resp_body=None, req_body=None, t0=None, server_error=None, client_error=None):
    if server_error is None:
        server_error = status >= 500
    if client_error is None:
        client_error = status >= 400
    common = dict(name=name, method=method, path=path, route=route, status=status, port=port,
                  t0_ns=t0, user_agent_prefix=ua, resp_body=resp_body, req_body=req_body)
    try:
        check_span(srv, kind=SERVER, error=server_error, **common)
        check_span(cli, kind=CLIENT, error=client_error, **common)
        # Same node, same connection: the server span is the client span's child.
        assert srv.trace_id == cli.trace_id and srv.parent_span_id == cli.span_id, \
            f"server span not linked to its client span:\n  {srv}\n  {cli}"
    except AssertionError as e:
        raise AssertionError(f"{e}\n--- all spans of this exchange ---\n{fmt_spans(_seen)}") from None


# ---------------------------------------------------------------- single requests

def test_single_get_python_http_server_curl(agent, http_server, t0):
    c = run_curl([http_server.url("/hello.txt")])
    assert c.out[0]["code"] == 200 and c.out[0]["size"] == len(HELLO)
    srv, cli = both_ends(agent, http_server, c, 1, "one GET")
    check_pair(srv[0], cli[0], http_server.port, name="GET /hello.txt", path="/hello.txt",
               route="/hello.txt", status=200, ua=CURL_UA, resp_body=len(HELLO), t0=t0)
    assert cli[0].service == "curl", cli[0]
    assert srv[0].start >= cli[0].start and srv[0].end <= cli[0].end, \
        f"server span should sit inside the client span:\n{fmt_spans(srv + cli)}"


def test_single_get_python_http_server_pyclient(agent, http_server, t0):
    c = run_pyclient("get", "127.0.0.1", http_server.port, "/hello.txt")
    assert c.out["responses"][0]["status"] == 200
    srv, cli = both_ends(agent, http_server, c, 1, "one GET")
    check_pair(srv[0], cli[0], http_server.port, name="GET /hello.txt", path="/hello.txt",
               route="/hello.txt", status=200, ua=PY_UA, resp_body=len(HELLO), t0=t0)


def test_single_get_route_templating(agent, app, t0):
    c = run_curl([app.url("/orders/42")])
    assert c.out[0]["code"] == 200
    srv, cli = both_ends(agent, app, c, 1, "GET /orders/42")
    check_pair(srv[0], cli[0], app.port, name="GET /orders/{id}", path="/orders/42",
               route="/orders/{id}", status=200, ua=CURL_UA, resp_body=c.out[0]["size"], t0=t0)
    assert srv[0].service in ("app.py", "app"), f"service.name of a python script: {srv[0]}"
    assert srv[0].pid == app.pid


def test_single_get_nginx_curl(agent, nginx, t0):
    c = run_curl([nginx.url("/orders/7")])
    assert c.out[0]["code"] == 200
    srv, cli = both_ends(agent, nginx, c, 1, "GET /orders/7")
    check_pair(srv[0], cli[0], nginx.port, name="GET /orders/{id}", path="/orders/7",
               route="/orders/{id}", status=200, ua=CURL_UA, resp_body=len(NGINX_ORDER_BODY), t0=t0)
    assert srv[0].service == "nginx", srv[0]


# ---------------------------------------------------------------- keep-alive

def test_keepalive_curl_nginx(agent, nginx, t0):
    paths = ["/orders/1", "/orders/2", "/orders/3"]
    c = run_curl([nginx.url(p) for p in paths])
    assert [r["connects"] for r in c.out] == [1, 0, 0], f"curl did not reuse the connection: {c.out}"
    srv, cli = both_ends(agent, nginx, c, 3, "3 GETs on one connection")
    for s, k, p in zip(srv, cli, paths):
        check_pair(s, k, nginx.port, name="GET /orders/{id}", path=p, route="/orders/{id}",
                   status=200, ua=CURL_UA, resp_body=len(NGINX_ORDER_BODY), t0=t0)


def test_keepalive_curl_app(agent, app, t0):
    paths = ["/orders/10", "/orders/11", "/orders/12", "/orders/13"]
    c = run_curl([app.url(p) for p in paths])
    assert [r["connects"] for r in c.out] == [1, 0, 0, 0], f"no connection reuse: {c.out}"
    srv, cli = both_ends(agent, app, c, 4, "4 GETs on one connection")
    for s, k, p, r in zip(srv, cli, paths, c.out):
        check_pair(s, k, app.port, name="GET /orders/{id}", path=p, route="/orders/{id}",
                   status=200, ua=CURL_UA, resp_body=r["size"], t0=t0)


def test_keepalive_pyclient_app(agent, app, t0):
    paths = ["/orders/1", "/orders/22", "/orders/333"]
    c = run_pyclient("get", "127.0.0.1", app.port, *paths)
    assert c.out["connections"] == 1, c.out
    srv, cli = both_ends(agent, app, c, 3, "3 GETs on one http.client connection")
    assert {k.service for k in cli} <= {"pyclient.py", "pyclient"}, \
        f"service.name of a short-lived python script:\n{fmt_spans(cli)}"
    for s, k, p, r in zip(srv, cli, paths, c.out["responses"]):
        check_pair(s, k, app.port, name="GET /orders/{id}", path=p, route="/orders/{id}",
                   status=200, ua=PY_UA, resp_body=r["len"], t0=t0)


def test_keepalive_pyclient_nginx(agent, nginx, t0):
    paths = ["/orders/5", "/missing", "/orders/6"]
    c = run_pyclient("get", "127.0.0.1", nginx.port, *paths)
    assert c.out["connections"] == 1, c.out
    assert [r["status"] for r in c.out["responses"]] == [200, 404, 200]
    srv, cli = both_ends(agent, nginx, c, 3, "3 GETs on one connection")
    check_pair(srv[0], cli[0], nginx.port, name="GET /orders/{id}", path="/orders/5",
               route="/orders/{id}", status=200, ua=PY_UA, t0=t0)
    check_pair(srv[1], cli[1], nginx.port, name="GET /missing", path="/missing",
               route="/missing", status=404, ua=PY_UA, resp_body=c.out["responses"][1]["len"], t0=t0)
    check_pair(srv[2], cli[2], nginx.port, name="GET /orders/{id}", path="/orders/6",
               route="/orders/{id}", status=200, ua=PY_UA, t0=t0)


# ---------------------------------------------------------------- pipelining

def test_pipelining_nginx(agent, nginx, t0):
    """Three requests in one write(); nginx answers them in order on the connection."""
    paths = ["/orders/1", "/orders/2", "/orders/3"]
    c = run_pyclient("pipeline", "127.0.0.1", nginx.port, *paths)
    assert c.out["status_lines"] == 3, c.out
    srv, cli = both_ends(agent, nginx, c, 3, "3 pipelined GETs")
    for s, k, p in zip(srv, cli, paths):
        check_pair(s, k, nginx.port, name="GET /orders/{id}", path=p, route="/orders/{id}",
                   status=200, ua="sonde-test-pipeline/", resp_body=len(NGINX_ORDER_BODY), t0=t0)
    assert [s.attrs["url.path"] for s in srv] == paths, "server spans out of order"


# ---------------------------------------------------------------- chunked

CHUNKED_DECODED = len(b"first chunk\n") + len(b"second, a little longer chunk\n") + len(b"third\n")


def _check_chunked_size(s):
    # The semantic conventions leave the chunked case open: the decoded body, or the
    # bytes on the wire after the head (chunk framing included). Accept either, exactly.
    framed = sum(len(b"%x\r\n" % n) + n + 2 for n in (12, 30, 6)) + len(b"0\r\n\r\n")
    got = s.attrs.get("http.response.body.size")
    assert got in (CHUNKED_DECODED, framed), f"chunked body size {got}: {s}"


def test_chunked_response_curl_then_next_request(agent, app, t0):
    c = run_curl([app.url("/stream/chunks"), app.url("/orders/5")])
    assert [r["connects"] for r in c.out] == [1, 0]
    assert c.out[0]["size"] == CHUNKED_DECODED
    srv, cli = both_ends(agent, app, c, 2, "chunked GET then GET on the same connection")
    check_pair(srv[0], cli[0], app.port, name="GET /stream/chunks", path="/stream/chunks",
               route="/stream/chunks", status=200, ua=CURL_UA, t0=t0)
    _check_chunked_size(srv[0])
    _check_chunked_size(cli[0])
    check_pair(srv[1], cli[1], app.port, name="GET /orders/{id}", path="/orders/5",
               route="/orders/{id}", status=200, ua=CURL_UA, resp_body=c.out[1]["size"], t0=t0)


def test_chunked_response_pyclient(agent, app, t0):
    c = run_pyclient("get", "127.0.0.1", app.port, "/stream/chunks", "/stream/chunks", "/orders/8")
    assert c.out["connections"] == 1
    srv, cli = both_ends(agent, app, c, 3, "2 chunked GETs then a GET")
    for i in (0, 1):
        check_pair(srv[i], cli[i], app.port, name="GET /stream/chunks", path="/stream/chunks",
                   route="/stream/chunks", status=200, ua=PY_UA, t0=t0)
    check_pair(srv[2], cli[2], app.port, name="GET /orders/{id}", path="/orders/8",
               route="/orders/{id}", status=200, ua=PY_UA, t0=t0)


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("server_kind", ["app", "nginx"])
@pytest.mark.parametrize("path,code", [("/missing", 404), ("/boom", 500)])
def test_error_status(agent, request, server_kind, path, code, t0):
    """404: server span status unset, client span error. 500: both error."""
    server = request.getfixturevalue(server_kind)
    c = run_curl([server.url(path)])
    assert c.out[0]["code"] == code
    srv, cli = both_ends(agent, server, c, 1, f"GET {path} -> {code}")
    check_pair(srv[0], cli[0], server.port, name=f"GET {path}", path=path, route=path, status=code,
               ua=CURL_UA, resp_body=c.out[0]["size"], t0=t0,
               server_error=(code >= 500), client_error=True)


# ---------------------------------------------------------------- sendfile

def test_nginx_sendfile_static_then_next_request(agent, nginx, t0):
    """nginx sends the file with sendfile(): those bytes never pass through write().
    The response body size must still be right and the next request still parsed."""
    c = run_curl([nginx.url("/static/big.bin"), nginx.url("/orders/9")])
    assert [r["connects"] for r in c.out] == [1, 0]
    assert c.out[0]["size"] == STATIC_SIZE
    srv, cli = both_ends(agent, nginx, c, 2, "static file then GET on the same connection")
    check_pair(srv[0], cli[0], nginx.port, name="GET /static/big.bin", path="/static/big.bin",
               route="/static/big.bin", status=200, ua=CURL_UA, resp_body=STATIC_SIZE, t0=t0)
    check_pair(srv[1], cli[1], nginx.port, name="GET /orders/{id}", path="/orders/9",
               route="/orders/{id}", status=200, ua=CURL_UA, resp_body=len(NGINX_ORDER_BODY), t0=t0)


def test_nginx_sendfile_pipelined(agent, nginx, t0):
    """Static file, then two more requests, all pipelined in one write. nginx's side is
    exact: the sendfile bytes are counted and skipped, the next requests parsed."""
    paths = ["/static/big.bin", "/orders/1", "/static/big.bin"]
    c = run_pyclient("pipeline", "127.0.0.1", nginx.port, *paths)
    assert c.out["status_lines"] == 3, c.out
    srv, cli = both_ends(agent, nginx, c, 3, "pipelined static, GET, static")
    sizes = [STATIC_SIZE, len(NGINX_ORDER_BODY), STATIC_SIZE]
    names = ["GET /static/big.bin", "GET /orders/{id}", "GET /static/big.bin"]
    routes = ["/static/big.bin", "/orders/{id}", "/static/big.bin"]
    for s, p, n, r, size in zip(srv, paths, names, routes, sizes):
        check_span(s, kind=SERVER, error=False, name=n, method="GET", path=p, route=r,
                   status=200, port=nginx.port, t0_ns=t0, user_agent_prefix="sonde-test-pipeline/",
                   resp_body=size, req_body=None)
    # The client's side of the first exchange is right too.
    check_pair(srv[0], cli[0], nginx.port, name=names[0], path=paths[0], route=routes[0],
               status=200, ua="sonde-test-pipeline/", resp_body=sizes[0], t0=t0)


def test_pipelined_responses_after_a_large_body_read_later(agent, nginx, t0):
    """The client reads the first response's head, pauses, then reads on in 1 MiB reads:
    one read holds the end of the 300 KiB body and the next responses, far past the
    copied prefix. The agent has told the kernel by then where the next response starts,
    so the kernel splits that read there (a message window) and the client side is exact."""
    paths = ["/static/big.bin", "/orders/1", "/orders/2"]
    c = run_pyclient("pipeline-slow-reader", "127.0.0.1", nginx.port, *paths)
    assert c.out["status_lines"] == 3, c.out
    srv, cli = both_ends(agent, nginx, c, 3, "pipelined static, GET, GET; slow reader")
    sizes = [STATIC_SIZE, len(NGINX_ORDER_BODY), len(NGINX_ORDER_BODY)]
    names = ["GET /static/big.bin", "GET /orders/{id}", "GET /orders/{id}"]
    routes = ["/static/big.bin", "/orders/{id}", "/orders/{id}"]
    for s, k, p, n, r, size in zip(srv, cli, paths, names, routes, sizes):
        check_pair(s, k, nginx.port, name=n, path=p, route=r, status=200,
                   ua="sonde-test-pipeline/", resp_body=size, t0=t0)
    metrics = agent.get("/metrics")[1]
    windows = [line for line in metrics.splitlines() if line.startswith("sonde_message_windows_total ")]
    assert windows and int(windows[0].split()[1]) >= 1, f"no message window counted:\n{windows}"


def test_nginx_sendfile_pipelined_client_side(agent, nginx, t0):
    """The client's side of the pipelined static files: it reads in 64 KiB recv()s, and
    one of them holds the end of the 300 KiB body and the next responses, long before
    the agent has woken to read the first head. The programs read that head in the
    prefix they copied (Content-Length) and know where the next response starts, so
    they split the read there themselves."""
    paths = ["/static/big.bin", "/orders/1", "/static/big.bin"]
    c = run_pyclient("pipeline", "127.0.0.1", nginx.port, *paths)
    srv, cli = both_ends(agent, nginx, c, 3, "pipelined static, GET, static")
    sizes = [STATIC_SIZE, len(NGINX_ORDER_BODY), STATIC_SIZE]
    names = ["GET /static/big.bin", "GET /orders/{id}", "GET /static/big.bin"]
    routes = ["/static/big.bin", "/orders/{id}", "/static/big.bin"]
    for s, k, p, n, r, size in zip(srv, cli, paths, names, routes, sizes):
        check_pair(s, k, nginx.port, name=n, path=p, route=r, status=200,
                   ua="sonde-test-pipeline/", resp_body=size, t0=t0)


def test_several_responses_larger_than_the_copy_in_one_read(agent, nginx, t0):
    """Three pipelined responses of 6,000-byte bodies (more than the 4 KiB copied per
    read), read by the client in one 1 MiB recv() after they have all arrived. No user
    space can announce anything in time: the whole exchange is one read. The programs
    read each head they copy and cut the read at every next response, so each response
    is parsed from its own copied head."""
    paths = ["/static/small.bin", "/orders/1", "/static/small.bin", "/static/small.bin"]
    c = run_pyclient("pipeline-late-reader", "127.0.0.1", nginx.port, *paths)
    assert c.out["status_lines"] == 4, c.out
    assert c.out["read_sizes"][0] > 3 * SMALL_STATIC_SIZE, (
        f"the client's first read should hold several responses: {c.out}")
    srv, cli = both_ends(agent, nginx, c, 4, "pipelined small static files, one read")
    sizes = [SMALL_STATIC_SIZE, len(NGINX_ORDER_BODY), SMALL_STATIC_SIZE, SMALL_STATIC_SIZE]
    names = ["GET /static/small.bin", "GET /orders/{id}", "GET /static/small.bin", "GET /static/small.bin"]
    routes = ["/static/small.bin", "/orders/{id}", "/static/small.bin", "/static/small.bin"]
    for s, k, p, n, r, size in zip(srv, cli, paths, names, routes, sizes):
        check_pair(s, k, nginx.port, name=n, path=p, route=r, status=200,
                   ua="sonde-test-pipeline/", resp_body=size, t0=t0)


# ---------------------------------------------------------------- large upload

UPLOAD = 50 * 1024 * 1024


def test_upload_50mb_then_more_requests(agent, app, t0):
    """A 50 MB POST (far past the payload cap) and then two GETs on the same connection:
    the body is skipped by length and the next requests are parsed."""
    c = run_pyclient("upload", "127.0.0.1", app.port, UPLOAD, "/orders/100", "/orders/101")
    assert c.out["connections"] == 1, c.out
    assert c.out["responses"][0]["status"] == 200 and str(UPLOAD) in c.out["responses"][0]["body"]
    srv, cli = both_ends(agent, app, c, 3, "50 MB upload then 2 GETs")
    check_pair(srv[0], cli[0], app.port, name="POST /upload", method="POST", path="/upload",
               route="/upload", status=200, ua=PY_UA, req_body=UPLOAD,
               resp_body=c.out["responses"][0]["len"], t0=t0)
    for i, p in ((1, "/orders/100"), (2, "/orders/101")):
        check_pair(srv[i], cli[i], app.port, name="GET /orders/{id}", path=p, route="/orders/{id}",
                   status=200, ua=PY_UA, resp_body=c.out["responses"][i]["len"], t0=t0)
    assert srv[0].end - srv[0].start > 0


# ---------------------------------------------------------------- not HTTP

@pytest.mark.parametrize("server_kind", ["app", "nginx"])
def test_garbage_produces_no_span(agent, request, server_kind, t0):
    """Bytes that are not HTTP never make a span, on either end. A real request from
    another process afterwards is the sync point: once its span is in, so would be any
    span of the garbage."""
    server = request.getfixturevalue(server_kind)
    g = run_pyclient("garbage", "127.0.0.1", server.port, 3000)
    c = run_curl([server.url("/orders/77")])
    srv = expect(agent, server.pids, 1, "from the server (garbage, then one GET)")
    check_span(srv[0], kind=SERVER, name="GET /orders/{id}", method="GET", path="/orders/77",
               route="/orders/{id}", status=200, port=server.port, error=False, t0_ns=t0)
    expect(agent, [c.pid], 1, "from curl")
    garbage = agent.spans_of([g.pid])
    assert garbage == [], f"the garbage client produced spans:\n{fmt_spans(garbage)}"


# ---------------------------------------------------------------- operations

def test_admin_endpoints(agent):
    code, _ = agent.get("/healthz")
    assert code == 200
    code, _ = agent.get("/readyz")
    assert code == 200
    code, body = agent.get("/metrics")
    assert code == 200
    assert "# TYPE" in body, f"/metrics is not Prometheus text:\n{body[:2000]}"
