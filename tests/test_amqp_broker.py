"""The broker's own view (issue 4, item 4): with RabbitMQ itself traced (its beam.smp,
service.name from its process), every message it routes makes one SERVER span on the
broker's service, `route {exchange}:{routing key}`, the child of the publisher's
PRODUCER span, ending at the last delivery the broker sent, with the queues it was
delivered from and the number of deliveries. A fan-out shows as one publish, one broker
span listing the queues, and one delivery per queue; the CONSUMER spans stay children of
the producer span. Real agent, our own RabbitMQ node, pika clients. Runs as root.
"""
import subprocess
import time

import pytest

from clientlib import (
    CONSUMER, PRODUCER, Background, RabbitMQ, by_message_id, exactly, pika_cmd, require_pika,
    run_json,
)
from sonde_testlib import PY, SERVER, SETTLE, SPAN_TIMEOUT, STATUS_UNSET, fmt_spans

EXCHANGE = "sonde.broker.fan"
ROUTING_KEY = "order.status"
QUEUES = ["sonde.broker.crm", "sonde.broker.audit"]
COUNT = 2
SIZE = 90


@pytest.fixture(scope="module")
def rabbit(agent):
    """Our own broker, started after the module's agent (conftest.py), so that the
    broker's connections are seen from their start."""
    require_pika()
    r = RabbitMQ().start()
    yield r
    r.stop()


def broker_spans(agent, rabbit, exchange, count):
    """The broker's `count` spans of messages published to `exchange` (its other traffic,
    rabbitmqctl's, makes none). They are held for the deliveries (3 s) before they leave."""
    pids = rabbit.pids()
    assert pids, "the broker's processes"

    def routes():
        return [s for s in agent.spans_of(pids)
                if s.attrs.get("messaging.rabbitmq.exchange") == exchange]

    deadline = time.monotonic() + SPAN_TIMEOUT + 3
    while len(routes()) < count and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(SETTLE)
    got = routes()
    assert len(got) == count, (
        f"expected {count} broker spans of {exchange}, got {len(got)}:\n"
        f"{fmt_spans(agent.spans_of(pids))}\n--- agent stderr (tail) ---\n"
        f"{agent.stderr_tail(3000)}")
    return got, pids


def consumer(rabbit, queue):
    return consumer_of(rabbit, EXCHANGE, queue, count=COUNT, etype="fanout")


def consumer_of(rabbit, exchange, queue, count, etype="direct"):
    cmd = pika_cmd("consume", "--port", rabbit.port, "--exchange", exchange, "--type", etype,
                   "--queue", f"{queue}:{queue if etype == 'direct' else ''}", "--count", count,
                   "--ack", "manual")
    return Background(cmd, f"consumer of {queue}").wait_ready()


def test_fanout_shows_one_publish_one_broker_span_and_a_delivery_per_queue(agent, rabbit):
    cons = [consumer(rabbit, q) for q in QUEUES]
    pub = run_json(pika_cmd("publish", "--port", rabbit.port, "--exchange", EXCHANGE,
                            "--type", "fanout", "--rk", ROUTING_KEY, "--count", COUNT,
                            "--size", SIZE, "--confirm", "--id", "fan"),
                   what="pika publisher")
    assert pub.out == {"published": COUNT, "acked": COUNT}, pub.out
    for c, q in zip(cons, QUEUES):
        run = c.finish()
        assert sorted(d["message_id"] for d in run.out["received"]) == ["fan-1", "fan-2"], run.out
        assert {d["queue"] for d in run.out["received"]} == {q}

    prod = exactly(agent, [pub.pid], COUNT, "from the publisher")
    consumed = exactly(agent, [c.pid for c in cons], COUNT * len(QUEUES), "from the consumers")
    broker, broker_pids = broker_spans(agent, rabbit, EXCHANGE, COUNT)
    everything = prod + broker + consumed
    try:
        producers, brokers, consumers = (by_message_id(prod), by_message_id(broker),
                                         by_message_id(consumed))
        assert sorted(brokers) == ["fan-1", "fan-2"], "one broker span per message"
        for mid in ("fan-1", "fan-2"):
            (p,) = producers[mid]
            (b,) = brokers[mid]
            ds = consumers[mid]
            assert p.kind == PRODUCER and p.parent_span_id == "", f"producer {p}"
            # The broker span: on the broker's service, child of the producer span.
            ctx = f"broker span {b}"
            assert b.kind == SERVER, f"kind {b.kind} != SERVER: {ctx}"
            assert b.name == f"route {EXCHANGE}:{ROUTING_KEY}", ctx
            assert b.pid in broker_pids, ctx
            assert b.service and b.service != p.service, f"service {b.service!r}: {ctx}"
            assert (b.trace_id, b.parent_span_id) == (p.trace_id, p.span_id), (
                f"broker span not under its publish:\n  {b}\n  {p}")
            want = {
                "messaging.system": "rabbitmq",
                "messaging.operation.name": "route",
                "messaging.destination.name": f"{EXCHANGE}:{ROUTING_KEY}",
                "messaging.rabbitmq.exchange": EXCHANGE,
                "messaging.rabbitmq.destination.routing_key": ROUTING_KEY,
                "messaging.message.id": mid,
                "messaging.message.conversation_id": f"order-{mid[-1]}",
                "messaging.message.body.size": SIZE,
                "messaging.rabbitmq.deliveries": len(QUEUES),
                "messaging.rabbitmq.outcome": "ack",
                "server.address": "127.0.0.1",
                "server.port": rabbit.port,
                "client.address": "127.0.0.1",
                "network.protocol.name": "amqp",
            }
            for k, v in want.items():
                assert b.attrs.get(k) == v, f"{k}: {b.attrs.get(k)!r} != {v!r}: {ctx}"
            assert sorted(b.attrs.get("messaging.rabbitmq.queues") or []) == sorted(QUEUES), ctx
            assert "messaging.operation.type" not in b.attrs, ctx
            assert b.status_code == STATUS_UNSET, ctx
            # From the publish's arrival to the last delivery sent: inside the publish's
            # start and the end of the last consumer span.
            assert p.start <= b.start <= b.end, f"{ctx}\n  producer {p}"
            assert b.end <= max(d.end for d in ds), f"{ctx}\n  deliveries {fmt_spans(ds)}"
            # One delivery per queue, each a child of the producer span (not of the
            # broker span): the trace reads publish -> route, publish -> deliver x2.
            assert sorted(d.attrs.get("messaging.destination.subscription.name")
                          for d in ds) == sorted(QUEUES), fmt_spans(ds)
            for d in ds:
                assert d.kind == CONSUMER
                assert (d.trace_id, d.parent_span_id) == (p.trace_id, p.span_id), (
                    f"delivery not under its publish:\n  {d}\n  {p}")
            assert len({s.trace_id for s in [p, b, *ds]}) == 1
    except AssertionError as e:
        raise AssertionError(f"{e}\n--- spans of this test ---\n{fmt_spans(everything)}") from None


def test_a_message_that_waits_in_its_queue_leaves_the_broker_span_without_deliveries(agent, rabbit):
    """The broker span waits a bounded time (3 s) for the deliveries of its message: a
    message that sits in its queue longer is routed (the broker span, no deliveries, no
    queues, ending when the broker confirmed it), and its later delivery still makes a
    CONSUMER span under the producer span."""
    exchange, queue = "sonde.broker.direct", "sonde.broker.later"
    # Declare and bind the queue, with no consumer: the message waits in it.
    declare = (
        "import pika, sys\n"
        "c = pika.BlockingConnection(pika.ConnectionParameters('127.0.0.1', int(sys.argv[1])))\n"
        "ch = c.channel()\n"
        "ch.exchange_declare(sys.argv[2], exchange_type='direct', durable=False)\n"
        "ch.queue_declare(sys.argv[3], durable=False)\n"
        "ch.queue_bind(sys.argv[3], sys.argv[2], routing_key=sys.argv[3])\n"
        "c.close()\n"
    )
    subprocess.run([PY, "-c", declare, str(rabbit.port), exchange, queue], check=True,
                   timeout=60)
    pub = run_json(pika_cmd("publish", "--port", rabbit.port, "--exchange", exchange,
                            "--type", "direct", "--rk", queue, "--count", 1, "--size", SIZE,
                            "--confirm", "--id", "later"), what="pika publisher")
    (p,) = exactly(agent, [pub.pid], 1, "from the publisher")
    (b,), _ = broker_spans(agent, rabbit, exchange, 1)
    late = consumer_of(rabbit, exchange, queue, count=1)
    run = late.finish()
    assert [d["message_id"] for d in run.out["received"]] == ["later-1"], run.out
    (d,) = exactly(agent, [late.pid], 1, "from the late consumer")
    ctx = f"\n  broker {b}\n  producer {p}\n  consumer {d}"
    assert (b.trace_id, b.parent_span_id) == (p.trace_id, p.span_id), ctx
    assert b.attrs.get("messaging.rabbitmq.deliveries") == 0, ctx
    assert "messaging.rabbitmq.queues" not in b.attrs, ctx
    assert b.end < d.start, ctx
    assert (d.trace_id, d.parent_span_id) == (p.trace_id, p.span_id), ctx
