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

import pytest

from inproc_lib import (AMBIGUOUS, cgroup_agent, check_never_a_wrong_parent, check_spans,
                        check_whole_traces, run_orders_through)
from sonde_testlib import TESTS, fmt_spans

SOURCE = TESTS / "services" / "JavaShop.java"


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
    yield from cgroup_agent(tmp_path_factory, "java")


def run_orders(java, node, tmp_path, client: str, prefix: str, mode: str = ""):
    """curl -> JavaShop (CLIENT, calling PREFIX{id}; MODE: "", "async" or "handoff")
    -> stock.py for every order at once: see inproc_lib.run_orders_through."""
    java_bin, classes = java
    return run_orders_through(
        node, tmp_path,
        lambda url: [java_bin, "-Dsun.net.httpserver.nodelay=true", "-cp", classes, "JavaShop", url, client]
        + ([mode] if mode else []),
        f"JavaShop-{client}", prefix)


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
