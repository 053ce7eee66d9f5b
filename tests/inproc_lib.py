"""What the tests of parents inside a service (issue 8, item 1) share: a service under
test ("the shop", in Java or Go) that takes 10 orders at once, each from its own curl,
and calls a downstream service on this node per order; one agent that traces only a
cgroup of the test module's own, so that sonde_parent_ambiguous_total is the test's;
and the checks of the four spans per order (curl, the shop's server span, its call, the
downstream's server span).
"""
import subprocess
from pathlib import Path

from clientlib import start_port_server
from sonde_testlib import (CLIENT, PY, SERVER, TESTS, Agent, Cgroup, Server, fmt_spans, free_port, metric,
                           require_root, wait_listening)

ORDERS = [f"j-{i}" for i in range(10)]
AMBIGUOUS = "sonde_parent_ambiguous_total"


def cgroup_agent(tmp_path_factory, name: str, args: list | None = None):
    """A fixture body: one agent (with these extra arguments) that traces only a new
    cgroup; yields (agent, cgroup)."""
    require_root()
    cg = Cgroup(name)
    agent = Agent(tmp_path_factory.mktemp(f"agent-{name}"), args=["--cgroup", str(cg.path), *(args or [])])
    try:
        agent.start()
        yield agent, cg
    finally:
        code = agent.stop()
        cg.remove()
    assert code == 0, f"agent exited with {code} after SIGINT\n{agent.stderr_tail()}"


def start_in(cg: Cgroup, cmd: list, workdir: Path, name: str, port: int | None = None) -> Server:
    """Starts a server in cgroup cg: on `port`, or one that prints "PORT n"."""
    if port is None:
        return start_port_server(cmd, workdir, name, preexec_fn=cg.preexec())
    log = Path(workdir) / f"{name}.log"
    proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.DEVNULL, stderr=open(log, "wb"),
                            stdin=subprocess.DEVNULL, preexec_fn=cg.preexec())
    wait_listening(port, proc, what=name, log=log)
    return Server(proc, port, name, log)


def run_orders_through(node, tmp_path, shop_cmd, what: str, prefix: str, ready=None):
    """curl -> the shop (the command `shop_cmd(url)`, url the downstream's PREFIX) ->
    tests/services/stock.py, every order of ORDERS at once; `ready(shop)`
    runs once the shop listens. Returns (the spans of this run, the shop, the
    downstream, what sonde_parent_ambiguous_total grew by)."""
    agent, cg = node
    down = shop = None
    try:
        dport = free_port()
        down = start_in(cg, [PY, TESTS / "services" / "stock.py", dport], tmp_path, "stock.py", port=dport)
        shop = start_in(cg, shop_cmd(f"http://127.0.0.1:{dport}{prefix}"), tmp_path, what)
        if ready:
            ready(shop)
        before = metric(agent, AMBIGUOUS)
        curls = get_orders(cg, shop.port)
        # curl, the shop's server span, its call, the downstream server: 4 per order.
        spans = agent.wait_spans(curls | shop.pids() | down.pids(), 4 * len(ORDERS),
                                 what=f"of the 10 orders through {what}")
        grew = metric(agent, AMBIGUOUS) - before
        return spans, shop, down, grew
    finally:
        for s in (shop, down):
            if s:
                s.stop()


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


def shop_calls(spans, shop) -> list:
    return [s for s in spans if s.kind == CLIENT and s.pid in shop.pids()]


def check_spans(spans, shop, down, prefix: str, what: str = "Java") -> dict:
    """Per order: its curl span (a root), the service's server span (curl's child), its
    call (/prefix/{id}) and the downstream's server span (the call's child), each
    exactly once. Returns {order: {"curl", "server", "call", "leaf"}}; the call's
    parent is for the caller to check."""
    everything = fmt_spans(spans)
    out = {}
    for o in ORDERS:
        curl = [s for s in spans if s.service == "curl" and s.attrs.get("url.path") == f"/orders/{o}"]
        server = [s for s in spans if s.kind == SERVER and s.pid in shop.pids()
                  and s.attrs.get("url.path") == f"/orders/{o}"]
        call = [s for s in shop_calls(spans, shop) if s.attrs.get("url.path") == f"{prefix}{o}"]
        leaf = [s for s in spans if s.kind == SERVER and s.pid in down.pids()
                and s.attrs.get("url.path") == f"{prefix}{o}"]
        assert all(len(x) == 1 for x in (curl, server, call, leaf)), \
            f"order {o}: expected one curl, {what} server, {what} call and downstream span each:\n{everything}"
        (curl,), (server,), (call,), (leaf,) = curl, server, call, leaf
        assert not curl.parent_span_id, f"order {o}: curl's span is the root:\n{everything}"
        assert server.parent_span_id == curl.span_id and server.trace_id == curl.trace_id, \
            f"order {o}: the {what} server span is curl's child:\n{everything}"
        assert leaf.parent_span_id == call.span_id and leaf.trace_id == call.trace_id, \
            f"order {o}: the downstream server span is the {what} call's child:\n{everything}"
        assert server.attrs.get("order.id") == o, f"order {o}: {server}"
        out[o] = {"curl": curl, "server": server, "call": call, "leaf": leaf}
    assert len(spans) == 4 * len(ORDERS), f"4 spans per order, no more:\n{everything}"
    return out


def check_whole_traces(orders: dict, spans) -> None:
    """Each order's four spans are one trace of their own, its call the child of the
    service's server span of the same order."""
    everything = fmt_spans(spans)
    for o, t in orders.items():
        assert t["call"].parent_span_id == t["server"].span_id, \
            f"order {o}: the call {t['call']} must be the child of {t['server']}:\n{everything}"
        assert {s.trace_id for s in t.values()} == {t["curl"].trace_id}, \
            f"order {o}: its four spans are one trace:\n{everything}"
        assert all(s.attrs.get("order.id") == o for s in t.values()), \
            f"order {o}: order.id on every span of its trace:\n{everything}"
    assert len({t["curl"].trace_id for t in orders.values()}) == len(ORDERS), everything


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
