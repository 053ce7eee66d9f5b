"""deploy/jaeger (issue 12, item 5): the production configuration of Jaeger v2, run for
real with oauth2-proxy (v7.15.6) in front of its query service and a mock OIDC provider
(github.com/oauth2-proxy/mockoidc, tests/oidc/mockoidc) standing in for the company's,
all built from the Go module proxy (scripts/build-oidc.sh, scripts/build-jaeger.sh).

- `jaeger validate` accepts the Badger and the Elasticsearch configurations, and
  refuses a misspelt key.
- No login: the query API answers 401 through the proxy.
- A user without the support group signs in and gets 403.
- A user of the support group signs in and reads a trace.
- The OTLP port refuses a client without a valid certificate, and takes one with.
The mock provider is the one stand-in: no real OIDC provider can run here.
"""
import http.cookiejar
import json
import os
import secrets
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from sonde_testlib import REPO, free_port, wait_listening
from test_jaeger_e2e import jaeger_bin
from tlsca import CA

DEPLOY = REPO / "deploy" / "jaeger"
TOOLS = REPO / ".tools"


def tool(name: str) -> str:
    p = TOOLS / name
    if not p.is_file():
        pytest.fail(f"{p} is missing: run scripts/build-oidc.sh (scripts/setup-tests.sh does)",
                    pytrace=False)
    return str(p)


def jaeger_env(tls_dir: Path, badger: Path, ports: dict) -> dict:
    env = dict(os.environ)
    env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
    env.update({
        "OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "none",
        "JAEGER_TLS_DIR": str(tls_dir), "JAEGER_BADGER_DIR": str(badger),
        "JAEGER_OTLP_GRPC_ENDPOINT": f"127.0.0.1:{ports['grpc']}",
        "JAEGER_OTLP_HTTP_ENDPOINT": f"127.0.0.1:{ports['http']}",
        "JAEGER_QUERY_HTTP_ENDPOINT": f"127.0.0.1:{ports['query']}",
        "JAEGER_QUERY_GRPC_ENDPOINT": f"127.0.0.1:{ports['query_grpc']}",
        "JAEGER_HEALTH_ENDPOINT": f"127.0.0.1:{ports['health']}",
        "JAEGER_ES_PASSWORD": "not-used-by-validate",
    })
    return env


@pytest.mark.parametrize("config", ["jaeger-badger.yaml", "jaeger-elasticsearch.yaml"])
def test_jaeger_validates_the_production_configs(tmp_path, config):
    env = jaeger_env(tmp_path, tmp_path / "badger", {k: free_port() for k in
                                                     ["grpc", "http", "query", "query_grpc",
                                                      "health"]})
    r = subprocess.run([str(jaeger_bin()), "validate", "--config", str(DEPLOY / config)],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text((DEPLOY / config).read_text().replace("trace_storage:", "trace_storag:"))
    r = subprocess.run([str(jaeger_bin()), "validate", "--config", str(broken)],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode != 0 and "trace_storag" in r.stdout + r.stderr, r.stdout + r.stderr


class Stack:
    """Jaeger (deploy/jaeger/jaeger-badger.yaml), the mock OIDC provider and oauth2-proxy
    (deploy/jaeger/oauth2-proxy.cfg), on free ports of 127.0.0.1."""

    def __init__(self, work: Path):
        self.work = work
        self.procs = []
        ca = CA(work, "agents-ca")
        self.tls = work / "tls"
        ca.issue(self.tls, "server", ["DNS:localhost", "IP:127.0.0.1"])
        (self.tls / "agents-ca.pem").write_bytes(ca.cert.read_bytes())
        self.ca = ca.cert
        self.client = ca.issue(work / "client", "agent", ["DNS:agent"])
        self.ports = {k: free_port() for k in ["grpc", "http", "query", "query_grpc", "health",
                                               "oidc", "oidc_control", "proxy"]}

    def start(self):
        p = self.ports
        self.spawn("jaeger", [str(jaeger_bin()), "--config", str(DEPLOY / "jaeger-badger.yaml")],
                   jaeger_env(self.tls, self.work / "badger", p))
        for port in (p["http"], p["query"]):
            wait_listening(port, self.procs[-1][1], timeout=60, what="jaeger",
                           log=self.work / "jaeger.log")
        mock = subprocess.Popen([tool("mockoidc"), f"127.0.0.1:{p['oidc']}",
                                 f"127.0.0.1:{p['oidc_control']}"],
                                stdout=subprocess.PIPE, stderr=open(self.work / "mockoidc.log", "wb"),
                                stdin=subprocess.DEVNULL, text=True)
        self.procs.append(("mockoidc", mock))
        self.oidc = json.loads(mock.stdout.readline())
        env = dict(os.environ)
        env["OAUTH2_PROXY_CLIENT_SECRET"] = self.oidc["client_secret"]
        env["OAUTH2_PROXY_COOKIE_SECRET"] = secrets.token_urlsafe(24)[:32]
        self.proxy_url = f"http://127.0.0.1:{p['proxy']}"
        self.spawn("oauth2-proxy", [
            tool("oauth2-proxy"), "--config", str(DEPLOY / "oauth2-proxy.cfg"),
            # Only what differs on this test machine: addresses, the mock provider, and
            # plain HTTP (no TLS in front of the proxy here, so no secure-only cookies).
            f"--http-address=127.0.0.1:{p['proxy']}",
            f"--upstream=http://127.0.0.1:{p['query']}/",
            f"--oidc-issuer-url={self.oidc['issuer']}",
            f"--client-id={self.oidc['client_id']}",
            f"--redirect-url={self.proxy_url}/oauth2/callback",
            "--cookie-secure=false",
        ], env)
        wait_listening(p["proxy"], self.procs[-1][1], timeout=30, what="oauth2-proxy",
                       log=self.work / "oauth2-proxy.log")

    def spawn(self, name, cmd, env):
        proc = subprocess.Popen(cmd, stdout=open(self.work / f"{name}.log", "wb"),
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        self.procs.append((name, proc))

    def stop(self):
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    def logs(self) -> str:
        return "\n".join(f"--- {n} ---\n" + (self.work / f"{n}.log").read_text(errors="replace")[-2000:]
                         for n in ["jaeger", "mockoidc", "oauth2-proxy"]
                         if (self.work / f"{n}.log").exists())

    def queue_user(self, email: str, groups: list[str]):
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.ports['oidc_control']}/user?email={email}"
            f"&groups={','.join(groups)}", method="POST")
        urllib.request.urlopen(req, timeout=5).close()

    def send_otlp(self, body: bytes, with_cert: bool) -> subprocess.CompletedProcess:
        cmd = ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--cacert", str(self.ca),
               "-H", "Content-Type: application/json", "--data-binary", "@-",
               f"https://127.0.0.1:{self.ports['http']}/v1/traces"]
        if with_cert:
            cmd[1:1] = ["--cert", str(self.client.cert), "--key", str(self.client.key)]
        return subprocess.run(cmd, input=body, capture_output=True, timeout=30)

    def session(self):
        """A browser: cookies kept, redirects followed."""
        jar = http.cookiejar.CookieJar()
        return urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp("jaeger-access"))
    try:
        s.start()
    except BaseException:
        s.stop()
        raise
    yield s
    s.stop()


def otlp_trace(trace_id: str, service: str) -> bytes:
    now = time.time_ns()
    return json.dumps({"resourceSpans": [{
        "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": service}}]},
        "scopeSpans": [{"spans": [{
            "traceId": trace_id, "spanId": secrets.token_hex(8), "name": "GET /orders/{id}",
            "kind": 2, "startTimeUnixNano": str(now - 5_000_000), "endTimeUnixNano": str(now),
        }]}],
    }]}).encode()


def get(opener, url):
    try:
        with opener.open(url, timeout=15) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def test_the_otlp_port_wants_a_valid_client_certificate(stack):
    trace_id = secrets.token_hex(16)
    refused = stack.send_otlp(otlp_trace(trace_id, "no-cert"), with_cert=False)
    assert refused.returncode != 0 or refused.stdout != b"200", refused
    taken = stack.send_otlp(otlp_trace(trace_id, "with-cert"), with_cert=True)
    assert taken.returncode == 0 and taken.stdout == b"200", (taken, stack.logs())


def test_no_login_is_refused(stack):
    opener = urllib.request.build_opener()
    status, body = get(opener, f"{stack.proxy_url}/api/services")
    assert status == 401, (status, body[:500])
    assert "data" not in body


def test_a_user_without_the_support_group_gets_403(stack):
    stack.queue_user("dev@example.com", ["engineering"])
    status, body = get(stack.session(), f"{stack.proxy_url}/oauth2/start?rd=/api/services")
    assert status == 403, (status, body[:500], stack.logs())


def test_a_support_user_reads_a_trace(stack):
    trace_id = secrets.token_hex(16)
    sent = stack.send_otlp(otlp_trace(trace_id, "shop-api"), with_cert=True)
    assert sent.stdout == b"200", sent
    stack.queue_user("helpdesk@example.com", ["support", "staff"])
    browser = stack.session()
    status, body = get(browser, f"{stack.proxy_url}/oauth2/start?rd=/api/services")
    assert status == 200 and '"data"' in body, (status, body[:500], stack.logs())
    deadline = time.monotonic() + 20
    while True:
        status, body = get(browser, f"{stack.proxy_url}/api/traces/{trace_id}")
        if status == 200:
            break
        assert time.monotonic() < deadline, (status, body[:500])
        time.sleep(0.5)
    spans = [s for t in json.loads(body)["data"] for s in t["spans"]]
    assert [s["operationName"] for s in spans] == ["GET /orders/{id}"], body[:1000]
