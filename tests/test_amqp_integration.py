"""Integration with RabbitMQ (issue 4): the real agent, our own RabbitMQ node (Debian's
rabbitmq-server on free ports), publishers and consumers in Python (pika), Node.js
(amqplib) and Go (amqp091-go).

Every test asserts the exact spans of each client process: a PRODUCER span per publish
(`publish {exchange}:{routing key}`, outcome `ack` when publisher confirms are on), a
CONSUMER span per delivery (`deliver {exchange}:{routing key}:{queue}`, delivery tag,
redelivered flag, outcome), and each delivery as the child of the publish that carried
its message (same trace, parent = the producer span), across processes and languages.
The attribute names and span names are those of agent/src/spans/amqp.rs. Runs as root.
"""
import pytest

from clientlib import (
    GO_SERVICE, RabbitMQ, Background, by_message_id, check_consumer, check_producer, exactly,
    go_cmd, node_amqp_cmd, pika_cmd, require_go, require_node, require_pika, run_json,
)
from sonde_testlib import Agent, fmt_spans

CONFIRM = True


@pytest.fixture(scope="module")
def rabbit():
    require_pika()
    r = RabbitMQ().start()
    yield r
    r.stop()


# ---------------------------------------------------------------- clients, per language

def consumer(lang, rabbit, exchange, etype, queues, count, ack="manual", requeue_first=False):
    """Starts a consumer of `queues` ([(queue, binding key)]) and waits until it consumes."""
    if lang == "python":
        cmd = pika_cmd("consume", "--port", rabbit.port, "--exchange", exchange, "--type", etype,
                       "--count", count, "--ack", ack)
        for q, k in queues:
            cmd += ["--queue", f"{q}:{k}"]
        if requeue_first:
            cmd.append("--requeue-first")
    elif lang == "node":
        require_node("amqplib")
        assert not requeue_first
        cmd = node_amqp_cmd("consume", rabbit.url, exchange, etype, count, ack,
                            *[f"{q}:{k}" for q, k in queues])
    else:
        require_go()
        assert not requeue_first
        cmd = go_cmd("amqp-consume", "-url", rabbit.url, "-exchange", exchange, "-type", etype,
                     "-count", count, "-ack", ack)
        for q, k in queues:
            cmd += ["-queue", f"{q}:{k}"]
    return Background(cmd, f"{lang} consumer").wait_ready()


def publish(lang, rabbit, exchange, etype, rk, count, size, confirm, prefix):
    if lang == "python":
        cmd = pika_cmd("publish", "--port", rabbit.port, "--exchange", exchange, "--type", etype,
                       "--rk", rk, "--count", count, "--size", size, "--id", prefix)
        if confirm:
            cmd.append("--confirm")
    elif lang == "node":
        require_node("amqplib")
        cmd = node_amqp_cmd("publish", rabbit.url, exchange, etype, rk, count, size,
                            "confirm" if confirm else "none", prefix)
    else:
        require_go()
        cmd = go_cmd("amqp-publish", "-url", rabbit.url, "-exchange", exchange, "-type", etype,
                     "-rk", rk, "-count", count, "-size", size, "-id", prefix)
        if confirm:
            cmd.append("-confirm")
    run = run_json(cmd, what=f"{lang} publisher")
    assert run.out["published"] == count, run.out
    if confirm:
        assert run.out["acked"] == count, run.out
    return run


SERVICE = {"python": "pika_client", "node": "amqp", "go": GO_SERVICE}


def check_flow(agent, rabbit, pub, con, *, lang_pub, lang_con, exchange, rk, queues, count, size,
               confirmed, outcome, prefix):
    """count messages from pub, each delivered once to every queue in `queues` and consumed
    by con: exact producer and consumer spans, each delivery the child of its publish."""
    prod = exactly(agent, [pub.pid], count, f"from the {lang_pub} publisher")
    cons = exactly(agent, [con.pid], count * len(queues), f"from the {lang_con} consumer")
    everything = prod + cons
    try:
        producers = by_message_id(prod)
        consumers = by_message_id(cons)
        assert sorted(producers) == [f"{prefix}-{i}" for i in range(1, count + 1)], "message ids"
        tags = {q: [] for q in queues}
        for i in range(1, count + 1):
            mid = f"{prefix}-{i}"
            assert len(producers[mid]) == 1, f"{mid}: one publish"
            p = producers[mid][0]
            check_producer(p, exchange=exchange, routing_key=rk, message_id=mid,
                           correlation_id=f"order-{i}", body_size=size, port=rabbit.port,
                           confirmed=confirmed)
            assert p.service == SERVICE[lang_pub], f"service.name: {p}"
            ds = consumers.get(mid, [])
            got_queues = sorted(d.attrs.get("messaging.destination.subscription.name") for d in ds)
            assert got_queues == sorted(queues), f"{mid}: one delivery per queue {queues}, got {got_queues}"
            for d in ds:
                q = d.attrs["messaging.destination.subscription.name"]
                tags[q].append(d.attrs.get("messaging.rabbitmq.message.delivery_tag"))
                check_consumer(d, p, exchange=exchange, routing_key=rk, queue=q, message_id=mid,
                               correlation_id=f"order-{i}", body_size=size, port=rabbit.port,
                               delivery_tag=d.attrs.get("messaging.rabbitmq.message.delivery_tag"),
                               redelivered=False, outcome=outcome)
                assert d.service == SERVICE[lang_con], f"service.name: {d}"
        # One channel: the consumer's delivery tags are 1..n, each once.
        all_tags = sorted(t for ts in tags.values() for t in ts)
        assert all_tags == list(range(1, count * len(queues) + 1)), f"delivery tags {all_tags}"
    except AssertionError as e:
        raise AssertionError(f"{e}\n--- spans of this test ---\n{fmt_spans(everything)}") from None
    return prod, cons


# ---------------------------------------------------------------- before the agent

def test_consumer_started_before_agent(rabbit, tmp_path):
    """A pika consumer connects, declares, binds and consumes before the agent starts (its
    connection, and the consumer tag's queue, predate the agent). After the agent starts, a
    pika publisher (confirms) sends 3 messages: every delivery must still make a CONSUMER
    span linked to its publish. Its own agent: this test runs before the module's."""
    ex, rk, q = "sonde.pre", "order.created", "sonde.pre.q"
    con = consumer("python", rabbit, ex, "direct", [(q, rk)], 3)
    agent = Agent(tmp_path / "agent")
    try:
        agent.start()
        pub = publish("python", rabbit, ex, "direct", rk, 3, 120, CONFIRM, "pre")
        run = con.finish()
        assert [d["message_id"] for d in run.out["received"]] == ["pre-1", "pre-2", "pre-3"]
        prod = exactly(agent, [pub.pid], 3, "from the publisher")
        cons = exactly(agent, [con.pid], 3, "from the consumer that started before the agent")
        producers = by_message_id(prod)
        try:
            for i, d in enumerate(sorted(cons, key=lambda s: s.start), 1):
                mid = f"pre-{i}"
                p = producers[mid][0]
                check_producer(p, exchange=ex, routing_key=rk, message_id=mid,
                               correlation_id=f"order-{i}", body_size=120, port=rabbit.port,
                               confirmed=True)
                # The queue of a consumer registered before the agent is not knowable.
                check_consumer(d, p, exchange=ex, routing_key=rk, queue=None, message_id=mid,
                               correlation_id=f"order-{i}", body_size=120, port=rabbit.port,
                               delivery_tag=i, redelivered=False, outcome="ack")
        except AssertionError as e:
            raise AssertionError(f"{e}\n--- spans ---\n{fmt_spans(prod + cons)}") from None
    finally:
        con.kill()
        code = agent.stop()
    assert code == 0, f"agent exited with {code}\n{agent.stderr_tail()}"


def test_auto_ack_consumer_started_before_agent(rabbit, tmp_path):
    """A pika consumer with auto-ack registers before the agent starts, so the agent cannot
    know it will never ack. Every delivery must still make a CONSUMER span linked to its
    publish, with outcome `unknown`, while the consumer's connection stays open (after
    the agent's wait for an ack, not at the connection's end). Its own agent."""
    ex, rk, q = "sonde.pre.auto", "order.created", "sonde.pre.auto.q"
    # It waits for a 4th message that never comes: its connection outlives the test.
    con = consumer("python", rabbit, ex, "direct", [(q, rk)], 4, ack="auto")
    agent = Agent(tmp_path / "agent")
    try:
        agent.start()
        pub = publish("python", rabbit, ex, "direct", rk, 3, 120, CONFIRM, "preauto")
        prod = exactly(agent, [pub.pid], 3, "from the publisher")
        cons = agent.wait_spans([con.pid], 3, timeout=30, what="from the auto-ack consumer")
        assert con.proc.poll() is None, "the consumer should still be running"
        assert len(cons) == 3, fmt_spans(cons)
        producers = by_message_id(prod)
        try:
            for i, d in enumerate(sorted(cons, key=lambda s: s.start), 1):
                mid = f"preauto-{i}"
                check_consumer(d, producers[mid][0], exchange=ex, routing_key=rk, queue=None,
                               message_id=mid, correlation_id=f"order-{i}", body_size=120,
                               port=rabbit.port, delivery_tag=i, redelivered=False,
                               outcome="unknown")
                assert "sonde.incomplete" not in d.attrs, d
                # It ends when the message was delivered, not after the wait for an ack.
                assert d.end - d.start < 1_000_000_000, d
        except AssertionError as e:
            raise AssertionError(f"{e}\n--- spans ---\n{fmt_spans(prod + cons)}") from None
    finally:
        con.kill()
        code = agent.stop()
    assert code == 0, f"agent exited with {code}\n{agent.stderr_tail()}"


# ---------------------------------------------------------------- one language end to end

def test_python_direct_confirms_manual_ack(agent, rabbit):
    """pika -> direct exchange -> pika: publisher confirms, manual acks."""
    ex, rk, q = "sonde.py.direct", "order.created", "sonde.py.q"
    con = consumer("python", rabbit, ex, "direct", [(q, rk)], 3)
    pub = publish("python", rabbit, ex, "direct", rk, 3, 200, CONFIRM, "py")
    con.finish()
    check_flow(agent, rabbit, pub, con, lang_pub="python", lang_con="python", exchange=ex, rk=rk,
               queues=[q], count=3, size=200, confirmed=True, outcome="ack", prefix="py")


def test_node_topic_confirms_manual_ack(agent, rabbit):
    """amqplib -> topic exchange (binding orders.*) -> amqplib: confirm channel, manual acks."""
    ex, rk, q = "sonde.node.topic", "orders.created", "sonde.node.q"
    con = consumer("node", rabbit, ex, "topic", [(q, "orders.*")], 3)
    pub = publish("node", rabbit, ex, "topic", rk, 3, 150, CONFIRM, "node")
    con.finish()
    check_flow(agent, rabbit, pub, con, lang_pub="node", lang_con="node", exchange=ex, rk=rk,
               queues=[q], count=3, size=150, confirmed=True, outcome="ack", prefix="node")


def test_go_fanout_two_queues_auto_ack(agent, rabbit):
    """amqp091-go -> fanout exchange bound to two queues -> amqp091-go consuming both with
    auto-ack: each publish has two CONSUMER children, one per queue."""
    ex, q1, q2 = "sonde.go.fanout", "sonde.go.q1", "sonde.go.q2"
    con = consumer("go", rabbit, ex, "fanout", [(q1, ""), (q2, "")], 4, ack="auto")
    pub = publish("go", rabbit, ex, "fanout", "", 2, 100, CONFIRM, "go")
    con.finish()
    check_flow(agent, rabbit, pub, con, lang_pub="go", lang_con="go", exchange=ex, rk="",
               queues=[q1, q2], count=2, size=100, confirmed=True, outcome="auto_ack", prefix="go")


def test_go_direct_no_confirms_manual_ack(agent, rabbit):
    """amqp091-go publisher without confirms (no outcome on the PRODUCER span) -> direct
    exchange -> amqp091-go consumer with manual acks."""
    ex, rk, q = "sonde.go.direct", "order.status", "sonde.go.status"
    con = consumer("go", rabbit, ex, "direct", [(q, rk)], 3)
    pub = publish("go", rabbit, ex, "direct", rk, 3, 80, False, "gonc")
    con.finish()
    check_flow(agent, rabbit, pub, con, lang_pub="go", lang_con="go", exchange=ex, rk=rk,
               queues=[q], count=3, size=80, confirmed=False, outcome="ack", prefix="gonc")


# ---------------------------------------------------------------- across languages

def test_node_publisher_to_go_and_python_consumers(agent, rabbit):
    """One amqplib publish (no confirms) to a topic exchange, routed to two queues: one
    consumed by Go (manual ack), one by pika (auto-ack). One PRODUCER span, two CONSUMER
    children in two other processes and languages."""
    ex, rk = "sonde.mixed", "orders.eu.created"
    qg, qp = "sonde.mixed.go", "sonde.mixed.py"
    cg = consumer("go", rabbit, ex, "topic", [(qg, "orders.#")], 2)
    cp = consumer("python", rabbit, ex, "topic", [(qp, "*.eu.*")], 2, ack="auto")
    pub = publish("node", rabbit, ex, "topic", rk, 2, 90, False, "mixed")
    cg.finish()
    cp.finish()
    prod = exactly(agent, [pub.pid], 2, "from the node publisher")
    go_spans = exactly(agent, [cg.pid], 2, "from the Go consumer")
    py_spans = exactly(agent, [cp.pid], 2, "from the pika consumer")
    everything = prod + go_spans + py_spans
    try:
        producers = by_message_id(prod)
        for spans, q, outcome, lang in ((go_spans, qg, "ack", "go"), (py_spans, qp, "auto_ack", "python")):
            for d in spans:
                mid = d.attrs.get("messaging.message.id")
                i = int(mid.rsplit("-", 1)[1])
                p = producers[mid][0]
                check_producer(p, exchange=ex, routing_key=rk, message_id=mid,
                               correlation_id=f"order-{i}", body_size=90, port=rabbit.port,
                               confirmed=False)
                check_consumer(d, p, exchange=ex, routing_key=rk, queue=q, message_id=mid,
                               correlation_id=f"order-{i}", body_size=90, port=rabbit.port,
                               delivery_tag=i, redelivered=False, outcome=outcome)
                assert d.service == SERVICE[lang], d
    except AssertionError as e:
        raise AssertionError(f"{e}\n--- spans ---\n{fmt_spans(everything)}") from None


# ---------------------------------------------------------------- settling and sizes

def test_nack_requeue_and_redelivery(agent, rabbit):
    """pika consumer nacks the first delivery with requeue, then acks the redelivery: two
    CONSUMER spans (outcome requeue, redelivered false; outcome ack, redelivered true), both
    children of the one PRODUCER span."""
    ex, rk, q = "sonde.requeue", "order.created", "sonde.requeue.q"
    con = consumer("python", rabbit, ex, "direct", [(q, rk)], 1, requeue_first=True)
    pub = publish("python", rabbit, ex, "direct", rk, 1, 64, CONFIRM, "rq")
    run = con.finish()
    assert [(d["redelivered"], d["delivery_tag"]) for d in run.out["received"]] == [(False, 1), (True, 2)], run.out
    prod = exactly(agent, [pub.pid], 1, "from the publisher")
    cons = exactly(agent, [con.pid], 2, "from the consumer (delivery and redelivery)")
    try:
        p = prod[0]
        check_producer(p, exchange=ex, routing_key=rk, message_id="rq-1", correlation_id="order-1",
                       body_size=64, port=rabbit.port, confirmed=True)
        first, second = sorted(cons, key=lambda s: s.attrs.get("messaging.rabbitmq.message.delivery_tag"))
        check_consumer(first, p, exchange=ex, routing_key=rk, queue=q, message_id="rq-1",
                       correlation_id="order-1", body_size=64, port=rabbit.port, delivery_tag=1,
                       redelivered=False, outcome="requeue")
        check_consumer(second, p, exchange=ex, routing_key=rk, queue=q, message_id="rq-1",
                       correlation_id="order-1", body_size=64, port=rabbit.port, delivery_tag=2,
                       redelivered=True, outcome="ack")
        assert second.start >= first.end, "the redelivery follows the nack"
    except AssertionError as e:
        raise AssertionError(f"{e}\n--- spans ---\n{fmt_spans(prod + cons)}") from None


# amqplib reads 64 KiB at a time: with two large messages back to back, one read can
# hold the end of the first body and, tens of KiB in, the second message's
# basic.deliver, past the per-syscall capture cap (README, "What is parsed"). pika's
# reads do not; so node gets one large message, python two.
@pytest.mark.parametrize("pub_lang,con_lang,count", [("go", "python", 2), ("python", "node", 1)])
def test_large_body_split_over_frames(agent, rabbit, pub_lang, con_lang, count):
    """300 KB messages: more than two body frames of the default frame_max (128 KB) each
    way, and more than the parser keeps of a body. Exact body size on both spans; the
    delivery still links to its publish."""
    size = 300 * 1024
    ex, rk, q = f"sonde.large.{pub_lang}", "model.uploaded", f"sonde.large.{con_lang}"
    con = consumer(con_lang, rabbit, ex, "direct", [(q, rk)], count)
    pub = publish(pub_lang, rabbit, ex, "direct", rk, count, size, CONFIRM, f"large{pub_lang}")
    run = con.finish()
    assert [d["size"] for d in run.out["received"]] == [size] * count, run.out
    check_flow(agent, rabbit, pub, con, lang_pub=pub_lang, lang_con=con_lang, exchange=ex, rk=rk,
               queues=[q], count=count, size=size, confirmed=True, outcome="ack",
               prefix=f"large{pub_lang}")
