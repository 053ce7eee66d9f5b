"""Parents inside a Go net/http service, by goroutine (issue 8, item 1; README "Whole
traces").

A real Go program: `sonde-go-clients shop` (tests/go), net/http's server and
http.DefaultClient. 10 orders at once, each from its own curl, GET /orders/{id}; the
first 8 wait for each other in the service, so that 8 are in flight when their calls
are made. For each order the handler calls a downstream service on this node
(tests/services/stock.py, Python) at /stock/{id}, a path that carries no order id
sonde knows of: nothing but the goroutine can tell which order a call is for. Go's
transport writes each request from its connection's writeLoop goroutine, not from the
handler's, and the threads under the goroutines change all the time; with -spawn the
call is made from a goroutine the handler starts. Runs as root.

The agent traces only a cgroup of this module's own (--cgroup), so that
sonde_parent_ambiguous_total is this module's.
"""
import pytest

from clientlib import require_go, wait_tls_attached
from inproc_lib import AMBIGUOUS, ORDERS, cgroup_agent, check_spans, check_whole_traces, get_orders, start_in
from sonde_testlib import PY, TESTS, fmt_spans, free_port, metric


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    """One agent that traces only a cgroup of this module: (agent, cgroup)."""
    yield from cgroup_agent(tmp_path_factory, "go")


def run_orders(node, tmp_path, prefix: str, spawn: bool):
    """curl -> the Go shop (calling PREFIX{id}) -> stock.py for every order at once.
    Returns (the spans of this run, the shop, the downstream, what
    sonde_parent_ambiguous_total grew by)."""
    agent, cg = node
    go = require_go()
    down = shop = None
    try:
        dport = free_port()
        down = start_in(cg, [PY, TESTS / "services" / "stock.py", dport], tmp_path, "stock.py", port=dport)
        shop = start_in(cg, [go, "shop", "-down", f"http://127.0.0.1:{dport}{prefix}"]
                        + (["-spawn"] if spawn else []), tmp_path, "go-shop")
        # The goroutine uprobes go on the executable with its TLS ones.
        wait_tls_attached(agent, go)
        before = metric(agent, AMBIGUOUS)
        curls = get_orders(cg, shop.port)
        spans = agent.wait_spans(curls | shop.pids() | down.pids(), 4 * len(ORDERS),
                                 what="of the 10 orders through the Go shop")
        grew = metric(agent, AMBIGUOUS) - before
        return spans, shop, down, grew
    finally:
        for s in (shop, down):
            if s:
                s.stop()


@pytest.mark.parametrize("spawn", [False, True], ids=["handler-goroutine", "spawned-goroutine"])
@pytest.mark.parametrize("prefix", ["/stock/", "/orders/"])
def test_go_calls_are_children_of_the_request_their_goroutine_serves(node, tmp_path, prefix, spawn):
    """With 8 orders in flight, each call (written by the transport's writeLoop
    goroutine, for a handler goroutine or one it started) is the child of its own
    order's server span, whether or not it carries the order id: one trace per order,
    nothing left ambiguous."""
    spans, shop, down, grew = run_orders(node, tmp_path, prefix, spawn)
    check_whole_traces(check_spans(spans, shop, down, prefix, what="Go"), spans)
    assert grew == 0, f"{AMBIGUOUS} grew by {grew}:\n{fmt_spans(spans)}"
