"""OTLP over mutual TLS (issue 12, item 3), against a real Jaeger v2 whose OTLP
receivers demand TLS and a client certificate signed by the test CA
(tests/jaeger/tls-config.yaml). Certificates are made here with openssl (tests/tlsca.py).

- With the CA file, a client certificate and its key, the agent's spans reach Jaeger
  over gRPC and over HTTP/protobuf.
- --otlp-server-name makes a certificate valid for another name than the endpoint's
  host acceptable, and nothing else: without it the same receiver is refused.
- A wrong CA, an expired receiver certificate, a receiver certificate for another name,
  no client certificate, a client certificate from another CA and an expired client
  certificate each give an error in the log that names the cause and what to do, and
  count in sonde_export_tls_failures_total{cause=...}; the spans stay in the export
  queue (none dropped) and none reaches Jaeger.
Runs as root (the agent loads its probes).
"""
import re
import time
import uuid

import pytest

from sonde_testlib import Agent, free_port, require_root, run_curl, start_app
from test_jaeger_e2e import TESTS, Jaeger, metrics_of
from tlsca import CA

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca = CA(d, "sonde-test-ca")
    other = CA(d, "some-other-ca")
    tls = d / "jaeger"
    ca.issue(tls, "server", ["DNS:localhost", "IP:127.0.0.1", "DNS:otlp.sonde.test"])
    ca.issue(tls, "expired-server", ["DNS:localhost", "IP:127.0.0.1"], expired=True)
    ca.issue(tls, "wrongname-server", ["DNS:elsewhere.sonde.test"])
    (tls / "ca.pem").write_bytes(ca.cert.read_bytes())
    return {
        "dir": tls,
        "ca": ca.cert,
        "other_ca": other.cert,
        "client": ca.issue(d / "client", "sonde-agent", ["DNS:sonde-agent"]),
        "expired_client": ca.issue(d / "client", "expired-agent", ["DNS:sonde-agent"],
                                   expired=True),
        "foreign_client": other.issue(d / "client", "foreign-agent", ["DNS:sonde-agent"]),
    }


@pytest.fixture(scope="module")
def jaeger(pki, tmp_path_factory):
    require_root()
    ports = {"expired": free_port(), "wrongname": free_port()}
    j = Jaeger(tmp_path_factory.mktemp("jaeger-tls"), config=TESTS / "jaeger" / "tls-config.yaml",
               env={"TLS_DIR": str(pki["dir"]),
                    "JAEGER_OTLP_EXPIRED_ENDPOINT": f"127.0.0.1:{ports['expired']}",
                    "JAEGER_OTLP_WRONGNAME_ENDPOINT": f"127.0.0.1:{ports['wrongname']}"})
    j.expired_port = ports["expired"]
    j.wrongname_port = ports["wrongname"]
    yield j
    j.stop()


def client_args(pki, which="client"):
    c = pki[which]
    return ["--otlp-client-cert", str(c.cert), "--otlp-client-key", str(c.key)]


def tls_failures(agent) -> dict[str, float]:
    m = metrics_of(agent)
    return {re.search(r'cause="([a-z_]+)"', k).group(1): v for k, v in m.items()
            if k.startswith("sonde_export_tls_failures_total")}


def start_agent(tmp_path, args):
    work = tmp_path / f"agent-{uuid.uuid4().hex[:6]}"
    a = Agent(work, output="otlp", args=args)
    a.start()
    return a


def wait_in_jaeger(jaeger, service):
    return jaeger.wait_spans(service, 1, tags={"http.route": "/orders/{id}"})


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_spans_reach_jaeger_over_mutual_tls(jaeger, pki, tmp_path, protocol):
    port = jaeger.grpc_port if protocol == "grpc" else jaeger.http_port
    agent = start_agent(tmp_path, [
        "--otlp-endpoint", f"https://127.0.0.1:{port}", "--otlp-protocol", protocol,
        "--otlp-ca-file", str(pki["ca"]), *client_args(pki)])
    try:
        service = f"mtls-{protocol.split('/')[0]}-{uuid.uuid4().hex[:6]}"
        app = start_app(tmp_path, env={"OTEL_SERVICE_NAME": service})
        try:
            assert run_curl([app.url("/orders/7")]).out[0]["code"] == 200
            spans = wait_in_jaeger(jaeger, service)
        finally:
            app.stop()
        assert spans, "no span in Jaeger"
        assert sum(tls_failures(agent).values()) == 0, tls_failures(agent)
    finally:
        assert agent.stop() == 0, agent.stderr_tail()


def test_server_name_override_is_checked_in_place_of_the_host(jaeger, pki, tmp_path):
    agent = start_agent(tmp_path, [
        "--otlp-endpoint", f"https://127.0.0.1:{jaeger.wrongname_port}",
        "--otlp-protocol", "http/protobuf", "--otlp-ca-file", str(pki["ca"]),
        "--otlp-server-name", "elsewhere.sonde.test", *client_args(pki)])
    try:
        service = f"mtls-name-{uuid.uuid4().hex[:6]}"
        app = start_app(tmp_path, env={"OTEL_SERVICE_NAME": service})
        try:
            assert run_curl([app.url("/orders/7")]).out[0]["code"] == 200
            assert wait_in_jaeger(jaeger, service)
        finally:
            app.stop()
        assert sum(tls_failures(agent).values()) == 0, tls_failures(agent)
    finally:
        assert agent.stop() == 0, agent.stderr_tail()


# (case, protocol, endpoint port attribute, agent TLS args, expected cause, log words)
FAILURES = [
    ("wrong CA", "grpc", "grpc_port", lambda p: ["--otlp-ca-file", str(p["other_ca"]),
                                               *client_args(p)],
     "unknown_issuer", "--otlp-ca-file"),
    ("wrong CA", "http/protobuf", "http_port", lambda p: ["--otlp-ca-file", str(p["other_ca"]),
                                                        *client_args(p)],
     "unknown_issuer", "--otlp-ca-file"),
    ("expired server certificate", "http/protobuf", "expired_port",
     lambda p: ["--otlp-ca-file", str(p["ca"]), *client_args(p)],
     "server_certificate_expired", "expired"),
    ("server certificate for another name", "http/protobuf", "wrongname_port",
     lambda p: ["--otlp-ca-file", str(p["ca"]), *client_args(p)],
     "server_name_mismatch", "--otlp-server-name"),
    ("no client certificate", "http/protobuf", "http_port",
     lambda p: ["--otlp-ca-file", str(p["ca"])],
     "client_certificate_rejected", "--otlp-client-cert"),
    ("no client certificate", "grpc", "grpc_port",
     lambda p: ["--otlp-ca-file", str(p["ca"])],
     "client_certificate_rejected", "--otlp-client-cert"),
    ("client certificate from another CA", "http/protobuf", "http_port",
     lambda p: ["--otlp-ca-file", str(p["ca"]), *client_args(p, "foreign_client")],
     "client_certificate_rejected", "--otlp-client-cert"),
    ("expired client certificate", "http/protobuf", "http_port",
     lambda p: ["--otlp-ca-file", str(p["ca"]), *client_args(p, "expired_client")],
     "client_certificate_rejected", "--otlp-client-cert"),
]


@pytest.mark.parametrize("case,protocol,port_attr,tls_args,cause,hint", FAILURES,
                         ids=[f"{f[0]} ({f[1]})" for f in FAILURES])
def test_a_bad_certificate_is_a_clear_error_and_a_counter_and_spans_wait(
        jaeger, pki, tmp_path, case, protocol, port_attr, tls_args, cause, hint):
    port = getattr(jaeger, port_attr)
    agent = start_agent(tmp_path, [
        "--otlp-endpoint", f"https://127.0.0.1:{port}", "--otlp-protocol", protocol,
        *tls_args(pki)])
    try:
        service = f"mtls-bad-{uuid.uuid4().hex[:6]}"
        app = start_app(tmp_path, env={"OTEL_SERVICE_NAME": service})
        try:
            assert run_curl([app.url("/orders/7")]).out[0]["code"] == 200
            deadline = time.monotonic() + 30
            while tls_failures(agent).get(cause, 0) < 1:
                if time.monotonic() > deadline:
                    pytest.fail(f"{case}: no {cause} failure counted: {tls_failures(agent)}\n"
                                f"{agent.stderr_tail(3000)}", pytrace=False)
                time.sleep(0.3)
        finally:
            app.stop()
        failures = tls_failures(agent)
        assert all(v == 0 for k, v in failures.items() if k != cause), failures
        # The counter is raised just before the line is logged; give the log a moment.
        deadline = time.monotonic() + 5
        while True:
            log = re.sub(r"\x1b\[[0-9;]*m", "", agent.stderr_path.read_text(errors="replace"))
            lines = [ln for ln in log.splitlines() if "TLS handshake" in ln]
            if lines or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert lines, f"{case}: no TLS error in the log:\n{log[-3000:]}"
        assert f'cause="{cause}"' in lines[0] and hint in lines[0], lines[0]
        m = metrics_of(agent)
        assert m["sonde_export_queue_spans"] > 0, "the spans should wait in the queue"
        dropped = {k: v for k, v in m.items() if k.startswith("sonde_spans_dropped_total")}
        assert sum(dropped.values()) == 0, dropped
        assert not jaeger.find_spans(service), f"{case}: a span reached Jaeger"
    finally:
        # What is queued would be retried for 10 s at shutdown and then counted as
        # dropped (reason="shutdown"); that is tested elsewhere, so stop at once.
        agent.kill()
