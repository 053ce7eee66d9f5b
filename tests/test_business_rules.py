"""Business attributes and the config file (issue 8, items 2 and 5), against the real
agent: order.id (and order.status) from a URL path, a query, JSON request and response
bodies (snake_case, camelCase, nested) and an AMQP message body with the default rules;
a config file rule with a custom attribute; `--exclude-comm` leaving a program
untraced; a broken config file refused with its line before anything is attached.
Runs as root.
"""
import json
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from clientlib import PRODUCER, RabbitMQ, require_pika
from sonde_testlib import (
    CLIENT, PY, SERVER, Agent, Server, by_kind, fmt_spans, require_root, run_curl, sonde_bin,
    wait_listening,
)

UNTRACED = "untraced-curl"
SERVICES = Path(__file__).resolve().parent / "services"

CONFIG = """\
# A config file as a user writes one: a custom attribute, defaults kept.
business:
  rules:
    - attribute: purchase.number
      json: data.purchase.number
      in: response
      method: POST
      route: /v2/**
    - attribute: customer.tier
      header: X-Tier
selection:
  exclude_comm: [never-runs-here]
"""

SERVER_CODE = r'''
import sys
sys.path.insert(0, SERVICES)
from jsonhttp import JsonHandler, serve

class H(JsonHandler):
    def do_GET(self):
        self.answer(200, {"ok": True, "status": "fine"})
    def do_POST(self):
        req = self.json_body()
        if self.path.startswith("/v2/"):
            self.answer(201, {"data": {"purchase": {"number": req["ref"], "total": 12.5}}})
        elif self.path == "/checkout":
            self.answer(201, {"customer": "c-1", "order": {"id": req["ref"], "status": "created"}})
        else:
            self.answer(200, {"accepted": True})

serve(H)
'''


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    require_root()
    work = tmp_path_factory.mktemp("agent")
    cfg = work / "sonde.yaml"
    cfg.write_text(CONFIG)
    a = Agent(work, args=["--config", str(cfg), "--exclude-comm", UNTRACED])
    a.start()
    yield a
    code = a.stop()
    assert code == 0, f"agent exited with {code}\n{a.stderr_tail()}"


@pytest.fixture(scope="module")
def shop(agent, tmp_path_factory):
    work = tmp_path_factory.mktemp("shop")
    script = work / "shop.py"
    script.write_text(f"SERVICES = {str(SERVICES)!r}\n" + SERVER_CODE)
    proc = subprocess.Popen([PY, str(script)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL, text=True)
    port = int(proc.stdout.readline().split()[1])
    wait_listening(port, proc, what="shop.py")
    s = Server(proc, port, "shop.py")
    yield s
    s.stop()


def one_server_span(agent, shop, path_prefix, what):
    """Waits for the shop's server span whose url.path starts with path_prefix."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        found = [s for s in by_kind(agent.spans_of(shop.pids), SERVER)
                 if str(s.attrs.get("url.path", "")).startswith(path_prefix)]
        if found:
            assert len(found) == 1, f"{what}: expected one span:\n{fmt_spans(found)}"
            return found[0]
        time.sleep(0.2)
    pytest.fail(f"no server span for {what}:\n{fmt_spans(agent.spans_of(shop.pids))}", pytrace=False)


def client_span(agent, pid, what):
    spans = by_kind(agent.wait_spans([pid], 1, what=what), CLIENT)
    assert len(spans) == 1, f"{what}:\n{fmt_spans(spans)}"
    return spans[0]


def unique(prefix):
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def test_order_id_from_a_url_path(agent, shop):
    oid = unique("ORD")
    c = run_curl([shop.url(f"/api/orders/{oid}123")])
    srv = one_server_span(agent, shop, f"/api/orders/{oid}", "GET /api/orders/{id}")
    assert srv.attrs.get("order.id") == f"{oid}123", srv
    # The response's bare "status" is beside no order id: not the order's status.
    assert "order.status" not in srv.attrs, srv
    assert client_span(agent, c.pid, "curl's GET").attrs.get("order.id") == f"{oid}123"


def test_order_id_from_a_query_parameter(agent, shop):
    oid = unique("Q")
    run_curl([shop.url(f"/track?lang=en&orderId={oid}")])
    srv = one_server_span(agent, shop, "/track", "GET /track?orderId")
    assert srv.attrs.get("order.id") == oid, srv


@pytest.mark.parametrize("body_key", ["order_id", "orderId"])
def test_order_id_and_status_from_a_json_request_body(agent, shop, body_key):
    oid = unique(body_key)
    body = json.dumps({"customer": {"name": "Ann"}, body_key: oid, "status": "paid",
                       "items": [{"model": "cube.stl"}]})
    path = f"/pay-{body_key}"
    run_curl([shop.url(path)], extra=["-X", "POST", "-H", "Content-Type: application/json",
                                      "--data-binary", body])
    srv = one_server_span(agent, shop, path, f"POST with {body_key} in the body")
    assert srv.attrs.get("order.id") == oid, srv
    assert srv.attrs.get("order.status") == "paid", srv


def test_nested_order_id_and_status_from_a_json_response_body(agent, shop):
    ref = unique("N")
    run_curl([shop.url("/checkout")], extra=["-X", "POST", "--data-binary", json.dumps({"ref": ref})])
    srv = one_server_span(agent, shop, "/checkout", "POST /checkout")
    assert srv.attrs.get("order.id") == ref, srv
    assert srv.attrs.get("order.status") == "created", srv
    # Bodies are never exported: no attribute carries the customer from the body.
    assert not any("c-1" == v for v in srv.attrs.values()), srv


def test_a_config_rule_sets_a_custom_attribute(agent, shop):
    ref = unique("P")
    run_curl([shop.url("/v2/purchases")],
             extra=["-X", "POST", "-H", "X-Tier: gold", "--data-binary", json.dumps({"ref": ref})])
    srv = one_server_span(agent, shop, "/v2/purchases", "POST /v2/purchases")
    assert srv.attrs.get("purchase.number") == ref, srv
    assert srv.attrs.get("customer.tier") == "gold", srv
    assert "order.id" not in srv.attrs, srv


def test_exclude_comm_leaves_a_program_untraced(agent, shop, tmp_path):
    untraced = tmp_path / UNTRACED
    shutil.copy(shutil.which("curl") or "/usr/bin/curl", untraced)
    hidden = subprocess.run([str(untraced), "-sS", "-o", "/dev/null", shop.url("/hidden/1")],
                            capture_output=True, timeout=30)
    assert hidden.returncode == 0, hidden.stderr
    # A traced curl after it: once its span is out, the untraced one's would be too.
    c = run_curl([shop.url("/visible/1")])
    client_span(agent, c.pid, "the traced curl")
    one_server_span(agent, shop, "/visible/1", "the traced curl's request")
    # The server is traced either way; the excluded client made no span at all.
    one_server_span(agent, shop, "/hidden/1", "the untraced client's request")
    hidden_client = [s for s in agent.spans() if s.kind == CLIENT
                     and s.attrs.get("url.path") == "/hidden/1"]
    assert not hidden_client, f"{UNTRACED} was traced:\n{fmt_spans(hidden_client)}"


def test_order_id_and_status_from_an_amqp_message_body(agent, tmp_path):
    require_pika()
    rabbit = RabbitMQ().start()
    try:
        oid = unique("AMQP")
        queue = unique("orders")
        script = tmp_path / "publish.py"
        script.write_text(
            "import json, sys, pika\n"
            "c = pika.BlockingConnection(pika.ConnectionParameters('127.0.0.1', int(sys.argv[1])))\n"
            "ch = c.channel()\n"
            "ch.queue_declare(sys.argv[2])\n"
            "body = json.dumps({'event': 'order.created', 'orderId': sys.argv[3], 'status': 'queued'})\n"
            "ch.basic_publish('', sys.argv[2], body.encode())\n"
            "c.close()\n")
        p = subprocess.run([PY, str(script), str(rabbit.port), queue, oid],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        deadline = time.monotonic() + 15
        producer = []
        while time.monotonic() < deadline and not producer:
            producer = [s for s in agent.spans()
                        if s.attrs.get("messaging.rabbitmq.destination.routing_key") == queue
                        and s.kind == PRODUCER]
            time.sleep(0.2)
        assert producer, f"no producer span for {queue}:\n{fmt_spans(agent.spans()[-20:])}"
        assert producer[0].attrs.get("order.id") == oid, producer[0]
        assert producer[0].attrs.get("order.status") == "queued", producer[0]
    finally:
        rabbit.stop()


def test_a_broken_config_file_is_refused_with_its_line_before_anything_is_attached(tmp_path):
    require_root()
    bad = tmp_path / "bad.yaml"
    bad.write_text("business:\n  rules:\n    - attribute: order.id\n      jsonpath: order.id\n")
    t = time.monotonic()
    r = subprocess.run([str(sonde_bin()), "run", "--config", str(bad)], capture_output=True,
                       text=True, timeout=60, env={"PATH": "/usr/bin:/bin", "RUST_LOG": "info"})
    assert r.returncode != 0, r.stderr
    assert "line 4" in r.stderr and "unknown field `jsonpath`" in r.stderr, r.stderr
    assert str(bad) in r.stderr, r.stderr
    assert "panicked" not in r.stderr and "attached" not in r.stderr, r.stderr
    assert time.monotonic() - t < 10
