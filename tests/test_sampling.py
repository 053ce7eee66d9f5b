"""Sampling by order (issue 15), against the real agent: 1,000 orders from a Python
client in one cgroup to a Python order API in another, each cgroup traced by its own
agent (`--cgroup`, as two nodes would be), both at `--sample-ratio 0.1`. Each order is
two requests (POST /orders, GET /orders/ID) on a keep-alive connection, so two traces
per order in each agent; one order in 50 fails (HTTP 500).

What a user checks: about 100 orders kept (binomial bounds); the same orders kept by
both agents, and exactly those the published hash of the order id gives; every kept
order complete in both agents' output and no span of a dropped order in either; every
failed order kept whatever the ratio; the decisions counted on /metrics. Runs as root.
"""
import math
import subprocess
import time
import uuid

import pytest

from sonde_testlib import (
    CLIENT, PY, SERVER, STATUS_ERROR, TESTS, Agent, Cgroup, free_port, require_root,
    wait_listening,
)

ORDERS = 1000
FAIL_EVERY = 50
RATIO = 0.1

CLIENT_CODE = r'''
import http.client, json, socket, sys
port, prefix, n, fail_every = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
c.connect()
c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
for i in range(n):
    oid = f"{prefix}-{i}" + ("-F" if i % fail_every == 7 else "")
    body = json.dumps({"order_id": oid, "model": "cube.stl"})
    c.request("POST", "/orders", body, {"Content-Type": "application/json"})
    c.getresponse().read()
    c.request("GET", f"/orders/{oid}")
    c.getresponse().read()
print("done", flush=True)
'''


def order_value(order_id: str) -> int:
    """The sampling hash the README publishes: FNV-1a 64 over the id's UTF-8 bytes,
    SplitMix64's finaliser, the top 56 bits. Written from the README, not the agent."""
    mask = (1 << 64) - 1
    h = 0xcbf29ce484222325
    for b in order_id.encode():
        h = ((h ^ b) * 0x100000001b3) & mask
    h = ((h ^ (h >> 30)) * 0xbf58476d1ce4e5b9) & mask
    h = ((h ^ (h >> 27)) * 0x94d049bb133111eb) & mask
    h ^= h >> 31
    return h >> 8


def threshold(ratio: float) -> int:
    return int(ratio * (1 << 56))


def metric(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        head, value = line.rsplit(" ", 1)
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


@pytest.fixture
def two_nodes(tmp_path):
    require_root()
    a, b = Cgroup("client"), Cgroup("server")
    yield a, b
    a.remove()
    b.remove()


def test_a_tenth_of_the_orders_kept_whole_by_both_agents_and_every_failed_one(tmp_path, two_nodes):
    node_a, node_b = two_nodes
    port = free_port()
    server = subprocess.Popen([PY, str(TESTS / "services" / "orders_api.py"), str(port)],
                              preexec_fn=node_b.preexec(), stdin=subprocess.DEVNULL)
    agents = [
        Agent(tmp_path / name, args=["--cgroup", str(node.path), "--sample-ratio", str(RATIO)])
        for name, node in (("a", node_a), ("b", node_b))
    ]
    try:
        wait_listening(port, server)
        t0 = time.monotonic()
        for agent in agents:
            agent.start()
        print(f"agents ready in {time.monotonic() - t0:.1f} s")
        t0 = time.monotonic()
        prefix = "ORD-" + uuid.uuid4().hex[:8]
        client = subprocess.run(
            [PY, "-c", CLIENT_CODE, str(port), prefix, str(ORDERS), str(FAIL_EVERY)],
            preexec_fn=node_a.preexec(), capture_output=True, text=True, timeout=300)
        assert client.returncode == 0 and "done" in client.stdout, client.stderr
        print(f"{ORDERS} orders sent in {time.monotonic() - t0:.1f} s")
        ids = [f"{prefix}-{i}" + ("-F" if i % FAIL_EVERY == 7 else "") for i in range(ORDERS)]
        failed = {i for i in ids if i.endswith("-F")}
        by_ratio = {i for i in ids if order_value(i) < threshold(RATIO)}
        expected = by_ratio | failed

        # Kept orders leave at once; wait for them, then for the link hold to pass.
        want = {"a": 2 * len(expected), "b": 2 * len(expected)}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            counts = {name: len([s for s in agent.spans() if s.attrs.get("order.id") in expected])
                      for name, agent in zip("ab", agents)}
            if counts == want:
                break
            time.sleep(0.5)
        print(f"kept spans after {time.monotonic() - t0:.1f} s: {counts} of {want}")
        time.sleep(2)
        metrics = [agent.get("/metrics")[1] for agent in agents]
    finally:
        for agent in agents:
            agent.stop()
        server.kill()
        server.wait()

    # About a tenth by the ratio: binomial, 4.5 standard deviations either side.
    n = ORDERS - len(failed)
    mean, sd = n * RATIO, math.sqrt(n * RATIO * (1 - RATIO))
    assert abs(len(by_ratio - failed) - mean) <= 4.5 * sd, (len(by_ratio), mean, sd)

    for name, agent, kind, mine in (("a", agents[0], CLIENT, "client"),
                                    ("b", agents[1], SERVER, "server")):
        spans = [s for s in agent.spans() if s.attrs.get("order.id", "").startswith(prefix)]
        kept = {s.attrs["order.id"] for s in spans}
        missing, extra = expected - kept, kept - expected
        assert not missing and not extra, (
            f"agent {name}: {len(missing)} expected orders missing (e.g. {sorted(missing)[:3]}), "
            f"{len(extra)} dropped orders exported (e.g. {sorted(extra)[:3]})")
        assert all(s.kind == kind for s in spans), f"agent {name} saw the other node's spans"
        # Complete: both requests of every kept order, once each.
        per_order: dict[str, list[str]] = {}
        for s in spans:
            per_order.setdefault(s.attrs["order.id"], []).append(s.attrs.get("http.request.method"))
        incomplete = {o: m for o, m in per_order.items() if sorted(m) != ["GET", "POST"]}
        assert not incomplete, f"agent {name}: {mine} spans of kept orders: {list(incomplete.items())[:3]}"
        # The failed orders' POSTs are errors on both ends.
        for s in spans:
            if s.attrs["order.id"] in failed and s.attrs.get("http.request.method") == "POST":
                assert s.status_code == STATUS_ERROR, s

    for name, text in zip("ab", metrics):
        kept_ratio = metric(text, "sonde_sampling_decisions_total", kind="order",
                            decision="kept", reason="ratio", late="false")
        kept_error = metric(text, "sonde_sampling_decisions_total", kind="order",
                            decision="kept", reason="error", late="false")
        assert kept_ratio == len(by_ratio), (name, kept_ratio, len(by_ratio))
        assert kept_error == len(failed - by_ratio), (name, kept_error, len(failed - by_ratio))
