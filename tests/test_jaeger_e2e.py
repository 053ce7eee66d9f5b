"""End-to-end: the agent exports over OTLP (gRPC and HTTP/protobuf) to a real Jaeger v2,
and the spans are found through Jaeger's query API with the right attributes."""
import json
import os
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest

from sonde_testlib import (
    REPO, TESTS, Agent, require_root, run_curl, stable_port, start_app, wait_listening,
)

pytestmark = pytest.mark.e2e

JAEGER_TIMEOUT = float(os.environ.get("SONDE_JAEGER_TIMEOUT", "30"))


def jaeger_bin() -> Path:
    p = Path(os.environ.get("SONDE_JAEGER_BIN", REPO / ".tools" / "jaeger"))
    if not p.is_file():
        pytest.fail(f"Jaeger binary not found at {p}: build it with scripts/build-jaeger.sh "
                    "(or set SONDE_JAEGER_BIN)", pytrace=False)
    return p


class Jaeger:
    """Jaeger v2 on free ports of 127.0.0.1. `config` (tests/jaeger/config.yaml by
    default) takes its ports from the JAEGER_* variables; `env` adds more."""

    def __init__(self, workdir: Path, config: Path | None = None, env: dict | None = None):
        self.workdir = workdir
        self.config = config or TESTS / "jaeger" / "config.yaml"
        self.extra_env = dict(env or {})
        # Below the ephemeral range: Jaeger is stopped and started again on these ports,
        # and while it is down any outgoing connection could take one from that range.
        ports: list[int] = []
        for _ in range(5):
            ports.append(stable_port(tuple(ports)))
        (self.grpc_port, self.http_port, self.query_port, self.query_grpc_port,
         self.health_port) = ports
        self.log = workdir / "jaeger.log"
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self):
        """Starts Jaeger on this instance's ports (again, after stop()) and waits until
        its receivers listen and its query API answers."""
        env = dict(os.environ)
        # Jaeger's own OpenTelemetry SDK would export its traces to localhost:4317.
        env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
        env.update({
            "OTEL_SDK_DISABLED": "true",
            "OTEL_TRACES_EXPORTER": "none",
            "JAEGER_OTLP_GRPC_ENDPOINT": f"127.0.0.1:{self.grpc_port}",
            "JAEGER_OTLP_HTTP_ENDPOINT": f"127.0.0.1:{self.http_port}",
            "JAEGER_QUERY_HTTP_ENDPOINT": f"127.0.0.1:{self.query_port}",
            "JAEGER_QUERY_GRPC_ENDPOINT": f"127.0.0.1:{self.query_grpc_port}",
            "JAEGER_HEALTH_ENDPOINT": f"127.0.0.1:{self.health_port}",
        })
        env.update(self.extra_env)
        self.proc = subprocess.Popen(
            [str(jaeger_bin()), "--config", str(self.config)],
            stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        for port in (self.grpc_port, self.http_port, self.query_port):
            wait_listening(port, self.proc, timeout=60, what="jaeger", log=self.log)
        deadline = time.monotonic() + 30
        while True:
            try:
                self.api("/api/services")
                break
            except (OSError, ValueError):
                if time.monotonic() > deadline:
                    pytest.fail(f"Jaeger query API not answering\n{self.log_tail()}", pytrace=False)
                time.sleep(0.2)

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def api(self, path: str, **params):
        q = ("?" + urllib.parse.urlencode(params)) if params else ""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.query_port}{path}{q}", timeout=10) as r:
            return json.loads(r.read())

    def services(self) -> list[str]:
        return self.api("/api/services").get("data") or []

    def find_spans(self, service: str, tags: dict | None = None) -> list[dict]:
        """Spans of `service` (flattened from /api/traces), each with its process
        (serviceName, tags) inlined as span['process']."""
        params = {"service": service, "lookback": "1h", "limit": "100"}
        if tags:
            params["tags"] = json.dumps(tags)
        try:
            data = self.api("/api/traces", **params).get("data") or []
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return []
            raise
        out = []
        for trace in data:
            procs = trace.get("processes", {})
            for s in trace.get("spans", []):
                if procs.get(s.get("processID"), {}).get("serviceName") != service:
                    continue
                s = dict(s)
                s["process"] = procs.get(s.get("processID"), {})
                out.append(s)
        return out

    def wait_spans(self, service: str, count: int, tags: dict | None = None,
                   timeout: float = JAEGER_TIMEOUT, settle: float = 1.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while True:
            got = self.find_spans(service, tags)
            if len(got) >= count:
                time.sleep(settle)
                return self.find_spans(service, tags)
            if time.monotonic() > deadline:
                pytest.fail(
                    f"Jaeger: expected {count} span(s) of service {service!r} with tags {tags} "
                    f"within {timeout} s, got {len(got)}: {json.dumps(got)[:3000]}\n"
                    f"services known: {self.services()}", pytrace=False)
            time.sleep(0.5)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def tags_of(span: dict) -> dict:
    return {t["key"]: t["value"] for t in span.get("tags", [])}


@pytest.fixture(scope="module")
def jaeger(tmp_path_factory):
    j = Jaeger(tmp_path_factory.mktemp("jaeger"))
    yield j
    j.stop()


# ---------------------------------------------------------------- the harness itself

def test_jaeger_harness_accepts_otlp_json(jaeger):
    """No agent: an OTLP/JSON request POSTed with curl is found through the query API.
    If this fails, the Jaeger harness is broken, not the agent."""
    svc = f"harness-{uuid.uuid4().hex[:8]}"
    now = time.time_ns()
    trace_id = uuid.uuid4().hex
    body = {"resourceSpans": [{
        "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": svc}}]},
        "scopeSpans": [{"scope": {"name": "harness"}, "spans": [{
            "traceId": trace_id, "spanId": uuid.uuid4().hex[:16], "name": "GET /orders/{id}",
            "kind": 2, "startTimeUnixNano": str(now - 5_000_000), "endTimeUnixNano": str(now),
            "attributes": [
                {"key": "http.route", "value": {"stringValue": "/orders/{id}"}},
                {"key": "http.response.status_code", "value": {"intValue": "200"}},
            ]}]}]}]}
    r = subprocess.run(["curl", "-sS", "-f", "-X", "POST", "-H", "Content-Type: application/json",
                        "--data-binary", json.dumps(body),
                        f"http://127.0.0.1:{jaeger.http_port}/v1/traces"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    spans = jaeger.wait_spans(svc, 1, tags={"http.route": "/orders/{id}"})
    assert len(spans) == 1
    assert spans[0]["operationName"] == "GET /orders/{id}"
    assert spans[0]["traceID"] == trace_id
    assert tags_of(spans[0])["http.response.status_code"] == 200
    assert svc in jaeger.services()


# ---------------------------------------------------------------- agent -> Jaeger

@pytest.mark.parametrize("protocol,how", [
    ("grpc", "flags"),
    ("http/protobuf", "flags"),
    ("http/protobuf", "env"),
])
def test_agent_exports_to_jaeger(jaeger, tmp_path, protocol, how):
    require_root()
    port = jaeger.grpc_port if protocol == "grpc" else jaeger.http_port
    endpoint = f"http://127.0.0.1:{port}"
    if how == "flags":
        agent = Agent(tmp_path / "agent", output="otlp",
                      args=["--otlp-endpoint", endpoint, "--otlp-protocol", protocol])
    else:
        agent = Agent(tmp_path / "agent", output="otlp",
                      env={"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
                           "OTEL_EXPORTER_OTLP_PROTOCOL": protocol})
    agent.start()
    app = None
    try:
        tag = uuid.uuid4().hex[:8]
        shop, customer = f"e2e-shop-{tag}", f"e2e-customer-{tag}"
        # The services name themselves the standard way; the agent reads it from /proc.
        app = start_app(tmp_path, env={"OTEL_SERVICE_NAME": shop})
        c = run_curl([app.url("/orders/42"), app.url("/boom")], env={"OTEL_SERVICE_NAME": customer})
        assert [r["code"] for r in c.out] == [200, 500]

        ok = jaeger.wait_spans(shop, 1, tags={"http.route": "/orders/{id}"})
        assert len(ok) == 1, ok
        s = ok[0]
        t = tags_of(s)
        assert s["operationName"] == "GET /orders/{id}"
        assert t.get("span.kind") == "server", t
        assert t.get("http.request.method") == "GET", t
        assert t.get("url.path") == "/orders/42", t
        assert t.get("http.response.status_code") == 200, t
        assert t.get("server.port") == app.port, t
        assert t.get("client.address") == "127.0.0.1", t
        assert str(t.get("user_agent.original", "")).startswith("curl/"), t
        assert "error" not in t and t.get("otel.status_code") != "ERROR", t
        ptags = tags_of(s["process"])
        assert int(ptags.get("process.pid", -1)) == app.pid, s["process"]

        boom = jaeger.wait_spans(shop, 1, tags={"http.route": "/boom"})
        assert len(boom) == 1, boom
        t = tags_of(boom[0])
        assert t.get("http.response.status_code") == 500 and t.get("otel.status_code") == "ERROR", t

        cli = jaeger.wait_spans(customer, 2)
        assert len(cli) == 2, cli
        cli.sort(key=lambda x: x["startTime"])
        t = tags_of(cli[0])
        assert cli[0]["operationName"] == "GET /orders/{id}"
        assert t.get("span.kind") == "client", t
        assert t.get("url.full") == app.url("/orders/42"), t
        assert t.get("http.response.status_code") == 200, t
        assert t.get("server.address") == "127.0.0.1" and t.get("server.port") == app.port, t
        t = tags_of(cli[1])
        assert cli[1]["operationName"] == "GET /boom"
        assert t.get("http.response.status_code") == 500 and t.get("otel.status_code") == "ERROR", t
        assert int(tags_of(cli[0]["process"]).get("process.pid", -1)) == c.pid
        # One trace: the server span is the child of the client span (same node, same connection).
        assert s["traceID"] == cli[0]["traceID"], (s, cli[0])
        assert {"refType": "CHILD_OF", "traceID": cli[0]["traceID"], "spanID": cli[0]["spanID"]} \
            in s.get("references", []), s.get("references")

        assert shop in jaeger.services() and customer in jaeger.services()
        # The agent must not trace its own export connection, on either end.
        for svc in jaeger.services():
            own = jaeger.find_spans(svc, tags={"url.path": "/v1/traces"})
            assert own == [], f"spans of the agent's own export traffic in {svc!r}: {own[:3]}"
    finally:
        if app:
            app.stop()
        code = agent.stop()
    assert code == 0, f"agent exited with {code} after SIGINT\n{agent.stderr_tail()}"


# ---------------------------------------------------------------- collector outage

def metrics_of(agent: Agent) -> dict[str, float]:
    """The agent's /metrics samples, keyed by name with labels (`a_total{reason="x"}`)."""
    code, body = agent.get("/metrics")
    assert code == 200, body
    out = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def dropped_by_reason(m: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in m.items() if k.startswith("sonde_spans_dropped_total")}


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_spans_made_while_jaeger_is_down_reach_it_when_it_is_back(tmp_path, protocol):
    """Jaeger stops while the agent runs; 40 requests are traced; Jaeger starts again
    about 8 s later. Every one of the 80 spans (40 server, 40 client) is found through
    Jaeger's query API, and the agent dropped nothing."""
    require_root()
    (tmp_path / "jaeger").mkdir()
    jaeger = Jaeger(tmp_path / "jaeger")
    agent = app = None
    try:
        port = jaeger.grpc_port if protocol == "grpc" else jaeger.http_port
        agent = Agent(tmp_path / "agent", output="otlp",
                      args=["--otlp-endpoint", f"http://127.0.0.1:{port}",
                            "--otlp-protocol", protocol])
        agent.start()
        tag = uuid.uuid4().hex[:8]
        shop, customer = f"outage-shop-{tag}", f"outage-customer-{tag}"
        app = start_app(tmp_path, env={"OTEL_SERVICE_NAME": shop})
        # Export works before the outage: the agent holds a live connection to Jaeger.
        run_curl([app.url("/orders/warm-up")], env={"OTEL_SERVICE_NAME": customer})
        jaeger.wait_spans(shop, 1)

        jaeger.stop()
        stopped = time.monotonic()
        c = run_curl([app.url(f"/orders/{i}") for i in range(40)],
                     env={"OTEL_SERVICE_NAME": customer})
        assert [r["code"] for r in c.out] == [200] * 40
        # The agent has the spans and has seen Jaeger refuse them.
        deadline = time.monotonic() + 15
        while True:
            m = metrics_of(agent)
            if m.get("sonde_export_failures_total", 0) > 0 and \
                    m.get("sonde_export_queue_spans", 0) >= 80:
                break
            assert time.monotonic() < deadline, \
                f"spans not queued or no failed export while Jaeger is down: {m}"
            time.sleep(0.2)
        assert sum(dropped_by_reason(m).values()) == 0, dropped_by_reason(m)
        time.sleep(max(0.0, 8 - (time.monotonic() - stopped)))

        jaeger.start()  # in-memory storage: it comes back empty
        server = jaeger.wait_spans(shop, 40, timeout=45, settle=2)
        paths = sorted(tags_of(s)["url.path"] for s in server)
        assert paths == sorted(f"/orders/{i}" for i in range(40)), paths
        assert all(tags_of(s).get("span.kind") == "server" for s in server)
        client = jaeger.wait_spans(customer, 40, timeout=30, settle=0)
        assert len(client) == 40, [tags_of(s).get("url.full") for s in client]
        assert {s["traceID"] for s in server} == {s["traceID"] for s in client}

        m = metrics_of(agent)
        assert dropped_by_reason(m) == {
            f'sonde_spans_dropped_total{{reason="{r}"}}': 0
            for r in ("queue_full", "expired", "rejected", "write_failed", "shutdown")
        }, m
        assert m["sonde_export_failures_total"] > 0, m
        # The agent must not trace its own export connection, not even the new one.
        for svc in jaeger.services():
            own = jaeger.find_spans(svc, tags={"url.path": "/v1/traces"})
            assert own == [], f"spans of the agent's own export traffic in {svc!r}: {own[:3]}"
    finally:
        if app:
            app.stop()
        code = agent.stop() if agent else 0
        jaeger.stop()
    assert code == 0, f"agent exited with {code} after SIGINT\n{agent.stderr_tail()}"
