"""Helpers for sonde's privileged integration and end-to-end tests.

Everything here drives real processes: the agent binary, real servers (Python, nginx,
Jaeger) and real clients (curl, Python). The agent traces every process on the node,
so tests select spans by the resource attribute process.pid of their own workload.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
PY = sys.executable

INTERNAL = 1
SERVER = 2
CLIENT = 3
PRODUCER = 4
CONSUMER = 5
STATUS_UNSET = 0
STATUS_ERROR = 2

READY_TIMEOUT = float(os.environ.get("SONDE_READY_TIMEOUT", "90"))
SPAN_TIMEOUT = float(os.environ.get("SONDE_SPAN_TIMEOUT", "10"))
# After the expected spans have arrived, wait this long for extra (wrong) ones.
SETTLE = float(os.environ.get("SONDE_SETTLE", "1.0"))
# How long the agent may take to detach and flush after SIGINT.
STOP_TIMEOUT = float(os.environ.get("SONDE_STOP_TIMEOUT", "30"))
# The socket backend every Agent asks for (`--probe-backend`; unset: the agent's default,
# auto), and the one its log must then say it attached. `cargo xtask vm-test` sets both:
# auto on a kernel with kprobes must come out as kprobe, not fall back unseen.
TEST_BACKEND = os.environ.get("SONDE_TEST_BACKEND", "")
EXPECT_BACKEND = os.environ.get("SONDE_TEST_EXPECT_BACKEND", "")


def backend_matrix() -> list[tuple[str, str]]:
    """SONDE_TEST_BACKENDS, e.g. `auto:kprobe,tracepoint:tracepoint`: the `agent` fixture
    then runs each of its tests once per backend, with the backend its log must show, in
    one pytest session (`cargo xtask vm-test --ci`: one Python start under emulation
    instead of one per backend). Unset: [] (SONDE_TEST_BACKEND alone applies)."""
    raw = os.environ.get("SONDE_TEST_BACKENDS", "").strip()
    matrix = []
    for item in filter(None, (i.strip() for i in raw.split(","))):
        backend, sep, expect = item.partition(":")
        if not backend or not sep or not expect:
            raise ValueError(f"SONDE_TEST_BACKENDS: {item!r} is not BACKEND:EXPECTED (e.g. auto:kprobe)")
        matrix.append((backend, expect))
    return matrix


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail(
            "this test loads eBPF programs through the sonde agent and must run as root "
            "(run scripts/test.sh or `sudo cargo xtask test`)",
            pytrace=False,
        )


def sonde_bin() -> Path:
    p = Path(os.environ.get("SONDE_BIN", REPO / "target" / "release" / "sonde"))
    if not p.is_file() or not os.access(p, os.X_OK):
        pytest.fail(
            f"agent binary not found at {p}: build it with `cargo xtask build` "
            "(or set SONDE_BIN)",
            pytrace=False,
        )
    return p


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stable_port(taken: tuple[int, ...] = ()) -> int:
    """A free port below the kernel's ephemeral range, for a server that stops and
    starts again on the same port: while it is down, no outgoing connection of this
    machine can be given that port as its own (a port from free_port() can, and the
    restart then fails with "address already in use"). Never one of `taken`."""
    import random
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rnd = random.Random()
    for _ in range(200):
        port = rnd.randrange(10000, max(10001, low))
        if port in taken:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.fail(f"no free port between 10000 and {low} (the ephemeral range starts there)",
                pytrace=False)


def _listening_ports() -> set[int]:
    ports = set()
    for f in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(f).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) > 3 and parts[3] == "0A":  # TCP_LISTEN
                ports.add(int(parts[1].rsplit(":", 1)[1], 16))
    return ports


def wait_listening(port: int, proc: subprocess.Popen | None = None, timeout: float = 30,
                   what: str = "server", log: Path | None = None) -> None:
    """Waits until something listens on port, without connecting to it (a probe
    connection would be traffic the agent sees)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port in _listening_ports():
            return
        if proc is not None and proc.poll() is not None:
            detail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            pytest.fail(f"{what} exited with {proc.returncode} before listening on {port}\n{detail}",
                        pytrace=False)
        time.sleep(0.05)
    pytest.fail(f"{what} did not listen on 127.0.0.1:{port} within {timeout} s", pytrace=False)


def descendants(pid: int) -> set[int]:
    """pid and all its descendants (nginx workers, for example)."""
    out = {pid}
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                kids = Path(f"/proc/{p}/task/{task}/children").read_text().split()
                for k in kids:
                    k = int(k)
                    if k not in out:
                        out.add(k)
                        todo.append(k)
        except OSError:
            pass
    return out


# ---------------------------------------------------------------- OTLP JSON spans

def _value(v: dict):
    if "stringValue" in v:
        return v["stringValue"]
    if "intValue" in v:
        return int(v["intValue"])
    if "boolValue" in v:
        return bool(v["boolValue"])
    if "doubleValue" in v:
        return float(v["doubleValue"])
    if "arrayValue" in v:
        return [_value(x) for x in v["arrayValue"].get("values", [])]
    if "kvlistValue" in v:
        return {kv["key"]: _value(kv.get("value", {})) for kv in v["kvlistValue"].get("values", [])}
    if "bytesValue" in v:
        return v["bytesValue"]
    return None


def _attrs(lst) -> dict:
    return {a["key"]: _value(a.get("value", {})) for a in (lst or [])}


@dataclass
class Span:
    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_span_id: str
    start: int
    end: int
    status_code: int
    attrs: dict
    resource: dict
    raw: dict = field(repr=False, default_factory=dict)

    @property
    def pid(self) -> int | None:
        p = self.resource.get("process.pid")
        return int(p) if p is not None else None

    @property
    def service(self) -> str | None:
        return self.resource.get("service.name")

    def __str__(self) -> str:
        a = ", ".join(f"{k}={v!r}" for k, v in sorted(self.attrs.items()))
        return (f"<{self.name!r} kind={self.kind} status={self.status_code} pid={self.pid} "
                f"service={self.service!r} {a}>")


def parse_otlp_json_line(line: str) -> list[Span]:
    req = json.loads(line)
    out = []
    for rs in req.get("resourceSpans", []):
        res = _attrs(rs.get("resource", {}).get("attributes"))
        for ss in rs.get("scopeSpans", []):
            for s in ss.get("spans", []):
                out.append(Span(
                    name=s.get("name", ""),
                    kind=int(s.get("kind", 0)),
                    trace_id=s.get("traceId", ""),
                    span_id=s.get("spanId", ""),
                    parent_span_id=s.get("parentSpanId", ""),
                    start=int(s.get("startTimeUnixNano", 0)),
                    end=int(s.get("endTimeUnixNano", 0)),
                    status_code=int((s.get("status") or {}).get("code", 0)),
                    attrs=_attrs(s.get("attributes")),
                    resource=res,
                    raw=s,
                ))
    return out


def fmt_spans(spans: Iterable[Span]) -> str:
    spans = list(spans)
    return "\n".join(f"  {s}" for s in spans) if spans else "  (none)"


# ---------------------------------------------------------------- the agent

class Agent:
    """One `sonde run` process. output='otlp-json' writes to a file the tests read."""

    def __init__(self, workdir: Path, output: str = "otlp-json", args: list[str] | None = None,
                 env: dict | None = None, backend: str | None = None, expect: str | None = None):
        self.workdir = Path(workdir)
        # --probe-backend, and the backend its log must say it attached (None: from
        # SONDE_TEST_BACKEND and SONDE_TEST_EXPECT_BACKEND).
        self.backend = TEST_BACKEND if backend is None else backend
        self.expect = EXPECT_BACKEND if expect is None else expect
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.output = output
        self.spans_file = self.workdir / "spans.jsonl"
        self.stdout_path = self.workdir / "agent.stdout"
        self.stderr_path = self.workdir / "agent.stderr"
        self.admin_port = free_port()
        self.extra_args = list(args or [])
        self.env = dict(os.environ)
        self.env.setdefault("RUST_LOG", "info")
        self.env.update(env or {})
        self.proc: subprocess.Popen | None = None
        self.returncode: int | None = None
        self._offset = 0
        self._partial = ""
        self._spans: list[Span] = []

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def command(self) -> list[str]:
        cmd = [str(sonde_bin()), "run", "--output", self.output,
               "--admin-addr", f"127.0.0.1:{self.admin_port}"]
        if self.output == "otlp-json":
            cmd += ["--output-file", str(self.spans_file)]
        if self.backend and "--probe-backend" not in self.extra_args:
            cmd += ["--probe-backend", self.backend]
        return cmd + self.extra_args

    def stderr_tail(self, n: int = 6000) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")[-n:]
        except OSError:
            return "(no stderr)"

    def start(self) -> "Agent":
        require_root()
        cmd = self.command()
        self._out = open(self.stdout_path, "wb")
        self._err = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._out, stderr=self._err,
                                     stdin=subprocess.DEVNULL, env=self.env)
        deadline = time.monotonic() + READY_TIMEOUT
        last = "no answer yet"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(
                    f"agent exited with {self.proc.returncode} before /readyz answered 200\n"
                    f"command: {' '.join(cmd)}\n--- agent stderr ---\n{self.stderr_tail()}",
                    pytrace=False)
            try:
                with urllib.request.urlopen(self.admin + "/readyz", timeout=2) as r:
                    if r.status == 200:
                        self._check_backend(cmd)
                        return self
                    last = f"HTTP {r.status}"
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code}"
            except OSError as e:
                last = str(e)
            time.sleep(0.2)
        self.kill()
        pytest.fail(
            f"agent not ready within {READY_TIMEOUT} s (last /readyz: {last})\n"
            f"command: {' '.join(cmd)}\n--- agent stderr ---\n{self.stderr_tail()}",
            pytrace=False)

    def _check_backend(self, cmd: list[str]) -> None:
        """With an expected backend (SONDE_TEST_EXPECT_BACKEND, SONDE_TEST_BACKENDS), the
        agent must have attached that one (its `probes attached` line says `backend=...`)."""
        if not self.expect:
            return
        err = self.stderr_path.read_text(errors="replace")
        if f"backend={self.expect}" not in err:
            self.kill()
            pytest.fail(f"agent did not attach backend={self.expect} "
                        f"(SONDE_TEST_EXPECT_BACKEND or SONDE_TEST_BACKENDS)\ncommand: {' '.join(cmd)}\n"
                        f"--- agent stderr ---\n{self.stderr_tail()}", pytrace=False)

    def alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            pytest.fail(f"agent is not running (exit {self.proc.returncode if self.proc else None})\n"
                        f"--- agent stderr ---\n{self.stderr_tail()}", pytrace=False)

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.admin + path, timeout=5) as r:
                return r.status, r.read().decode(errors="replace")
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace")

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGINT, then wait: the agent must flush and exit 0."""
        if self.proc is None:
            return -1
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                self.returncode = -9
                return self.returncode
        self.returncode = self.proc.returncode
        self._out.close()
        self._err.close()
        return self.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    # spans -------------------------------------------------------------

    def spans(self) -> list[Span]:
        """Every span written so far (reads only complete lines)."""
        try:
            with open(self.spans_file, "r", encoding="utf-8") as f:
                f.seek(self._offset)
                data = f.read()
                self._offset = f.tell()
        except FileNotFoundError:
            return list(self._spans)
        data = self._partial + data
        lines = data.split("\n")
        self._partial = lines.pop()  # incomplete last line, if any
        for line in lines:
            if line.strip():
                self._spans.extend(parse_otlp_json_line(line))
        return list(self._spans)

    def spans_of(self, pids: Iterable[int] | Callable[[], Iterable[int]]) -> list[Span]:
        pidset = set(pids() if callable(pids) else pids)
        return sorted((s for s in self.spans() if s.pid in pidset), key=lambda s: (s.start, s.kind))

    def wait_spans(self, pids, count: int, timeout: float = SPAN_TIMEOUT,
                   settle: float = SETTLE, what: str = "") -> list[Span]:
        """Waits until at least `count` spans of these pids have arrived, then `settle`
        seconds more for any extra ones; returns them all sorted by start time. Fails
        with what did arrive when the deadline passes."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.spans_of(pids)
            if len(got) >= count:
                break
            if time.monotonic() > deadline:
                self.alive()
                pytest.fail(
                    f"expected {count} span(s){' ' + what if what else ''} within {timeout} s, "
                    f"got {len(got)}:\n{fmt_spans(got)}\n--- agent stderr (tail) ---\n"
                    f"{self.stderr_tail(3000)}", pytrace=False)
            time.sleep(0.1)
        if settle:
            time.sleep(settle)
        return self.spans_of(pids)


# ---------------------------------------------------------------- servers

class Server:
    def __init__(self, proc: subprocess.Popen, port: int, name: str, log: Path | None = None):
        self.proc = proc
        self.port = port
        self.name = name
        self.log = log

    @property
    def pid(self) -> int:
        return self.proc.pid

    def pids(self) -> set[int]:
        return descendants(self.proc.pid)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_app(workdir: Path, env: dict | None = None) -> Server:
    """tests/servers/app.py: HTTP/1.1 keep-alive server with orders, chunked, 404, 500, upload."""
    log = Path(workdir) / "app.log"
    e = dict(os.environ)
    e.update(env or {})
    proc = subprocess.Popen([PY, str(TESTS / "servers" / "app.py"), "0"], stdout=subprocess.PIPE,
                            stderr=open(log, "wb"), stdin=subprocess.DEVNULL, env=e, text=True)
    line = proc.stdout.readline()
    if not line.startswith("PORT "):
        proc.kill()
        pytest.fail(f"app.py did not start: {line!r}\n{log.read_text(errors='replace')}", pytrace=False)
    port = int(line.split()[1])
    wait_listening(port, proc, what="app.py", log=log)
    return Server(proc, port, "app.py", log)


def start_python_http_server(workdir: Path, directory: Path) -> Server:
    """`python3 -m http.server` serving directory (HTTP/1.0, one request per connection)."""
    port = free_port()
    log = Path(workdir) / "http.server.log"
    proc = subprocess.Popen([PY, "-m", "http.server", "--bind", "127.0.0.1", str(port),
                             "--directory", str(directory)],
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    wait_listening(port, proc, what="python -m http.server", log=log)
    return Server(proc, port, "http.server", log)


NGINX_CONF = """\
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
    tcp_nopush on;
    keepalive_timeout 65;
    keepalive_requests 1000;
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port};
        server_name localhost;
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

HELLO = b"hello from sonde's tests\n" * 40
NGINX_ORDER_BODY = b'{"status":"created"}'
STATIC_SIZE = 300 * 1024
# Larger than the default copied prefix (4 KiB), small enough that a few fit in one read.
SMALL_STATIC_SIZE = 6000


def start_nginx(workdir: Path) -> Server:
    """Our own nginx: daemon off, its own pid/log/temp paths, sendfile on, a static file
    of STATIC_SIZE bytes at /static/big.bin and one of SMALL_STATIC_SIZE at
    /static/small.bin, /orders/* -> 200, /missing -> 404, /boom -> 500."""
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.path.exists(nginx):
        pytest.fail("nginx is not installed (scripts/setup.sh installs it)", pytrace=False)
    d = Path(workdir) / "nginx"
    (d / "html" / "static").mkdir(parents=True, exist_ok=True)
    (d / "tmp").mkdir(exist_ok=True)
    (d / "html" / "static" / "big.bin").write_bytes(bytes(i % 251 for i in range(STATIC_SIZE)))
    (d / "html" / "static" / "small.bin").write_bytes(bytes(i % 241 for i in range(SMALL_STATIC_SIZE)))
    port = free_port()
    conf = d / "nginx.conf"
    conf.write_text(NGINX_CONF.format(d=d, port=port))
    log = d / "stderr.log"
    proc = subprocess.Popen([nginx, "-p", str(d), "-e", str(d / "error.log"), "-c", str(conf)],
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    wait_listening(port, proc, what="nginx", log=log)
    # The worker must exist before traffic, so its pid can be selected.
    deadline = time.monotonic() + 10
    while len(descendants(proc.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    return Server(proc, port, "nginx", log)


# ---------------------------------------------------------------- clients

@dataclass
class ClientRun:
    pid: int
    out: object
    stderr: str


def run_curl(urls: list[str], extra: list[str] | None = None, env: dict | None = None) -> ClientRun:
    """One curl process fetching urls in order (curl reuses one connection for them).
    out: list of {"code", "size", "connects"} per URL."""
    curl = shutil.which("curl") or "/usr/bin/curl"
    cmd = [curl, "-sS", "--http1.1", "-w", "%{http_code} %{size_download} %{num_connects}\\n"]
    cmd += list(extra or [])
    for u in urls:
        cmd += ["-o", "/dev/null", u]
    e = dict(os.environ)
    e.update(env or {})
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                         env=e, text=True)
    out, err = p.communicate(timeout=120)
    res = []
    for line in out.splitlines():
        code, size, connects = line.split()
        res.append({"code": int(code), "size": int(size), "connects": int(connects)})
    assert len(res) == len(urls), f"curl failed ({p.returncode}): {err}\n{out}"
    return ClientRun(p.pid, res, err)


def run_pyclient(*args: str, env: dict | None = None) -> ClientRun:
    e = dict(os.environ)
    e.update(env or {})
    p = subprocess.Popen([PY, str(TESTS / "clients" / "pyclient.py"), *map(str, args)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                         env=e, text=True)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, f"pyclient {args} failed ({p.returncode}): {err}"
    return ClientRun(p.pid, json.loads(out), err)


# ---------------------------------------------------------------- assertions

def check_span(s: Span, *, kind: int, name: str, method: str, path: str, route: str,
               status: int, port: int, error: bool, t0_ns: int | None = None,
               user_agent_prefix: str | None = None, req_body: int | None = None,
               resp_body: int | None = None) -> None:
    """Asserts one HTTP span's shape against what the test did."""
    ctx = f"span {s}"
    assert s.kind == kind, f"kind {s.kind} != {kind}: {ctx}"
    assert s.name == name, f"name {s.name!r} != {name!r}: {ctx}"
    assert len(s.trace_id) == 32 and int(s.trace_id, 16) != 0, f"bad traceId: {ctx}"
    assert len(s.span_id) == 16 and int(s.span_id, 16) != 0, f"bad spanId: {ctx}"
    assert 0 < s.start <= s.end, f"start {s.start} / end {s.end}: {ctx}"
    if t0_ns is not None:
        now = time.time_ns()
        assert t0_ns - 2_000_000_000 <= s.start <= now, f"start time outside the test: {ctx}"
    a = s.attrs
    assert a.get("http.request.method") == method, ctx
    assert a.get("url.path") == path, ctx
    assert a.get("http.route") == route, ctx
    assert a.get("http.response.status_code") == status, ctx
    assert a.get("server.port") == port, ctx
    assert a.get("server.address") in ("127.0.0.1", "localhost"), ctx
    assert a.get("network.peer.address") == "127.0.0.1", ctx
    if kind == SERVER:
        assert a.get("client.address") == "127.0.0.1", ctx
    else:
        assert a.get("url.full") == f"http://127.0.0.1:{port}{path}", ctx
    if error:
        assert s.status_code == STATUS_ERROR, f"status should be error: {ctx}"
    else:
        assert s.status_code == STATUS_UNSET, f"status should be unset: {ctx}"
    if user_agent_prefix is not None:
        assert str(a.get("user_agent.original", "")).startswith(user_agent_prefix), ctx
    if req_body is not None:
        assert a.get("http.request.body.size") == req_body, ctx
    if resp_body is not None:
        assert a.get("http.response.body.size") == resp_body, ctx


def by_kind(spans: list[Span], kind: int) -> list[Span]:
    return [s for s in spans if s.kind == kind]


# ---------------------------------------------------------------- cgroups (two "nodes")

def cgroup2_root() -> Path:
    """Where cgroup v2 is mounted (/sys/fs/cgroup, or /sys/fs/cgroup/unified on a
    hybrid layout), from /proc/mounts."""
    with open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 2 and parts[2] == "cgroup2":
                return Path(parts[1])
    pytest.fail("no cgroup v2 mount in /proc/mounts: --cgroup needs cgroup v2", pytrace=False)


class Cgroup:
    """A cgroup v2 directory of the test's own, so that an agent started with
    `--cgroup` sees only what runs in it: two of them stand for two nodes."""

    def __init__(self, name: str, under: str | None = None):
        """`under`: a relative path of cgroups inside the test's own, made too (the
        kubelet's `kubepods.slice/.../cri-containerd-<id>.scope`, say); the process
        goes into the last one."""
        top = cgroup2_root() / f"sonde-test-{os.getpid()}-{name}"
        self.path = top / under if under else top
        self._made: list[Path] = []
        for d in [*reversed(self.path.relative_to(top).parents), self.path.relative_to(top)]:
            d = top / d
            if not d.is_dir():
                d.mkdir()
                self._made.append(d)

    def preexec(self) -> Callable[[], None]:
        """For Popen's preexec_fn: the child moves itself into this cgroup before exec."""
        procs = str(self.path / "cgroup.procs")

        def enter() -> None:
            with open(procs, "w") as f:
                f.write(str(os.getpid()))
        return enter

    def remove(self) -> None:
        """Kills what is left in it and removes it."""
        for _ in range(50):
            try:
                pids = [int(p) for p in (self.path / "cgroup.procs").read_text().split()]
            except FileNotFoundError:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                self.path.rmdir()
                break
            except OSError:
                time.sleep(0.1)
        for d in reversed(self._made):
            if d != self.path:
                try:
                    d.rmdir()
                except OSError:
                    pass


def metric(agent: "Agent", line_start: str) -> int:
    """The integer value of the /metrics line that starts with `line_start` (a name
    with its labels, as written)."""
    status, text = agent.get("/metrics")
    assert status == 200
    for line in text.splitlines():
        if line.startswith(line_start + " "):
            return int(line.split()[-1])
    raise AssertionError(f"{line_start} not on /metrics:\n{text}")
