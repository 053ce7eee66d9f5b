"""Helpers of the TLS and RabbitMQ integration tests (test_tls_integration.py,
test_amqp_integration.py), on top of sonde_testlib: test certificates, servers and
clients in Python, Node.js and Go, our own nginx with TLS, our own RabbitMQ node, and
the checks of HTTPS and RabbitMQ spans.

What the clients need is installed by scripts/setup-clients.sh: pika in tests/.venv,
amqplib in tests/node/node_modules, the Go program tests/go built into
.tools/sonde-go-clients.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from sonde_testlib import (
    CLIENT, CONSUMER, PRODUCER, PY, REPO, SERVER, STATUS_ERROR, STATUS_UNSET, TESTS, ClientRun,
    Server, Span, _listening_ports, descendants, fmt_spans, free_port, wait_listening,
)

TOOLS = Path(os.environ.get("SONDE_TOOLS", REPO / ".tools"))
GO_CLIENTS = Path(os.environ.get("SONDE_GO_CLIENTS", TOOLS / "sonde-go-clients"))
NODE_DIR = TESTS / "node"
TLS_DIR = TESTS / "tls"
AMQP_DIR = TESTS / "amqp"
NODE = shutil.which("node") or "/usr/bin/node"

GO_SERVICE = "sonde-go-clients"

SETUP_HINT = "run scripts/setup-clients.sh (after scripts/setup-tests.sh)"


def require_go() -> Path:
    if not (GO_CLIENTS.is_file() and os.access(GO_CLIENTS, os.X_OK)):
        pytest.fail(f"Go test program missing at {GO_CLIENTS}: {SETUP_HINT}", pytrace=False)
    return GO_CLIENTS


def require_node(module: str | None = None) -> str:
    if not os.path.exists(NODE):
        pytest.fail("node is not installed (scripts/setup.sh)", pytrace=False)
    if module and not (NODE_DIR / "node_modules" / module).is_dir():
        pytest.fail(f"node module {module} missing in {NODE_DIR}: {SETUP_HINT}", pytrace=False)
    return NODE


def require_pika() -> None:
    r = subprocess.run([PY, "-c", "import pika"], capture_output=True)
    if r.returncode != 0:
        pytest.fail(f"pika is not installed in {PY}: {SETUP_HINT}", pytrace=False)


# ---------------------------------------------------------------- certificates

@dataclass
class Cert:
    cert: Path
    key: Path


def make_cert(d: Path) -> Cert:
    """A self-signed certificate for localhost and 127.0.0.1 (clients trust it as CA)."""
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    cert, key = d / "cert.pem", d / "key.pem"
    r = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"openssl req failed: {r.stderr}", pytrace=False)
    return Cert(cert, key)


# ---------------------------------------------------------------- processes

class HttpsServer(Server):
    def url(self, path: str) -> str:
        return f"https://127.0.0.1:{self.port}{path}"


def start_port_server(cmd: list[str], workdir: Path, name: str, cwd: Path | None = None,
                      preexec_fn=None) -> HttpsServer:
    """Starts a server that prints "PORT n" once it listens on 127.0.0.1:n (preexec_fn:
    run in the child before exec, e.g. Cgroup.preexec())."""
    log = Path(workdir) / f"{name}.log"
    proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=open(log, "wb"),
                            stdin=subprocess.DEVNULL, text=True, cwd=cwd, preexec_fn=preexec_fn)
    line = proc.stdout.readline()
    if not line.startswith("PORT "):
        proc.kill()
        proc.wait()
        pytest.fail(f"{name} did not start: {line!r}\n{log.read_text(errors='replace')[-3000:]}",
                    pytrace=False)
    port = int(line.split()[1])
    wait_listening(port, proc, what=name, log=log)
    return HttpsServer(proc, port, name, log)


def run_json(cmd: list, timeout: float = 120, what: str = "client") -> ClientRun:
    """Runs a client to its end; its last stdout line is JSON."""
    p = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         stdin=subprocess.DEVNULL, text=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        pytest.fail(f"{what} timed out after {timeout} s: {cmd}\n{err[-3000:]}", pytrace=False)
    if p.returncode != 0:
        pytest.fail(f"{what} failed ({p.returncode}): {cmd}\n{err[-3000:]}\n{out[-2000:]}",
                    pytrace=False)
    lines = [ln for ln in out.splitlines() if ln.strip()]
    return ClientRun(p.pid, json.loads(lines[-1]), err)


class Background:
    """A client started now and finished later (consumers): prints READY when it is
    ready for traffic, then one JSON line when done."""

    def __init__(self, cmd: list, what: str, stdin: bool = False):
        self.cmd = [str(c) for c in cmd]
        self.what = what
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                                     text=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send_line(self, line: str = "") -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def wait_ready(self, timeout: float = 30, marker: str = "READY") -> "Background":
        import selectors
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sel.select(timeout=0.2):
                line = self.proc.stdout.readline()
                if line.strip() == marker:
                    return self
                if line == "":
                    break
        self.kill()
        pytest.fail(f"{self.what} not ready within {timeout} s: {self.cmd}\n"
                    f"{self.proc.stderr.read()[-3000:]}", pytrace=False)

    def finish(self, timeout: float = 60) -> ClientRun:
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            out, err = self.proc.communicate()
            pytest.fail(f"{self.what} did not finish within {timeout} s: {self.cmd}\n{err[-3000:]}",
                        pytrace=False)
        if self.proc.returncode != 0:
            pytest.fail(f"{self.what} failed ({self.proc.returncode}): {self.cmd}\n{err[-3000:]}",
                        pytrace=False)
        lines = [ln for ln in out.splitlines() if ln.strip()]
        return ClientRun(self.proc.pid, json.loads(lines[-1]), err)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


TLS_ATTACH_TIMEOUT = float(os.environ.get("SONDE_TLS_ATTACH_TIMEOUT", "10"))


def wait_tls_attached(agent, executable: Path | str, timeout: float = TLS_ATTACH_TIMEOUT) -> None:
    """Waits until the agent logged that its TLS uprobes are on this executable (or
    library). The agent finds the TLS functions of a newly exec'd program within a few
    tens of milliseconds, and a program that talks TLS before that is not seen from the
    start of its connections; real services do not take traffic that early. Fails when
    the agent never attaches."""
    target = os.path.realpath(executable)
    deadline = time.monotonic() + timeout
    while True:
        try:
            text = agent.stderr_path.read_text(errors="replace")
        except OSError:
            text = ""
        for line in text.splitlines():
            line = re.sub(r"\x1b\[[0-9;]*m", "", line)
            if "TLS uprobes attached" in line and (
                    line.rstrip().endswith(target) or f"{target} " in line):
                return
        if time.monotonic() > deadline:
            pytest.fail(f"the agent did not attach TLS uprobes to {target} within {timeout} s\n"
                        f"--- agent stderr ---\n{agent.stderr_tail(3000)}", pytrace=False)
        time.sleep(0.05)


# ---------------------------------------------------------------- nginx with TLS

NGINX_TLS_CONF = """\
daemon off;
master_process on;
worker_processes 1;
user root;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log {d}/access.log;
    client_body_temp_path {d}/tmp/client_body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
    sendfile on;
    keepalive_timeout 65;
    keepalive_requests 1000;
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port} ssl;
        server_name localhost;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        root {d}/html;
        location /static/ {{ }}
        location /orders/ {{
            default_type application/json;
            return 200 '{{"status":"created"}}';
        }}
        location = /missing {{ return 404; }}
        location = /boom {{ return 500; }}
    }}
}}
"""
NGINX_ORDER_BODY = b'{"status":"created"}'
NGINX_STATIC_SIZE = 1024 * 1024


def start_nginx_tls(workdir: Path, cert: Cert) -> HttpsServer:
    """Our own nginx serving HTTPS (libssl.so.3): /orders/* -> 200 JSON, /missing -> 404,
    /boom -> 500, /static/big.bin (NGINX_STATIC_SIZE bytes)."""
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.path.exists(nginx):
        pytest.fail("nginx is not installed (scripts/setup.sh installs it)", pytrace=False)
    d = Path(workdir) / "nginx-tls"
    (d / "html" / "static").mkdir(parents=True, exist_ok=True)
    (d / "tmp").mkdir(exist_ok=True)
    (d / "html" / "static" / "big.bin").write_bytes(bytes(i % 251 for i in range(NGINX_STATIC_SIZE)))
    port = free_port()
    conf = d / "nginx.conf"
    conf.write_text(NGINX_TLS_CONF.format(d=d, port=port, cert=cert.cert, key=cert.key))
    log = d / "stderr.log"
    proc = subprocess.Popen([nginx, "-p", str(d), "-e", str(d / "error.log"), "-c", str(conf)],
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    wait_listening(port, proc, what="nginx (TLS)", log=log)
    deadline = time.monotonic() + 10
    while len(descendants(proc.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    return HttpsServer(proc, port, "nginx", log)


# ---------------------------------------------------------------- span checks

def exactly(agent, pids, n: int, what: str) -> list[Span]:
    """Exactly n spans from these pids (waits for n, then settles for extra ones)."""
    spans = agent.wait_spans(pids, n, what=what)
    assert len(spans) == n, f"expected exactly {n} span(s) {what}, got {len(spans)}:\n{fmt_spans(spans)}"
    return spans


def check_https_span(s: Span, *, kind: int, method: str, path: str, route: str, status: int,
                     port: int, query: str | None = None, ua: str | None = None,
                     req_body: int | None = None, resp_body: int | None = None,
                     error: bool | None = None, t0: int | None = None, version: str = "1.1",
                     scheme: str = "https") -> None:
    """One HTTP span over TLS: the same shape as over plain HTTP, with https as scheme
    (HTTP/2: version "2"; h2c: scheme "http", no TLS)."""
    ctx = f"span {s}"
    name = f"{method} {route}"
    assert s.kind == kind, f"kind {s.kind} != {kind}: {ctx}"
    assert s.name == name, f"name {s.name!r} != {name!r}: {ctx}"
    assert len(s.trace_id) == 32 and int(s.trace_id, 16) != 0, f"bad traceId: {ctx}"
    assert len(s.span_id) == 16 and int(s.span_id, 16) != 0, f"bad spanId: {ctx}"
    assert 0 < s.start <= s.end, f"start {s.start} / end {s.end}: {ctx}"
    if t0 is not None:
        assert t0 - 2_000_000_000 <= s.start <= time.time_ns(), f"start time outside the test: {ctx}"
    a = s.attrs
    want = {
        "http.request.method": method,
        "url.path": path,
        "url.scheme": scheme,
        "http.route": route,
        "http.response.status_code": status,
        "server.port": port,
        "network.peer.address": "127.0.0.1",
        "network.protocol.name": "http",
        "network.protocol.version": version,
    }
    if scheme == "https":
        want["tls.established"] = True
    else:
        assert "tls.established" not in a, f"tls.established on plaintext: {ctx}"
    if query is not None:
        want["url.query"] = query
    if kind == SERVER:
        want["client.address"] = "127.0.0.1"
    else:
        want["url.full"] = f"{scheme}://127.0.0.1:{port}{path}" + (f"?{query}" if query else "")
        want["network.peer.port"] = port
    if req_body is not None:
        want["http.request.body.size"] = req_body
    if resp_body is not None:
        want["http.response.body.size"] = resp_body
    for k, v in want.items():
        assert a.get(k) == v, f"{k}: {a.get(k)!r} != {v!r}: {ctx}"
    if query is None:
        assert "url.query" not in a, f"unexpected url.query: {ctx}"
    assert a.get("server.address") in ("127.0.0.1", "localhost"), ctx
    if ua is not None:
        assert str(a.get("user_agent.original", "")).startswith(ua), ctx
    if error is None:
        error = status >= (500 if kind == SERVER else 400)
    if error:
        assert s.status_code == STATUS_ERROR, f"status should be error: {ctx}"
        assert a.get("error.type") == str(status), f"error.type: {ctx}"
    else:
        assert s.status_code == STATUS_UNSET, f"status should be unset: {ctx}"
        assert "error.type" not in a, f"unexpected error.type: {ctx}"


def check_https_pair(srv: Span, cli: Span, port: int, all_spans: list[Span], timing: bool = False,
                     **kw) -> None:
    """Both ends of one exchange over TLS, and the server span as the client span's child
    (same node, same connection); with timing, also inside it in time."""
    try:
        check_https_span(srv, kind=SERVER, port=port, **kw)
        check_https_span(cli, kind=CLIENT, port=port, **kw)
        assert srv.trace_id == cli.trace_id and srv.parent_span_id == cli.span_id, \
            f"server span not linked to its client span:\n  {srv}\n  {cli}"
        assert not timing or cli.start <= srv.start and srv.end <= cli.end, (
            f"server span [{srv.start}, {srv.end}] not inside client span [{cli.start}, {cli.end}] "
            f"(client starts {(srv.start - cli.start) / 1e6:.3f} ms before the server, ends "
            f"{(cli.end - srv.end) / 1e6:.3f} ms after):\n  {srv}\n  {cli}")
    except AssertionError as e:
        raise AssertionError(f"{e}\n--- all spans of this test ---\n{fmt_spans(all_spans)}") from None


# ---------------------------------------------------------------- RabbitMQ

# Erlang boots several times slower under emulation (vm-test).
RABBITMQ_START_TIMEOUT = float(os.environ.get("SONDE_RABBITMQ_START_TIMEOUT", "90"))


class RabbitMQ:
    """Our own RabbitMQ node (Debian's rabbitmq-server) on free ports, its data and logs in
    a temporary directory, no plugins; runs as the rabbitmq user through Debian's wrapper.
    The directory is a fresh /tmp/sonde-rabbitmq-* (pytest's are root-only, the rabbitmq
    user could not reach into them), removed by stop()."""

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="sonde-rabbitmq-"))
        self.port = free_port()
        self.dist_port = free_port()
        while self.dist_port == self.port:
            self.dist_port = free_port()
        self.node = f"sondetest{os.getpid()}@localhost"
        self.proc: subprocess.Popen | None = None
        self.log = self.dir / "rabbitmq-server.out"

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def env(self) -> dict:
        e = dict(os.environ)
        e.update({
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_PID_FILE": str(self.dir / "rabbitmq.pid"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq"),
        })
        return e

    def ctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(["rabbitmqctl", "-n", self.node, *args], env=self.env(),
                              capture_output=True, text=True, timeout=timeout)

    def start(self, timeout: float = RABBITMQ_START_TIMEOUT) -> "RabbitMQ":
        server = shutil.which("rabbitmq-server") or "/usr/sbin/rabbitmq-server"
        if not os.path.exists(server):
            pytest.fail("rabbitmq-server is not installed (scripts/setup.sh installs it)", pytrace=False)
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "enabled_plugins").write_text("[].\n")
        (self.dir / "rabbitmq.conf").write_text(
            "loopback_users = none\nlog.console = false\nlog.file.level = warning\n")
        subprocess.run(["chown", "-R", "rabbitmq:rabbitmq", str(self.dir)], check=True)
        os.chmod(self.dir, 0o755)
        self.proc = subprocess.Popen([server], env=self.env(), stdout=open(self.log, "wb"),
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while self.port not in _listening_ports():
            if self.proc.poll() is not None:
                pytest.fail(f"rabbitmq-server exited with {self.proc.returncode}\n"
                            f"{self.log.read_text(errors='replace')[-4000:]}", pytrace=False)
            if time.monotonic() > deadline:
                # stop() removes the directory the log is in.
                log = self.log.read_text(errors="replace")[-4000:]
                self.stop()
                pytest.fail(f"rabbitmq-server did not listen on {self.port} within {timeout} s\n"
                            f"{log}", pytrace=False)
            time.sleep(0.1)
        r = self.ctl("await_startup", timeout=timeout)
        if r.returncode != 0:
            self.stop()
            pytest.fail(f"rabbitmqctl await_startup failed: {r.stdout}{r.stderr}", pytrace=False)
        return self

    def pids(self) -> set[int]:
        return descendants(self.proc.pid) if self.proc else set()

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                self.ctl("stop", timeout=60)
            except subprocess.TimeoutExpired:
                pass
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def pika_cmd(*args) -> list:
    return [PY, AMQP_DIR / "pika_client.py", *args]


def node_amqp_cmd(*args) -> list:
    return [NODE, NODE_DIR / "amqp.js", *args]


def go_cmd(*args) -> list:
    return [GO_CLIENTS, *args]


def check_producer(s: Span, *, exchange: str, routing_key: str, message_id: str,
                   correlation_id: str, body_size: int, port: int, confirmed: bool,
                   t0: int | None = None) -> None:
    """A PRODUCER span of one basic.publish."""
    ctx = f"span {s}"
    dest = f"{exchange}:{routing_key}" if exchange and routing_key else (exchange or routing_key or "amq.default")
    assert s.kind == PRODUCER, f"kind {s.kind} != PRODUCER: {ctx}"
    assert s.name == f"publish {dest}", f"name {s.name!r} != 'publish {dest}': {ctx}"
    assert 0 < s.start <= s.end, ctx
    if t0 is not None:
        assert t0 - 2_000_000_000 <= s.start <= time.time_ns(), f"start time outside the test: {ctx}"
    assert s.parent_span_id == "", f"a publish without traceparent starts a trace: {ctx}"
    want = {
        "messaging.system": "rabbitmq",
        "messaging.operation.type": "send",
        "messaging.operation.name": "publish",
        "messaging.destination.name": dest,
        "messaging.message.id": message_id,
        "messaging.message.conversation_id": correlation_id,
        "messaging.message.body.size": body_size,
        "server.address": "127.0.0.1",
        "server.port": port,
        "network.peer.address": "127.0.0.1",
        "network.peer.port": port,
        "network.protocol.name": "amqp",
        "network.protocol.version": "0.9.1",
    }
    if routing_key:
        want["messaging.rabbitmq.destination.routing_key"] = routing_key
    else:
        assert "messaging.rabbitmq.destination.routing_key" not in s.attrs, ctx
    if confirmed:
        want["messaging.rabbitmq.outcome"] = "ack"
    else:
        assert "messaging.rabbitmq.outcome" not in s.attrs, f"outcome without confirms: {ctx}"
    for k, v in want.items():
        assert s.attrs.get(k) == v, f"{k}: {s.attrs.get(k)!r} != {v!r}: {ctx}"
    assert s.status_code == STATUS_UNSET, f"status should be unset: {ctx}"
    assert "error.type" not in s.attrs, ctx


def check_consumer(s: Span, producer: Span | None, *, exchange: str, routing_key: str,
                   queue: str | None, message_id: str, correlation_id: str, body_size: int,
                   port: int, delivery_tag: int, redelivered: bool, outcome: str) -> None:
    """A CONSUMER span of one basic.deliver, child of its producer span. queue None: the
    agent cannot know it (consumer registered before the agent started); the name may
    then carry it or not."""
    ctx = f"span {s}"
    parts = [p for p in (exchange, routing_key) if p]
    if queue and queue != routing_key:
        parts.append(queue)
    dest = ":".join(parts) or "amq.default"
    if queue is None:
        base = ":".join(p for p in (exchange, routing_key) if p)
        assert s.name.startswith(f"deliver {base}"), f"name {s.name!r}: {ctx}"
    else:
        assert s.name == f"deliver {dest}", f"name {s.name!r} != 'deliver {dest}': {ctx}"
    assert s.kind == CONSUMER, f"kind {s.kind} != CONSUMER: {ctx}"
    assert 0 < s.start <= s.end, ctx
    want = {
        "messaging.system": "rabbitmq",
        "messaging.operation.type": "process",
        "messaging.operation.name": "deliver",
        "messaging.message.id": message_id,
        "messaging.message.conversation_id": correlation_id,
        "messaging.message.body.size": body_size,
        "messaging.rabbitmq.message.delivery_tag": delivery_tag,
        "messaging.rabbitmq.redelivered": redelivered,
        "messaging.rabbitmq.outcome": outcome,
        "server.address": "127.0.0.1",
        "server.port": port,
        "network.peer.address": "127.0.0.1",
        "network.peer.port": port,
        "network.protocol.name": "amqp",
        "network.protocol.version": "0.9.1",
    }
    if queue is not None:
        want["messaging.destination.name"] = dest
        want["messaging.destination.subscription.name"] = queue
    if routing_key:
        want["messaging.rabbitmq.destination.routing_key"] = routing_key
    for k, v in want.items():
        assert s.attrs.get(k) == v, f"{k}: {s.attrs.get(k)!r} != {v!r}: {ctx}"
    assert s.status_code == STATUS_UNSET, f"status should be unset: {ctx}"
    if producer is not None:
        assert s.trace_id == producer.trace_id and s.parent_span_id == producer.span_id, (
            f"delivery not linked to its publish:\n  consumer {s}\n  producer {producer}")
        wait = s.attrs.get("messaging.rabbitmq.broker_wait_ms")
        assert isinstance(wait, (int, float)) and wait >= 0, f"broker_wait_ms {wait!r}: {ctx}"
        assert s.start >= producer.start, f"delivery starts before its publish:\n  {s}\n  {producer}"


def by_message_id(spans: list[Span]) -> dict[str, list[Span]]:
    out: dict[str, list[Span]] = {}
    for s in spans:
        out.setdefault(s.attrs.get("messaging.message.id"), []).append(s)
    return out
