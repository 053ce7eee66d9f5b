"""Parents inside a Java thread-pool service (issue 8, item 1; README "Whole traces").

A real JVM: tests/services/JavaShop.java, com.sun.net.httpserver with a fixed pool of 8
threads, compiled here with javac. 10 orders at once, each from its own curl, GET
/orders/{id}; the first 8 wait for each other in the service, so that 8 are in flight
when their calls are made. For each order the service calls a downstream service on
this node (tests/services/stock.py, Python), at /orders/{id} (the call carries the
order id) or at /stock/{id} (it carries none sonde knows of), with
java.net.HttpURLConnection (the request is written on the thread that read the order)
or java.net.http.HttpClient (written by the client's own HttpClient-N-Worker threads),
and with orders handed from the pool thread that read them to another pool thread,
which has read another order, still in flight (JavaShop handoff). Runs as root.

The agent traces only a cgroup of this module's own (--cgroup): sonde_parent_ambiguous_total
counts for the whole node, and other tests or people on the machine must not move it.
"""
import shutil
import subprocess
from pathlib import Path

import pytest

from sonde_testlib import (CLIENT, PY, SERVER, TESTS, Agent, Cgroup, Server, fmt_spans, free_port,
                           metric, require_root, wait_listening)

ORDERS = [f"j-{i}" for i in range(10)]
SOURCE = TESTS / "services" / "JavaShop.java"
AMBIGUOUS = "sonde_parent_ambiguous_total"


@pytest.fixture(scope="module")
def java(tmp_path_factory):
    """`java` and the directory JavaShop.java was compiled into. No JDK is a failure."""
    javac, java = shutil.which("javac"), shutil.which("java")
    if not javac or not java:
        pytest.fail(f"a JDK (17 or later) is needed for the Java service test: javac={javac} java={java} "
                    "(scripts/setup-tests.sh installs openjdk-17-jdk-headless)", pytrace=False)
    out = tmp_path_factory.mktemp("java-classes")
    r = subprocess.run([javac, "--release", "17", "-d", str(out), str(SOURCE)],
                       capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        pytest.fail(f"javac {SOURCE} failed ({r.returncode}):\n{r.stderr[-3000:]}", pytrace=False)
    return java, out


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    """One agent that traces only a cgroup of this module: (agent, cgroup)."""
    require_root()
    cg = Cgroup("java")
    agent = Agent(tmp_path_factory.mktemp("agent-java"), args=["--cgroup", str(cg.path)])
    try:
        agent.start()
        yield agent, cg
    finally:
        code = agent.stop()
        cg.remove()
    assert code == 0, f"agent exited with {code} after SIGINT\n{agent.stderr_tail()}"


def start_in(cg: Cgroup, cmd: list, workdir: Path, name: str, port: int | None = None) -> Server:
    """Starts a server in cgroup cg: on `port`, or one that prints "PORT n"."""
    log = Path(workdir) / f"{name}.log"
    proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=open(log, "wb"),
                            stdin=subprocess.DEVNULL, text=True, preexec_fn=cg.preexec())
    if port is None:
        line = proc.stdout.readline()
        if not line.startswith("PORT "):
            proc.kill()
            proc.wait()
            pytest.fail(f"{name} did not start: {line!r}\n{log.read_text(errors='replace')[-3000:]}",
                        pytrace=False)
        port = int(line.split()[1])
    wait_listening(port, proc, what=name, log=log)
    return Server(proc, port, name, log)


def get_orders(cg: Cgroup, port: int) -> set[int]:
    """Every order of ORDERS at once, each GET by its own curl (in cg); returns their pids."""
    curls = [subprocess.Popen(["curl", "-sS", "--max-time", "30", "-w", "\n%{http_code}",
                               f"http://127.0.0.1:{port}/orders/{o}"],
                              stdout=subprocess.PIPE, text=True, preexec_fn=cg.preexec())
             for o in ORDERS]
    outs = [c.communicate(timeout=60)[0] for c in curls]
    for o, out in zip(ORDERS, outs):
        assert out.endswith("\n200") and f'"order_id": "{o}"' in out, f"order {o}: {out!r}"
    return {c.pid for c in curls}


def run_orders(java, node, tmp_path, client: str, prefix: str, mode: str = ""):
    """curl -> JavaShop (CLIENT, calling PREFIX{id}; MODE: "", "async" or "handoff")
    -> stock.py for every order at once. Returns (the spans of this run, the Java server, the downstream server, what
    sonde_parent_ambiguous_total grew by)."""
    agent, cg = node
    java_bin, classes = java
    down = shop = None
    try:
        dport = free_port()
        down = start_in(cg, [PY, TESTS / "services" / "stock.py", dport], tmp_path, "stock.py", port=dport)
        shop = start_in(cg, [java_bin, "-Dsun.net.httpserver.nodelay=true", "-cp", classes, "JavaShop",
                             f"http://127.0.0.1:{dport}{prefix}", client] + ([mode] if mode else []),
                        tmp_path, f"JavaShop-{client}")
        before = metric(agent, AMBIGUOUS)
        curls = get_orders(cg, shop.port)
        # curl, the Java server, its call, the downstream server: 4 per order.
        spans = agent.wait_spans(curls | shop.pids() | down.pids(), 4 * len(ORDERS),
                                 what=f"of the 10 orders through JavaShop {client}")
        grew = metric(agent, AMBIGUOUS) - before
        return spans, shop, down, grew
    finally:
        for s in (shop, down):
            if s:
                s.stop()


def java_calls(spans, shop) -> list:
    return [s for s in spans if s.kind == CLIENT and s.pid in shop.pids()]


def check_spans(spans, shop, down, prefix: str) -> dict:
    """Per order: its curl span (a root), the Java server span (curl's child), the Java
    call (/prefix/{id}) and the downstream's server span (the call's child), each
    exactly once. Returns {order: {"curl", "server", "call", "leaf"}}; the call's
    parent is for the caller to check."""
    everything = fmt_spans(spans)
    out = {}
    for o in ORDERS:
        curl = [s for s in spans if s.service == "curl" and s.attrs.get("url.path") == f"/orders/{o}"]
        server = [s for s in spans if s.kind == SERVER and s.pid in shop.pids()
                  and s.attrs.get("url.path") == f"/orders/{o}"]
        call = [s for s in java_calls(spans, shop) if s.attrs.get("url.path") == f"{prefix}{o}"]
        leaf = [s for s in spans if s.kind == SERVER and s.pid in down.pids()
                and s.attrs.get("url.path") == f"{prefix}{o}"]
        assert all(len(x) == 1 for x in (curl, server, call, leaf)), \
            f"order {o}: expected one curl, Java server, Java call and downstream span each:\n{everything}"
        (curl,), (server,), (call,), (leaf,) = curl, server, call, leaf
        assert not curl.parent_span_id, f"order {o}: curl's span is the root:\n{everything}"
        assert server.parent_span_id == curl.span_id and server.trace_id == curl.trace_id, \
            f"order {o}: the Java server span is curl's child:\n{everything}"
        assert leaf.parent_span_id == call.span_id and leaf.trace_id == call.trace_id, \
            f"order {o}: the downstream server span is the Java call's child:\n{everything}"
        assert server.attrs.get("order.id") == o, f"order {o}: {server}"
        out[o] = {"curl": curl, "server": server, "call": call, "leaf": leaf}
    assert len(spans) == 4 * len(ORDERS), f"4 spans per order, no more:\n{everything}"
    return out


def check_whole_traces(orders: dict, spans) -> None:
    """Each order's four spans are one trace of their own, its call the child of the
    Java server span of the same order."""
    everything = fmt_spans(spans)
    for o, t in orders.items():
        assert t["call"].parent_span_id == t["server"].span_id, \
            f"order {o}: the call {t['call']} must be the child of {t['server']}:\n{everything}"
        assert {s.trace_id for s in t.values()} == {t["curl"].trace_id}, \
            f"order {o}: its four spans are one trace:\n{everything}"
        assert all(s.attrs.get("order.id") == o for s in t.values()), \
            f"order {o}: order.id on every span of its trace:\n{everything}"
    assert len({t["curl"].trace_id for t in orders.values()}) == len(ORDERS), everything


@pytest.mark.parametrize("prefix", ["/orders/", "/stock/"])
def test_httpurlconnection_calls_are_children_of_the_request_their_thread_read(java, node, tmp_path, prefix):
    """HttpURLConnection writes on the pool thread that read the order: the thread
    alone tells the 8 in flight apart, with or without the order id in the call."""
    spans, shop, down, grew = run_orders(java, node, tmp_path, "urlconnection", prefix)
    check_whole_traces(check_spans(spans, shop, down, prefix), spans)
    assert grew == 0, f"{AMBIGUOUS} grew by {grew}:\n{fmt_spans(spans)}"


def test_httpclient_calls_are_children_by_the_order_id_they_share(java, node, tmp_path):
    """HttpClient writes on its own worker threads, which read no request: the thread
    is no evidence, but each call's /orders/{id} matches exactly one request in flight."""
    spans, shop, down, grew = run_orders(java, node, tmp_path, "httpclient", "/orders/")
    check_whole_traces(check_spans(spans, shop, down, "/orders/"), spans)
    assert grew == 0, f"{AMBIGUOUS} grew by {grew}:\n{fmt_spans(spans)}"


def test_httpclient_calls_without_an_order_id_get_no_parent_and_are_counted(java, node, tmp_path):
    """HttpClient, and calls that carry no order id (/stock/{id}) made while 8 orders
    are in flight: nothing tells which order a call is for. Each such call is left
    without a parent (a trace of its own with the downstream span) and counted, never
    given another order's request. Only a call made while its order was the only one
    in flight (the last two orders, after the first eight) may get its parent."""
    spans, shop, down, grew = run_orders(java, node, tmp_path, "httpclient", "/stock/")
    orphans = check_never_a_wrong_parent(check_spans(spans, shop, down, "/stock/"), spans, grew)
    # The first 8 calls were made while 8 orders were in flight.
    assert orphans >= 8, f"{orphans} calls without a parent, expected at least 8:\n{fmt_spans(spans)}"


def check_never_a_wrong_parent(orders: dict, spans, grew: int) -> int:
    """Each order's call is the child of that order's Java server span, in its trace,
    or has no parent (a trace of its own with the downstream span), and each call
    without a parent was counted as ambiguous. Returns how many had none."""
    everything = fmt_spans(spans)
    servers = {t["server"].span_id: o for o, t in orders.items()}
    orphans, wrong = 0, {}
    for o, t in orders.items():
        call = t["call"]
        if not call.parent_span_id:
            orphans += 1
            assert call.trace_id != t["curl"].trace_id and t["leaf"].trace_id == call.trace_id, \
                f"order {o}: a call left without a parent starts its own trace:\n{everything}"
            assert len([s for s in spans if s.trace_id == call.trace_id]) == 2, everything
        elif call.parent_span_id != t["server"].span_id:
            wrong[o] = servers.get(call.parent_span_id, call.parent_span_id)
        else:
            assert call.trace_id == t["curl"].trace_id, everything
    assert not wrong, (f"WRONG parents: {len(wrong)} calls were given another order's request "
                       f"(call's order: parent's order) {wrong}; {AMBIGUOUS} grew by {grew}:\n{everything}")
    assert grew == orphans, f"{AMBIGUOUS} grew by {grew}, {orphans} calls were left without a parent:\n{everything}"
    return orphans


@pytest.mark.parametrize("prefix", ["/orders/", "/stock/"])
def test_a_call_made_on_a_thread_that_read_another_order_never_gets_its_parent(java, node, tmp_path, prefix):
    """Orders handed between pool threads (JavaShop handoff): the thread that read the
    i-th of the first 8 orders makes the (i+1)-th's call, while the i-th is in flight.
    An asynchronous handler that hands its order to a task on the same pool (JavaShop
    async) does this by chance. The thread then points at another order: each call must
    be the child of its own order's request, or have no parent and be counted; never
    another order's, whether or not the call carries its order id."""
    spans, shop, down, grew = run_orders(java, node, tmp_path, "urlconnection", prefix, mode="handoff")
    check_never_a_wrong_parent(check_spans(spans, shop, down, prefix), spans, grew)
