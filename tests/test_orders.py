"""`sonde orders` (issue 9, items 3 and 4): each order's journey read back from a real
Jaeger v2, the JSON report, the summary, the web page in headless Chromium, and the
business metrics on the agent's /metrics. Real processes, the real kernel, runs as root.

The pipeline (tests/services/order_shop.py, no tracing code): curl -> shop (Python,
thread per request) -> PUT the model to the store (Python, plain HTTP) -> run the slicer
(tests/services/slicer.sh, a program of its own) -> publish to RabbitMQ -> the MES
consumer (tests/services/mes_consumer.py) -> GET the order from a Go service over
HTTPS. Three orders: one good, one whose model is broken (the slicer exits 1, the shop
answers 422 with status failed), one whose upload hangs in the store for 30 s (stalled,
with --stall-timeout 2s).
"""
import json
import os
import random
import shutil
import string
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from clientlib import Background, RabbitMQ, make_cert, require_go, start_port_server, wait_tls_attached
from sonde_testlib import PY, TESTS, Agent, free_port, require_root, sonde_bin, wait_listening
from test_jaeger_e2e import Jaeger

SHOT_DIR = Path(os.environ.get("SONDE_ORDERS_SHOTS", "/tmp/sonde-orders-shots"))
# Order ids with digits, as real ones have: the agent templates them out of routes.
STORE_STAGE = "store: PUT /models/{id}"
SLICER_STAGE = "shop: slicer.sh"


def env_cmd(service: str, *cmd) -> list:
    """The command with OTEL_SERVICE_NAME set, the standard way a service names itself."""
    return ["env", f"OTEL_SERVICE_NAME={service}", *cmd]


def orders_cli(jaeger: Jaeger, *args, timeout: float = 90) -> subprocess.CompletedProcess:
    r = subprocess.run([str(sonde_bin()), "orders", "--jaeger", f"http://127.0.0.1:{jaeger.query_port}",
                        *args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, f"sonde orders {args} exited {r.returncode}\n{r.stderr}\n{r.stdout}"
    return r


def report(jaeger: Jaeger, *ids, wait: float | None = 45, quiet: float = 2) -> dict:
    """`sonde orders --json --wait`: waits for each order's trace to be quiet. An order
    with no trace never is: --wait would wait its whole time for it."""
    waiting = ["--wait", str(wait), "--quiet", str(quiet)] if wait is not None else []
    r = orders_cli(jaeger, "--json", *waiting, *ids)
    rows = json.loads(r.stdout)
    assert [o["order_id"] for o in rows] == list(ids), r.stdout
    for o in rows:
        assert list(o) == ["order_id", "trace_id", "services", "spans", "duration_ms", "status",
                           "failed_stage"], o
    return {o["order_id"]: o for o in rows}


def post_order(port: int, oid: str, model: str) -> subprocess.Popen:
    return subprocess.Popen(
        ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST", "-H",
         "Content-Type: application/json", "--data", json.dumps({"order_id": oid, "model": model}),
         f"http://127.0.0.1:{port}/orders"], stdout=subprocess.PIPE, text=True)


def chromium() -> str:
    exe = shutil.which("chromium")
    if not exe:
        pytest.fail("chromium not installed: scripts/setup-tests.sh installs Debian's chromium package",
                    pytrace=False)
    return exe


def browse(url: str, tmp: Path, screenshot: Path | None = None) -> str:
    """The page as headless Chromium renders it (its DOM), and a screenshot of it."""
    flags = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp / ('chromium-' + str(time.monotonic_ns()))}", "--window-size=1280,860"]
    dom = subprocess.run(flags + ["--dump-dom", url], capture_output=True, text=True, timeout=90)
    assert dom.returncode == 0 and "</html>" in dom.stdout, f"chromium --dump-dom {url}: {dom.stderr[-2000:]}"
    if screenshot:
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        shot = subprocess.run(flags + [f"--screenshot={screenshot}", url], capture_output=True, text=True,
                              timeout=90)
        assert shot.returncode == 0 and screenshot.stat().st_size > 10_000, \
            f"chromium --screenshot {url}: {shot.stderr[-2000:]}"
        assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return dom.stdout


def metric(text: str, name: str, **labels) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{want}}} "):
            return float(line.rsplit(" ", 1)[1])
    pytest.fail(f"{name}{{{want}}} not on /metrics:\n" +
                "\n".join(l for l in text.splitlines() if l.startswith(name))[:4000], pytrace=False)


def test_journeys_report_summary_page_and_metrics(tmp_path):
    require_root()
    tag = "".join(random.choices(string.ascii_lowercase, k=6))
    good, broken, stuck, absent = (f"ord-{tag}-{1000 + i}-{k}"
                                   for i, k in enumerate(("good", "broken", "hang", "absent")))
    cert = make_cert(tmp_path / "tls")
    jaeger = Jaeger(tmp_path)
    rabbit = RabbitMQ().start()
    agent = Agent(tmp_path / "agent", output="otlp",
                  args=["--otlp-endpoint", f"http://127.0.0.1:{jaeger.http_port}",
                        "--otlp-protocol", "http/protobuf", "--stall-timeout", "2s"])
    procs = []
    page = None
    try:
        agent.start()
        go = start_port_server(env_cmd("catalog", require_go(), "tls-server", "-cert", cert.cert,
                                       "-key", cert.key), tmp_path, "go")
        procs.append(go)
        wait_tls_attached(agent, require_go())
        store = start_port_server(env_cmd("store", PY, TESTS / "services" / "order_shop.py", "store"),
                                  tmp_path, "store")
        procs.append(store)
        mes = Background(env_cmd("mes", PY, TESTS / "services" / "mes_consumer.py", rabbit.port,
                                 f"orders-{tag}", "order.created", f"mes-{tag}", cert.cert,
                                 f"https://127.0.0.1:{go.port}", 2), "mes_consumer.py").wait_ready()
        shop = start_port_server(env_cmd("shop", PY, TESTS / "services" / "order_shop.py", "shop", store.port,
                                         rabbit.port, f"orders-{tag}", "order.created",
                                         TESTS / "services" / "slicer.sh"), tmp_path, "shop")
        procs.append(shop)

        assert post_order(shop.port, good, "good").communicate(timeout=60)[0] == "201"
        assert post_order(shop.port, broken, "broken").communicate(timeout=60)[0] == "422"
        hanging = post_order(shop.port, stuck, "hang")

        # While the upload hangs: the good, the broken, the stalled and the absent order.
        asked = time.monotonic()
        rep = report(jaeger, good, broken, stuck)
        assert hanging.poll() is None, \
            f"the hanging order ended before its report ({time.monotonic() - asked:.1f} s): {rep}"
        g, b, h = rep[good], rep[broken], rep[stuck]
        a = report(jaeger, absent, wait=None)[absent]
        assert g["trace_id"] and g["failed_stage"] is None, g
        assert {"curl", "shop", "store", "mes", "catalog"} <= set(g["services"]), g
        assert g["services"][:2] == ["curl", "shop"], g
        # The catalog's answer (status "created") is the last status any span carries.
        assert g["status"] == "created", g
        assert g["spans"] >= 7 and g["duration_ms"] > 200, g
        assert b["status"] == "failed" and b["failed_stage"] == SLICER_STAGE, b
        assert "mes" not in b["services"], b
        assert h["status"] == "stalled" and h["failed_stage"] == STORE_STAGE, h
        assert a == {"order_id": absent, "trace_id": None, "services": [], "spans": 0, "duration_ms": None,
                     "status": "unknown", "failed_stage": None}, a
        assert len({g["trace_id"], b["trace_id"], h["trace_id"]}) == 3, rep

        # One order's journey, as a person reads it.
        text = orders_cli(jaeger, broken).stdout
        assert f"order {broken}  trace {b['trace_id']}" in text, text
        assert f"BROKE at stage {SLICER_STAGE}" in text and "exit code 1" in text, text
        assert f"PUT http://127.0.0.1:{store.port}/models/{broken}.stl" in text, text
        assert "slicer.sh broken" in text and "exit code 1" in text, text
        text = orders_cli(jaeger, good).stdout
        assert "no error, no stall" in text, text
        assert f"exchange orders-{tag}:order.created" in text and "routing key order.created" in text, text
        assert "waited" in text and "in the broker" in text, text
        text = orders_cli(jaeger, stuck).stdout
        assert f"STALLS at stage {STORE_STAGE}" in text and "still running after" in text, text

        # The page, in Chromium, while the order still hangs.
        port = free_port()
        page = subprocess.Popen([str(sonde_bin()), "orders", "--jaeger", f"http://127.0.0.1:{jaeger.query_port}",
                                 "--serve", f"127.0.0.1:{port}", "--since", "15m"],
                                stdout=subprocess.DEVNULL, stderr=open(tmp_path / "page.log", "wb"),
                                stdin=subprocess.DEVNULL)
        wait_listening(port, page, what="sonde orders --serve", log=tmp_path / "page.log")
        base = f"http://127.0.0.1:{port}"
        dom = browse(f"{base}/journey/{stuck}", tmp_path, SHOT_DIR / "order-stalled.png")
        assert "⏸ stalls here" in dom and 'class="bar stalled"' in dom, dom[:4000]
        dom = browse(base + "/", tmp_path, SHOT_DIR / "orders-list.png")
        assert hanging.poll() is None, "the hanging order ended before the page was checked"
        for oid, status in ((good, "created"), (broken, "failed"), (stuck, "stalled")):
            assert f'data-order="{oid}"' in dom, dom[:3000]
            row = dom.split(f'data-order="{oid}"', 1)[1].split("</tr>", 1)[0]
            assert f">{status}<" in row, row
        assert SLICER_STAGE in dom and STORE_STAGE in dom
        dom = browse(f"{base}/journey/{broken}", tmp_path, SHOT_DIR / "order-broken.png")
        assert "✖ broke here" in dom and f"Broke at stage <b>{SLICER_STAGE}</b>" in dom, dom[:4000]
        assert dom.count('class="span ') >= 6 and 'class="bar error"' in dom, dom[:4000]
        dom = browse(f"{base}/journey/{good}", tmp_path, SHOT_DIR / "order-good.png")
        assert "No error, no stall." in dom and {"shop", "store", "mes", "catalog"} <= {
            s.split('"')[0] for s in dom.split('data-service="')[1:]}, dom[:4000]
        dom = browse(f"{base}/journey/{absent}", tmp_path)
        assert 'id="no-trace"' in dom

        # The upload ends: the stall is over, the order goes on to the MES.
        assert hanging.communicate(timeout=60)[0] == "201"
        mes.finish()
        h = report(jaeger, stuck)[stuck]
        assert h["failed_stage"] is None and h["status"] == "created" and "mes" in h["services"], h
        assert h["duration_ms"] >= 30000, h

        summary = json.loads(orders_cli(jaeger, "--json", "--since", "15m").stdout)
        mine = [s for s in summary["stages"] if s["stage"] in (SLICER_STAGE, STORE_STAGE)]
        assert summary["orders"] >= 3 and summary["failed_orders"] >= 1, summary
        by = {s["stage"]: s for s in mine}
        assert by[SLICER_STAGE]["count"] >= 3 and by[SLICER_STAGE]["failed"] >= 1, by
        assert by[STORE_STAGE]["p99_ms"] >= 30000 and by[STORE_STAGE]["count"] >= 3, by
        table = orders_cli(jaeger, "--since", "15m").stdout
        assert "p50" in table and "p99" in table and SLICER_STAGE in table, table

        # Business metrics on the agent's /metrics.
        status, m = agent.get("/metrics")
        assert status == 200
        route = "/models/{id}"
        assert metric(m, "sonde_http_total", service="store", kind="server", method="PUT", route=route) >= 3
        assert metric(m, "sonde_http_duration_seconds_bucket", service="store", kind="server", method="PUT",
                      route=route, le="+Inf") >= 3
        assert metric(m, "sonde_http_duration_seconds_bucket", service="store", kind="server", method="PUT",
                      route=route, le="10") <= metric(m, "sonde_http_total", service="store", kind="server",
                                                      method="PUT", route=route) - 1
        assert metric(m, "sonde_http_errors_total", service="curl", kind="client", method="POST",
                      route="/orders") >= 1
        assert metric(m, "sonde_messaging_total", service="shop", operation="publish",
                      destination=f"orders-{tag}:order.created") >= 2
        assert metric(m, "sonde_order_stage_errors_total", service="shop", stage="slicer.sh") >= 1
        assert metric(m, "sonde_order_stage_total", service="shop", stage="slicer.sh") >= 3
        for oid in (good, broken, stuck):
            assert oid not in m, f"order id {oid} used as a label value"
    finally:
        if page and page.poll() is None:
            page.terminate()
            page.wait(timeout=10)
        for p in procs:
            p.stop()
        if "mes" in locals():
            mes.kill()
        code = agent.stop()
        rabbit.stop()
        jaeger.stop()
    assert code == 0, agent.stderr_tail()
