"""Whole traces (issue 8): one order is one trace, through every service it touches,
with every parent right, the programs a service runs as spans, and a request that
hangs shown while it hangs. Real processes, the real kernel; runs as root.

The chain: 10 orders at once, each from its own curl, into a Python thread-per-request
service (tests/services/shop.py) that runs `sleep` once per order and then calls a Go
service (net/http over crypto/tls) over HTTPS.
"""
import subprocess
import time

from clientlib import make_cert, require_go, start_port_server, wait_tls_attached
from sonde_testlib import CLIENT, CONSUMER, INTERNAL, PRODUCER, PY, SERVER, TESTS, Agent, fmt_spans

ORDERS = [f"o-{i}" for i in range(10)]


def order_of(span):
    return span.attrs.get("order.id")


def start_go(tmp_path, cert, agent):
    """The chain's last service: Go net/http over crypto/tls (tests/go tls-server)."""
    go = start_port_server([require_go(), "tls-server", "-cert", cert.cert, "-key", cert.key],
                           tmp_path, "go tls-server")
    wait_tls_attached(agent, require_go())
    return go


def post_orders(port: int) -> set[int]:
    """Every order of ORDERS at once, each POSTed by its own curl; returns the curls' pids."""
    curls = [subprocess.Popen(
        ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST",
         "-H", "Content-Type: application/json", "--data", f'{{"order_id": "{o}"}}',
         f"http://127.0.0.1:{port}/orders"], stdout=subprocess.PIPE, text=True)
        for o in ORDERS]
    codes = [c.communicate(timeout=60)[0] for c in curls]
    assert codes == ["201"] * len(ORDERS), codes
    return {c.pid for c in curls}


def test_ten_orders_at_once_are_ten_whole_traces(tmp_path):
    cert = make_cert(tmp_path / "tls")
    agent = Agent(tmp_path / "agent")
    agent.start()
    go = shop = None
    try:
        go = start_go(tmp_path, cert, agent)
        shop = start_port_server([PY, TESTS / "services" / "shop.py", cert.cert,
                                  f"https://127.0.0.1:{go.port}"], tmp_path, "shop.py")
        curls = post_orders(shop.port)
        pids = curls | shop.pids() | go.pids()
        # curl, shop server, sleep, shop client, go server: 5 per order.
        spans = agent.wait_spans(pids, 5 * len(ORDERS), what="of the 10 orders")
        traces = {}
        for s in spans:
            traces.setdefault(s.trace_id, []).append(s)
        assert len(traces) == len(ORDERS), \
            f"{len(traces)} traces, expected one per order:\n{fmt_spans(spans)}"
        for tid, t in traces.items():
            everything = fmt_spans(t)
            orders = {order_of(s) for s in t}
            assert len(orders) == 1 and None not in orders, \
                f"order.id must be on every span, one order per trace:\n{everything}"
            (order,) = orders
            by = {s.span_id: s for s in t}
            kinds = sorted((s.kind, s.service) for s in t)
            curl = [s for s in t if s.kind == CLIENT and s.service == "curl"]
            server = [s for s in t if s.kind == SERVER and s.attrs.get("url.path") == "/orders"]
            sleep = [s for s in t if s.kind == INTERNAL and s.name == "sleep"]
            call = [s for s in t if s.kind == CLIENT and s.attrs.get("url.path") == f"/orders/{order}"]
            leaf = [s for s in t if s.kind == SERVER and s.attrs.get("url.path") == f"/orders/{order}"]
            assert all(len(x) == 1 for x in (curl, server, sleep, call, leaf)) and len(t) == 5, \
                f"trace {tid}: expected curl -> shop -> (sleep, https call -> go), got {kinds}:\n{everything}"
            assert not curl[0].parent_span_id, everything
            assert server[0].parent_span_id == curl[0].span_id, everything
            assert sleep[0].parent_span_id == server[0].span_id, everything
            assert call[0].parent_span_id == server[0].span_id, everything
            assert leaf[0].parent_span_id == call[0].span_id, everything
            assert sleep[0].attrs.get("process.exit.code") == 0, sleep[0]
            assert all(not s.parent_span_id or s.parent_span_id in by for s in t), everything
        status, metrics = agent.get("/metrics")
        assert "sonde_parent_ambiguous_total 0" in metrics, metrics
    finally:
        for s in (shop, go):
            if s:
                s.stop()
        code = agent.stop()
    assert code == 0, agent.stderr_tail()


def test_a_hanging_request_is_shown_while_it_hangs(tmp_path):
    """--stall-timeout 2s; the request hangs 6 s: a stalled span arrives before it
    ends, then the ordinary span, with another span id in the same trace."""
    cert = make_cert(tmp_path / "tls")
    agent = Agent(tmp_path / "agent", args=["--stall-timeout", "2s"])
    agent.start()
    shop = None
    try:
        shop = start_port_server([PY, TESTS / "services" / "shop.py", cert.cert, "https://127.0.0.1:9"],
                                 tmp_path, "shop.py")
        started = time.monotonic()
        c = subprocess.Popen(["curl", "-sS", "-o", "/dev/null", f"http://127.0.0.1:{shop.port}/hang?s=6"])
        stalled = agent.wait_spans(shop.pids(), 1, timeout=5, settle=0, what="stalled, while it hangs")
        seen_after = time.monotonic() - started
        assert c.poll() is None, "the request ended before its stalled span arrived"
        assert seen_after < 6, seen_after
        (s,) = stalled
        assert s.attrs.get("sonde.stalled") is True and s.kind == SERVER and s.name == "GET /hang", fmt_spans(stalled)
        assert s.attrs.get("sonde.stalled.for_ms", 0) >= 2000, s
        assert c.wait(timeout=30) == 0
        done = agent.wait_spans(shop.pids(), 2, what="the stalled span and the ordinary one")
        final = [x for x in done if not x.attrs.get("sonde.stalled")]
        assert len(final) == 1 and final[0].attrs.get("http.response.status_code") == 200, fmt_spans(done)
        assert final[0].span_id != s.span_id and final[0].trace_id == s.trace_id, fmt_spans(done)
        # curl waited as long: its own call is shown stalled too.
        mine = agent.wait_spans({c.pid}, 2, what="curl's stalled span and its ordinary one")
        curl = [x for x in mine if not x.attrs.get("sonde.stalled")]
        assert len(curl) == 1 and len(mine) == 2, fmt_spans(mine)
        assert final[0].parent_span_id == curl[0].span_id and s.parent_span_id == curl[0].span_id, \
            fmt_spans(done + mine)
    finally:
        if shop:
            shop.stop()
        code = agent.stop()
    assert code == 0, agent.stderr_tail()


def check_one_trace_per_order(spans, expect: int, what: str):
    """Groups spans by trace: one trace per order, every span of it with that order's
    order.id, every parent inside the trace. Returns {order id: spans}."""
    traces = {}
    for s in spans:
        traces.setdefault(s.trace_id, []).append(s)
    assert len(traces) == len(ORDERS), f"{len(traces)} traces, expected one per order ({what}):\n{fmt_spans(spans)}"
    out = {}
    for t in traces.values():
        everything = fmt_spans(t)
        orders = {order_of(s) for s in t}
        assert len(orders) == 1 and None not in orders, f"one order.id on every span of a trace:\n{everything}"
        assert len(t) == expect, f"expected {expect} spans ({what}):\n{everything}"
        ids = {s.span_id for s in t}
        roots = [s for s in t if not s.parent_span_id]
        assert len(roots) == 1 and all(not s.parent_span_id or s.parent_span_id in ids for s in t), \
            f"one root and every parent in the trace:\n{everything}"
        out[orders.pop()] = t
    return out


def test_event_loop_service_and_a_rabbitmq_hop(tmp_path):
    """10 orders at once: curl -> an asyncio service (one thread: the order id in the
    request and in the message tells its calls apart) -> RabbitMQ -> a consumer that
    calls a Go service over HTTPS for each message, then acks."""
    from clientlib import RabbitMQ, Background
    cert = make_cert(tmp_path / "tls")
    rabbit = RabbitMQ().start()
    agent = Agent(tmp_path / "agent")
    agent.start()
    go = shop = con = None
    try:
        go = start_go(tmp_path, cert, agent)
        con = Background([PY, TESTS / "services" / "mes_consumer.py", rabbit.port, "orders", "order.created",
                          "mes", cert.cert, f"https://127.0.0.1:{go.port}", len(ORDERS)],
                         "mes_consumer.py").wait_ready()
        shop = start_port_server([PY, TESTS / "services" / "shop_asyncio.py", rabbit.port, "orders",
                                  "order.created"], tmp_path, "shop_asyncio.py")
        curls = post_orders(shop.port)
        con.finish()
        pids = curls | shop.pids() | go.pids() | {con.pid}
        # curl, shop server, publish, delivery, consumer's call, go server: 6 per order.
        spans = agent.wait_spans(pids, 6 * len(ORDERS), what="of the 10 orders")
        for order, t in check_one_trace_per_order(spans, 6, "through RabbitMQ").items():
            everything = fmt_spans(t)
            one = lambda f: [s for s in t if f(s)]
            curl = one(lambda s: s.service == "curl")
            server = one(lambda s: s.kind == SERVER and s.pid in shop.pids())
            pub = one(lambda s: s.kind == PRODUCER)
            dl = one(lambda s: s.kind == CONSUMER)
            call = one(lambda s: s.kind == CLIENT and s.pid == con.pid)
            leaf = one(lambda s: s.kind == SERVER and s.pid in go.pids())
            assert all(len(x) == 1 for x in (curl, server, pub, dl, call, leaf)), everything
            assert server[0].parent_span_id == curl[0].span_id, everything
            assert pub[0].parent_span_id == server[0].span_id, everything
            assert dl[0].parent_span_id == pub[0].span_id, everything
            assert call[0].parent_span_id == dl[0].span_id, everything
            assert leaf[0].parent_span_id == call[0].span_id, everything
    finally:
        for s in (shop, go):
            if s:
                s.stop()
        if con:
            con.kill()
        code = agent.stop()
        rabbit.stop()
    assert code == 0, agent.stderr_tail()


def test_an_incoming_traceparent_is_continued_through_the_chain(tmp_path):
    cert = make_cert(tmp_path / "tls")
    agent = Agent(tmp_path / "agent")
    agent.start()
    go = shop = None
    trace, parent = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    try:
        go = start_go(tmp_path, cert, agent)
        shop = start_port_server([PY, TESTS / "services" / "shop.py", cert.cert,
                                  f"https://127.0.0.1:{go.port}"], tmp_path, "shop.py")
        c = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST",
                            "-H", f"traceparent: 00-{trace}-{parent}-01", "--data", '{"order_id": "o-tp"}',
                            f"http://127.0.0.1:{shop.port}/orders"], capture_output=True, text=True, timeout=60)
        assert c.stdout == "201", c
        spans = agent.wait_spans(shop.pids() | go.pids(), 4, what="shop, sleep, its call, go")
        assert {s.trace_id for s in spans} == {trace}, fmt_spans(spans)
        server = [s for s in spans if s.kind == SERVER and s.attrs.get("url.path") == "/orders"]
        assert len(server) == 1 and server[0].parent_span_id == parent, fmt_spans(spans)
    finally:
        for s in (shop, go):
            if s:
                s.stop()
        code = agent.stop()
    assert code == 0, agent.stderr_tail()
