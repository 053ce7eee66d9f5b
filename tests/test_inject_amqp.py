"""traceparent injection into AMQP 0-9-1 publishes (`--inject-traceparent`) between two
nodes, played by two agents on this machine, each limited to a cgroup v2 directory of
its own (`--cgroup`): the publisher runs in one, the consumer in the other, and the
broker (our own RabbitMQ node, as in test_amqp_integration.py) in neither.

What a user checks: the consumer receives exactly the properties and body that were
published plus one `traceparent` entry in the message's headers (none added where the
publisher had put one), and the consumer agent's span of each delivery is the child
of the producer span the publisher's agent reported for that publish, in its trace.
"""
from __future__ import annotations

import json
import re
import subprocess
import time
import uuid

import pytest

from clientlib import (RabbitMQ, require_go, require_node, require_pika,
                       node_amqp_cmd, go_cmd)
from sonde_testlib import (
    CONSUMER, PRODUCER, PY, TESTS, Agent, Cgroup, fmt_spans, metric,
                           require_root)

INJECT = TESTS / "inject"
VALUE = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-01")
GIVEN = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    require_root()
    require_pika()
    rabbit = RabbitMQ().start()
    pub_cg, con_cg = Cgroup("inject-amqp-pub"), Cgroup("inject-amqp-con")
    pub_agent = Agent(tmp_path_factory.mktemp("publisher-node"),
                      args=["--inject-traceparent", "--cgroup", str(pub_cg.path)])
    con_agent = Agent(tmp_path_factory.mktemp("consumer-node"),
                      args=["--inject-traceparent", "--cgroup", str(con_cg.path)])
    pub_agent.start()
    con_agent.start()
    assert metric(pub_agent, "sonde_inject_active") == 1, \
        f"injection did not attach:\n{pub_agent.stderr_tail()}"
    yield rabbit, pub_cg, con_cg, pub_agent, con_agent
    codes = (pub_agent.stop(), con_agent.stop())
    pub_cg.remove()
    con_cg.remove()
    rabbit.stop()
    assert codes == (0, 0), (f"agents exited with {codes}\n--- publisher agent ---\n"
                             f"{pub_agent.stderr_tail()}\n--- consumer agent ---\n"
                             f"{con_agent.stderr_tail()}")


def start_consumer(rabbit, cg, queue: str, count: int) -> subprocess.Popen:
    con = subprocess.Popen([PY, str(INJECT / "amqp_consumer.py"), str(rabbit.port), queue,
                            str(count)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           stdin=subprocess.DEVNULL, text=True, preexec_fn=cg.preexec())
    first = con.stdout.readline()
    if first.strip() != "READY":
        con.kill()
        pytest.fail(f"consumer did not start: {first!r} {con.stderr.read()}", pytrace=False)
    return con


def run_publisher(cmd: list, cg) -> tuple[subprocess.Popen, str]:
    pub = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                           cwd=INJECT, preexec_fn=cg.preexec())
    out, err = pub.communicate(timeout=120)
    assert pub.returncode == 0, f"publisher {cmd}: {err}"
    return pub, out


def received(con: subprocess.Popen) -> list[dict]:
    out, err = con.communicate(timeout=120)
    assert con.returncode == 0, f"consumer: {err}"
    return [json.loads(line) for line in out.splitlines()]


def injected_value(got: dict, sent_headers: dict | None) -> tuple[str, str]:
    """The traceparent entry that was added to the headers sent; the rest as sent."""
    headers = dict(got["props"]["headers"] or {})
    value = headers.pop("traceparent", None)
    # pika gives a long string that is UTF-8 as str.
    assert isinstance(value, str), \
        f"no traceparent long string in the headers received: {got['props']['headers']}"
    m = VALUE.fullmatch(value)
    assert m, f"not a traceparent: {value}"
    assert headers == (sent_headers or {}), "the other headers changed"
    # The entry comes first in the table.
    assert list((got["props"]["headers"] or {}))[0] == "traceparent"
    return m.group(1), m.group(2)


def check_trace(pub_agent, con_agent, pub_pid, con_pid, ids: list[tuple[str, str]],
                given: int = 0) -> None:
    """Each (trace, span) written is a producer span of the publisher's node and the
    parent of one consumer span of the consumer's node, in the same trace."""
    n = len(ids) + given
    prod = pub_agent.wait_spans([pub_pid], n, what="producer spans on the publisher node")
    cons = con_agent.wait_spans([con_pid], n, what="consumer spans on the consumer node")
    producers = [s for s in prod if s.kind == PRODUCER]
    consumers = [s for s in cons if s.kind == CONSUMER]
    ctx = f"\npublisher node:\n{fmt_spans(prod)}\nconsumer node:\n{fmt_spans(cons)}"
    assert len(producers) == n and len(consumers) == n, ctx
    for trace, span in ids:
        p = [s for s in producers if s.span_id == span]
        assert len(p) == 1 and p[0].trace_id == trace, f"no producer span {span} in {trace}{ctx}"
        c = [s for s in consumers if s.parent_span_id == span]
        assert len(c) == 1 and c[0].trace_id == trace, f"no consumer span under {span}{ctx}"


def test_pika_publishes_continue_the_trace_on_the_other_node(nodes):
    rabbit, pub_cg, con_cg, pub_agent, con_agent = nodes
    before = {k: metric(pub_agent, k) for k in (
        "sonde_inject_injected_total", 'sonde_inject_skipped_total{reason="already_present"}')}
    queue = f"inject-{uuid.uuid4().hex[:8]}"
    con = start_consumer(rabbit, con_cg, queue, 5)
    pub, out = run_publisher([PY, INJECT / "amqp_publisher.py", rabbit.port, queue], pub_cg)
    sent = [json.loads(line) for line in out.splitlines()]
    got = received(con)
    assert [s["case"] for s in sent] == ["no_properties", "headers_and_more",
                                         "content_type_only", "big_body", "traceparent_given"]
    assert len(got) == 5, got
    ids = []
    for s, g in zip(sent, got):
        assert g["body"] == s["body"], f"{s['case']}: the body changed"
        if s["case"] == "traceparent_given":
            assert g["props"] == s["props"], f"{s['case']}: left alone"
            continue
        ids.append(injected_value(g, s["props"]["headers"]))
        others = {k: v for k, v in g["props"].items() if k != "headers"}
        assert others == {k: v for k, v in s["props"].items() if k != "headers"}, \
            f"{s['case']}: a property other than headers changed"
    assert len(set(ids)) == 4, ids
    check_trace(pub_agent, con_agent, pub.pid, con.pid, ids, given=1)
    given_trace, given_span = VALUE.fullmatch(GIVEN).groups()
    cons = [s for s in con_agent.spans_of([con.pid]) if s.kind == CONSUMER]
    assert [(s.trace_id, s.parent_span_id) for s in cons
            if s.parent_span_id == given_span] == [(given_trace, given_span)], fmt_spans(cons)
    deadline = time.monotonic() + 5
    while True:
        after = {k: metric(pub_agent, k) for k in before}
        if list(after.values()) == [before[k] + d for k, d in zip(before, (4, 1))]:
            break
        assert time.monotonic() < deadline, f"counters {before} -> {after}"
        time.sleep(0.2)
    assert metric(pub_agent, "sonde_inject_unmatched_total") == 0
    # The consumer only received: nothing it sent was rewritten.
    assert metric(con_agent, "sonde_inject_injected_total") == 0


@pytest.mark.parametrize("lang", ["node", "go"])
def test_other_publishers_continue_the_trace(nodes, lang):
    rabbit, pub_cg, con_cg, pub_agent, con_agent = nodes
    queue = f"inject-{lang}-{uuid.uuid4().hex[:8]}"
    count, size = 3, 300
    if lang == "node":
        require_node("amqplib")
        cmd = node_amqp_cmd("publish", rabbit.url, "", "direct", queue, count, size, "confirm",
                            lang)
    else:
        require_go()
        cmd = go_cmd("amqp-publish", "-url", rabbit.url, "-rk", queue, "-count", count,
                     "-size", size, "-id", lang, "-confirm")
    con = start_consumer(rabbit, con_cg, queue, count)
    pub, _ = run_publisher(cmd, pub_cg)
    got = received(con)
    assert len(got) == count, got
    ids = []
    for i, g in enumerate(got, 1):
        body = bytes.fromhex(g["body"])
        assert len(body) == size and json.loads(body)["order_id"] == i, body[:80]
        ids.append(injected_value(g, None))
        p = g["props"]
        assert (p["content_type"], p["message_id"], p["correlation_id"]) == \
            ("application/json", f"{lang}-{i}", f"order-{i}"), p
    check_trace(pub_agent, con_agent, pub.pid, con.pid, ids)
