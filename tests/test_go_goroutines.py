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
from inproc_lib import AMBIGUOUS, cgroup_agent, check_spans, check_whole_traces, run_orders_through
from sonde_testlib import fmt_spans


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    """One agent that traces only a cgroup of this module: (agent, cgroup)."""
    yield from cgroup_agent(tmp_path_factory, "go", ["--follow-goroutines"])


def run_orders(node, tmp_path, prefix: str, spawn: bool):
    """curl -> the Go shop (calling PREFIX{id}) -> stock.py for every order at once:
    see inproc_lib.run_orders_through."""
    go = require_go()
    agent, _ = node
    return run_orders_through(
        node, tmp_path, lambda url: [go, "shop", "-down", url] + (["-spawn"] if spawn else []),
        "go-shop", prefix,
        # The goroutine uprobes go on the executable with its TLS ones.
        ready=lambda shop: wait_tls_attached(agent, go))


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
