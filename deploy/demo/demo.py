#!/usr/bin/env python3
"""The demo driver behind `cargo xtask demo`: a small 3D-printing order system traced
by sonde into a local Jaeger. Standard library only; run as root.

It starts Jaeger v2 (Badger storage in --data-dir, so traces survive a restart), a
RabbitMQ node of its own, the model store (versitygw, S3 over a directory), the CRM
(Node.js, HTTPS), the MES (Go) and the Shop (Python aiohttp), then sonde, and sends
orders through the Shop: a fixed cycle of eight orders with faults on purpose (see
ORDER_CYCLE). Every service runs in a cgroup of its own that sonde is limited to
(--cgroup), so the demo's Jaeger holds the demo's traces only, even on a busy machine.

With --orders N it sends N orders, waits for their traces, prints one line per order,
stops everything and exits 0; without it, it sends orders until Ctrl-C. What a user
needs to know is in the README ("The demo").
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

DEMO = Path(__file__).resolve().parent
REPO = DEMO.parent.parent
TOOLS = REPO / ".tools"
MODELS = DEMO / "models"
CGROUP_ROOT = Path("/sys/fs/cgroup/unified")

# How long an unanswered request, unacked delivery or running program waits before
# sonde shows it as stalled; and how long the Shop waits for the MES to accept an
# order before answering 202 "queued". The second is longer, so the stuck order is
# seen stalled first and then ends.
STALL_TIMEOUT_S = 5
ACCEPT_WAIT_S = 12
# The CRM's faults, by the order's number modulo the cycle (crm/crm.js).
CRM_SLOW, CRM_FLAKY = 2, 5
# The program each MES stage runs.
PROGRAMS = {"check": "admesh", "slicing": "prusa-slicer"}


@dataclass(frozen=True)
class Kind:
    model: str
    material: str
    # What the order must come to: done, failed (at failed_stage), or stuck.
    outcome: str
    failed_stage: str | None
    what: str


# The fixed cycle of orders; order number n is ORDER_CYCLE[n % 8].
ORDER_CYCLE = [
    Kind("cube.stl", "pla", "done", None, "a cube"),
    Kind("pyramid.stl", "pla", "done", None, "a pyramid"),
    Kind("cube.stl", "pla", "done", None, "a cube; the CRM is slow to register it"),
    Kind("broken.stl", "pla", "failed", "check", "an upload that is no model: admesh refuses it"),
    Kind("cube.stl", "resin", "stuck", None, "resin: that line is down, the order waits in a queue nobody consumes"),
    Kind("pyramid.stl", "pla", "done", None, "a pyramid; the CRM answers 503 once, the MES retries"),
    Kind("oversized.stl", "pla", "failed", "slicing", "a 900 mm cube: the slicer finds it does not fit the bed"),
    Kind("cube.stl", "pla", "done", None, "a cube"),
]


def log(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    for f in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            for line in Path(f).read_text().splitlines()[1:]:
                parts = line.split()
                if parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                    return True
        except OSError:
            pass
    return False


class DemoError(Exception):
    pass


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""


@dataclass
class Order:
    n: int
    order_id: str
    kind: Kind
    result: dict | None = None
    trace: dict | None = None


@dataclass
class Demo:
    args: argparse.Namespace
    work: Path = field(init=False)
    procs: list = field(default_factory=list)
    cgroup: Path | None = None
    stopping: bool = False

    # ------------------------------------------------------------ processes

    def spawn(self, name: str, cmd: list, env: dict | None = None, traced: bool = True,
              **kw) -> Proc:
        logf = self.work / f"{name}.log"
        e = dict(os.environ)
        e.update(env or {})
        cg = self.cgroup if traced else None

        def enter_cgroup():
            os.setsid()
            if cg is not None:
                (cg / "cgroup.procs").write_text(str(os.getpid()))

        p = subprocess.Popen([str(c) for c in cmd], stdout=kw.pop("stdout", open(logf, "wb")),
                             stderr=subprocess.STDOUT if "stderr" not in kw else kw.pop("stderr"),
                             stdin=subprocess.DEVNULL, env=e, preexec_fn=enter_cgroup, **kw)
        proc = Proc(name, p, logf)
        self.procs.append(proc)
        return proc

    def wait_port(self, proc: Proc, port: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not listening(port):
            if proc.popen.poll() is not None:
                raise DemoError(f"{proc.name} exited with {proc.popen.returncode} before listening on "
                                f"{port}; its log ({proc.log}):\n{proc.tail()}")
            if time.monotonic() > deadline:
                raise DemoError(f"{proc.name} did not listen on {port} within {timeout} s; its log "
                                f"({proc.log}):\n{proc.tail()}")
            time.sleep(0.1)

    def wait_line(self, proc: Proc, text: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while text not in proc.tail(200_000):
            if proc.popen.poll() is not None:
                raise DemoError(f"{proc.name} exited with {proc.popen.returncode}; its log ({proc.log}):\n"
                                f"{proc.tail()}")
            if time.monotonic() > deadline:
                raise DemoError(f"{proc.name}: no {text!r} within {timeout} s; its log ({proc.log}):\n"
                                f"{proc.tail()}")
            time.sleep(0.1)

    def stop_proc(self, proc: Proc, sig: int = signal.SIGTERM, timeout: float = 15) -> None:
        if proc.popen.poll() is not None:
            return
        try:
            os.killpg(proc.popen.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.popen.pid, signal.SIGKILL)
            proc.popen.wait()

    # ------------------------------------------------------------ set-up

    def tool(self, path: Path, what: str) -> Path:
        if not path.exists():
            raise DemoError(f"{what} is missing at {path}: run scripts/setup-demo.sh "
                            "(cargo xtask demo runs it for you)")
        return path

    def start(self) -> None:
        a = self.args
        sonde = self.tool(Path(a.sonde), "the sonde agent (cargo xtask build)")
        jaeger = self.tool(TOOLS / "jaeger", "Jaeger")
        vgw = self.tool(TOOLS / "versitygw", "the model store (versitygw)")
        mes = self.tool(TOOLS / "demo-mes", "the MES")
        shop_py = self.tool(TOOLS / "demo-venv" / "bin" / "python", "the Shop's Python venv")
        tls = TOOLS / "demo-tls"
        for f in ("ca.pem", "server.pem", "server.key"):
            self.tool(tls / f, "the demo's TLS certificates")
        for prog in ("node", "admesh", "prusa-slicer", "rabbitmq-server"):
            if not shutil.which(prog):
                raise DemoError(f"{prog} is not installed: run scripts/setup-demo.sh")
        if not CGROUP_ROOT.is_dir():
            raise DemoError(f"no cgroup v2 hierarchy at {CGROUP_ROOT}: the demo limits sonde to its own "
                            "cgroup there")

        self.work = Path(tempfile.mkdtemp(prefix="sonde-demo-"))
        os.chmod(self.work, 0o755)
        self.cgroup = CGROUP_ROOT / f"sonde-demo-{os.getpid()}"
        self.cgroup.mkdir(exist_ok=True)
        data = Path(a.data_dir).resolve()
        (data / "jaeger").mkdir(parents=True, exist_ok=True)
        log(f"working directory {self.work}; Jaeger's data in {data / 'jaeger'}")

        # Jaeger: not in the cgroup (its own traffic is not the demo's).
        query_port = a.jaeger_port or free_port()
        if listening(query_port):
            other = free_port()
            log(f"port {query_port} is taken; Jaeger's query API goes on {other}")
            query_port = other
        self.jaeger_url = f"http://127.0.0.1:{query_port}"
        otlp_grpc = free_port()
        j = self.spawn("jaeger", [jaeger, "--config", DEMO / "jaeger.yaml"], traced=False, env={
            "JAEGER_BADGER_DIR": str(data / "jaeger"),
            "JAEGER_QUERY_HTTP_ENDPOINT": f"127.0.0.1:{query_port}",
            "JAEGER_QUERY_GRPC_ENDPOINT": f"127.0.0.1:{free_port()}",
            "JAEGER_OTLP_GRPC_ENDPOINT": f"127.0.0.1:{otlp_grpc}",
            "JAEGER_OTLP_HTTP_ENDPOINT": f"127.0.0.1:{free_port()}",
            "JAEGER_HEALTH_ENDPOINT": f"127.0.0.1:{free_port()}",
        })
        self.wait_port(j, query_port)
        self.wait_port(j, otlp_grpc)

        # sonde, before the services, so that it sees every connection from its start.
        self.admin = f"127.0.0.1:{free_port()}"
        agent_args = [sonde, "run", "--output", "otlp", "--otlp-endpoint", f"http://127.0.0.1:{otlp_grpc}",
                      "--otlp-protocol", "grpc", "--admin-addr", self.admin, "--cgroup", self.cgroup,
                      "--stall-timeout", f"{STALL_TIMEOUT_S}s"]
        if a.sample_ratio is not None:
            agent_args += ["--sample-ratio", str(a.sample_ratio)]
        if a.spans:
            Path(a.spans).parent.mkdir(parents=True, exist_ok=True)
            agent_args += ["--tee-file", Path(a.spans).resolve()]
        self.agent = self.spawn("sonde", agent_args, traced=False)
        self.wait_ready()

        # RabbitMQ: a node of its own on free ports, its files in the working directory.
        rdir = self.work / "rabbitmq"
        rdir.mkdir()
        (rdir / "enabled_plugins").write_text("[].\n")
        (rdir / "rabbitmq.conf").write_text("loopback_users = none\nlog.console = false\n"
                                            "log.file.level = warning\n")
        subprocess.run(["chown", "-R", "rabbitmq:rabbitmq", str(rdir)], check=True)
        self.amqp_port = free_port()
        self.rabbit_env = {
            "RABBITMQ_NODENAME": f"sondedemo{os.getpid()}@localhost",
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.amqp_port),
            "RABBITMQ_DIST_PORT": str(free_port()),
            "RABBITMQ_MNESIA_BASE": str(rdir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(rdir / "log"),
            "RABBITMQ_PID_FILE": str(rdir / "rabbitmq.pid"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(rdir / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(rdir / "rabbitmq"),
            "OTEL_SERVICE_NAME": "rabbitmq",
        }
        # Erlang's port mapper outlives the node and serves every Erlang node on the
        # machine: started here, outside the demo's cgroup, unless it runs already.
        subprocess.run(["epmd", "-daemon"], check=False, stdin=subprocess.DEVNULL)
        self.rabbit = self.spawn("rabbitmq", ["rabbitmq-server"], env=self.rabbit_env)
        self.wait_port(self.rabbit, self.amqp_port, timeout=120)
        r = self.rabbitmqctl("await_startup")
        if r.returncode != 0:
            raise DemoError(f"RabbitMQ did not start: {r.stdout}{r.stderr}")
        amqp = f"amqp://guest:guest@127.0.0.1:{self.amqp_port}/"

        # The model store: versitygw over a directory.
        store_port = free_port()
        (self.work / "store").mkdir()
        store = self.spawn("store", [vgw, "--access", "demo", "--secret", "demodemo", "--port",
                                     f"127.0.0.1:{store_port}", "--quiet", "posix", self.work / "store"],
                           env={"OTEL_SERVICE_NAME": "store"})
        self.wait_port(store, store_port)
        store_url = f"http://127.0.0.1:{store_port}"

        crm_port = free_port()
        crm = self.spawn("crm", ["node", DEMO / "crm" / "crm.js", crm_port, tls / "server.pem", tls / "server.key"],
                         env={"OTEL_SERVICE_NAME": "crm", "CRM_FAULT_CYCLE": str(len(ORDER_CYCLE)),
                              "CRM_SLOW": str(CRM_SLOW), "CRM_FLAKY": str(CRM_FLAKY)})
        self.wait_port(crm, crm_port)
        crm_url = f"https://127.0.0.1:{crm_port}"
        self.wait_tls(shutil.which("node"))

        creds = {"AWS_ACCESS_KEY_ID": "demo", "AWS_SECRET_ACCESS_KEY": "demodemo"}
        (self.work / "mes").mkdir()
        m = self.spawn("mes", [mes, "-amqp", amqp, "-store", store_url, "-crm", crm_url, "-ca", tls / "ca.pem",
                               "-work", self.work / "mes"], env={"OTEL_SERVICE_NAME": "mes", **creds})
        self.wait_line(m, "READY")
        self.wait_tls(mes)

        shop_port = free_port()
        shop = self.spawn("shop", [shop_py, DEMO / "shop" / "shop.py", shop_port], env={
            "OTEL_SERVICE_NAME": "shop", "SHOP_AMQP": amqp, "SHOP_STORE": store_url, "SHOP_CRM": crm_url,
            "SHOP_CA": str(tls / "ca.pem"), "SHOP_ACCEPT_WAIT": str(ACCEPT_WAIT_S), **creds})
        self.wait_port(shop, shop_port)
        self.shop_url = f"http://127.0.0.1:{shop_port}"
        log(f"up: Jaeger {self.jaeger_url}, Shop {self.shop_url}, CRM {crm_url}, store {store_url}, "
            f"RabbitMQ :{self.amqp_port}, sonde /metrics http://{self.admin}/metrics")
        self.page_url = None
        if a.orders is None:
            self.serve_page()

    def serve_page(self) -> None:
        """While orders stream in: `sonde orders --serve`, the journeys as a web page."""
        port = self.args.page_port or free_port()
        if listening(port):
            port = free_port()
        page = self.spawn("orders-page", [self.args.sonde, "orders", "--serve", f"127.0.0.1:{port}",
                                          "--jaeger", self.jaeger_url], traced=False)
        try:
            self.wait_port(page, port, timeout=15)
        except DemoError as e:
            log(f"no web page: `sonde orders --serve` did not start ({e})")
            return
        self.page_url = f"http://127.0.0.1:{port}/"
        log(f"each order's journey, as it happens: {self.page_url}")

    def rabbitmqctl(self, *args: str) -> subprocess.CompletedProcess:
        e = dict(os.environ)
        e.update(self.rabbit_env)
        return subprocess.run(["rabbitmqctl", "-n", self.rabbit_env["RABBITMQ_NODENAME"], *args], env=e,
                              capture_output=True, text=True, timeout=120)

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.agent.popen.poll() is not None:
                raise DemoError(f"sonde exited with {self.agent.popen.returncode}:\n{self.agent.tail()}")
            try:
                with urllib.request.urlopen(f"http://{self.admin}/readyz", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise DemoError(f"sonde not ready within {timeout} s:\n{self.agent.tail()}")
            time.sleep(0.2)

    def wait_tls(self, executable, timeout: float = 120) -> None:
        """sonde finds a new program's TLS functions in its own time (node's 99 MB take
        a few seconds); orders go in once it has, as real services take traffic only
        once they are up."""
        target = os.path.realpath(executable)
        deadline = time.monotonic() + timeout
        while True:
            for line in self.agent.tail(2_000_000).splitlines():
                if "TLS uprobes attached" in line and target in line:
                    return
            if time.monotonic() > deadline:
                raise DemoError(f"sonde did not attach its TLS probes to {target} within {timeout} s:\n"
                                f"{self.agent.tail()}")
            time.sleep(0.1)

    # ------------------------------------------------------------ orders

    def run_orders(self, orders: list[Order], progress) -> None:
        """One customer process for these orders; results as they end."""
        spec = [{"order_id": o.order_id, "model": str(MODELS / o.kind.model), "material": o.kind.material}
                for o in orders]
        by_id = {o.order_id: o for o in orders}
        c = self.spawn(f"customer-{orders[0].n}", [sys.executable, DEMO / "customer.py", self.shop_url,
                                                    json.dumps(spec), "2"],
                       env={"OTEL_SERVICE_NAME": "customer"}, stdout=subprocess.PIPE,
                       stderr=open(self.work / f"customer-{orders[0].n}.log", "wb"))
        for line in c.popen.stdout:
            r = json.loads(line)
            by_id[r["order_id"]].result = r
            progress()
        c.popen.wait()

    def jaeger_get(self, path: str):
        with urllib.request.urlopen(self.jaeger_url + path, timeout=10) as r:
            return json.loads(r.read())

    def order_trace(self, order_id: str) -> dict | None:
        """The trace of the order's creation: the one with the customer's POST /orders
        (the customer's status polls are traces of their own)."""
        tags = urllib.parse.quote(json.dumps({"order.id": order_id}))
        try:
            data = self.jaeger_get(f"/api/traces?service=shop&tags={tags}&limit=50&lookback=2h").get("data") or []
        except (OSError, ValueError):
            return None
        for t in data:
            for s in t["spans"]:
                tags_ = {x["key"]: x["value"] for x in s.get("tags", [])}
                if tags_.get("http.request.method") == "POST" and tags_.get("url.path") == "/orders" \
                        and tags_.get("span.kind") == "server":
                    return t
        return None

    def wait_traces(self, orders: list[Order], timeout: float = 90, quiet: float = 4) -> None:
        """Until every order's trace is in Jaeger and none has grown for `quiet` s."""
        deadline = time.monotonic() + timeout
        sizes: dict[str, int] = {}
        still = time.monotonic()
        while True:
            changed = False
            for o in orders:
                t = self.order_trace(o.order_id)
                n = len(t["spans"]) if t else 0
                if n != sizes.get(o.order_id):
                    sizes[o.order_id] = n
                    changed = True
                o.trace = t
            if changed:
                still = time.monotonic()
            if all(sizes.values()) and time.monotonic() - still >= quiet:
                return
            # Sampling drops whole orders: once nothing has changed for longer than the
            # agent's hold (stall timeout + 5 s), the orders without a trace were dropped.
            if self.args.sample_ratio is not None and time.monotonic() - still >= STALL_TIMEOUT_S + 10:
                missing = [o.order_id for o in orders if not sizes.get(o.order_id)]
                log(f"{len(missing)} order(s) without a trace: not kept by --sample-ratio {self.args.sample_ratio}")
                return
            if time.monotonic() > deadline:
                missing = [o.order_id for o in orders if not sizes.get(o.order_id)]
                log(f"gave up waiting for traces after {timeout} s; without a trace: {missing or 'none'}")
                return
            time.sleep(1)

    # ------------------------------------------------------------ report

    def report(self, orders: list[Order]) -> list[dict]:
        found = self.journeys([o.order_id for o in orders])
        if found is None:
            return [self.own_row(o) for o in orders]
        rows = []
        for o in orders:
            # `sonde orders` gives one object per trace of an order; the customer's
            # status polls are traces of their own, so pick the order's creation trace.
            mine = [j for j in found if j.get("order_id") == o.order_id]
            main = [j for j in mine if o.trace and j.get("trace_id") == o.trace["traceID"]]
            rows.append((main or mine or [self.own_row(o)])[0])
        return rows

    def journeys(self, ids: list[str]) -> list[dict] | None:
        """`sonde orders --json`, where this sonde has it (issue 9 item 3)."""
        try:
            r = subprocess.run([self.args.sonde, "orders", "--jaeger", self.jaeger_url, "--json", *ids],
                               capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as e:
            log(f"`sonde orders` did not answer ({e}): the report comes from what the demo saw itself")
            return None
        if r.returncode != 0:
            log(f"`sonde orders` is not available here ({r.stderr.strip().splitlines()[-1:] or r.returncode}): "
                "the report comes from what the demo saw itself")
            return None
        return json.loads(r.stdout)

    def own_row(self, o: Order) -> dict:
        """What the driver knows: the customer's answer and the trace's size and
        services from Jaeger's search. Not a journey: that is `sonde orders`."""
        r = o.result or {}
        status = r.get("status") or "unknown"
        stage = r.get("failed_stage") if status == "failed" else None
        if stage:
            stage = f"mes: {stage} ({PROGRAMS.get(stage, '?')})"
        if status == "queued":
            status = "stalled"
            stage = f"order.created.{o.kind.material}: waits in a queue nobody consumes"
        t = o.trace
        services = sorted({t["processes"][s["processID"]]["serviceName"] for s in t["spans"]}) if t else []
        return {
            "order_id": o.order_id,
            "trace_id": t["traceID"] if t else None,
            "services": services,
            "spans": len(t["spans"]) if t else 0,
            "duration_ms": round((r["ended_ns"] - r["sent_ns"]) / 1e6, 1) if r.get("ended_ns") else None,
            "status": status,
            "failed_stage": stage,
        }

    # ------------------------------------------------------------ shut-down

    def stop(self) -> None:
        if self.stopping:
            return
        self.stopping = True
        by = {p.name: p for p in self.procs}
        for p in self.procs:
            if p.name.startswith("customer"):
                self.stop_proc(p)
        for name in ("orders-page", "shop", "mes", "crm", "store"):
            if name in by:
                self.stop_proc(by[name])
        if "rabbitmq" in by and by["rabbitmq"].popen.poll() is None:
            try:
                self.rabbitmqctl("stop")
            except subprocess.TimeoutExpired:
                pass
            self.stop_proc(by["rabbitmq"], timeout=30)
        if "sonde" in by:
            # SIGINT: sonde detaches, exports what is queued, exits 0.
            self.stop_proc(by["sonde"], sig=signal.SIGINT, timeout=30)
            if by["sonde"].popen.returncode not in (0, None):
                log(f"sonde exited with {by['sonde'].popen.returncode}:\n{by['sonde'].tail()}")
        if "jaeger" in by:
            self.stop_proc(by["jaeger"])
        if self.cgroup is not None:
            try:
                self.cgroup.rmdir()
            except OSError as e:
                log(f"could not remove the cgroup {self.cgroup}: {e}")
        if not self.args.keep_work:
            shutil.rmtree(self.work, ignore_errors=True)


def progress_bar(done: int, total: int | None, outcomes: dict) -> None:
    if total:
        width = 30
        fill = width * done // total
        bar = f"[{'#' * fill}{'.' * (width - fill)}] {done}/{total}"
    else:
        bar = f"{done} orders"
    tally = ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items()))
    end = "" if sys.stderr.isatty() else "\n"
    print(f"\r[demo] orders {bar}  {tally}\033[K" if sys.stderr.isatty() else f"[demo] orders {bar}  {tally}",
          end=end, file=sys.stderr, flush=True)


def print_report(rows: list[dict]) -> None:
    print(f"{'order':<14} {'trace id':<32} {'spans':>5} {'time':>8}  {'status':<10} "
          f"{'services':<38} where it failed or stalled")
    for r in rows:
        ms = r.get("duration_ms")
        t = f"{ms / 1000:.2f} s" if isinstance(ms, (int, float)) else "-"
        print(f"{r['order_id']:<14} {r.get('trace_id') or '-':<32} {r.get('spans', 0):>5} {t:>8}  "
              f"{r.get('status') or '?':<10} {','.join(r.get('services') or []):<38} {r.get('failed_stage') or '-'}")


def main() -> int:
    ap = argparse.ArgumentParser(prog="cargo xtask demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--orders", type=int, default=None,
                    help="send this many orders, print the report, stop everything (default: until Ctrl-C)")
    ap.add_argument("--summary", help="write the report as JSON to this file")
    ap.add_argument("--spans", help="also write every span sonde exported to this file, as OTLP JSON lines")
    ap.add_argument("--sonde", default=str(REPO / "target" / "release" / "sonde"), help="the agent binary")
    ap.add_argument("--data-dir", default=str(TOOLS / "demo-data"),
                    help="where Jaeger keeps its traces (Badger), across runs (default .tools/demo-data)")
    ap.add_argument("--jaeger-port", type=int, default=16686, help="Jaeger's query API and UI (0: any free port)")
    ap.add_argument("--page-port", type=int, default=8080,
                    help="while orders stream in: the journeys' web page, sonde orders --serve (0: any free port)")
    ap.add_argument("--sample-ratio", type=float, default=None,
                    help="sonde's --sample-ratio: keep this share of orders (failed, stalled and slow ones always)")
    ap.add_argument("--keep-work", action="store_true", help="keep the working directory (logs) at the end")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("demo: sonde loads eBPF programs: run as root (sudo cargo xtask demo)", file=sys.stderr)
        return 1
    if args.orders is not None and args.orders < 1:
        print(f"demo: --orders takes a number of orders, 1 or more (not {args.orders})", file=sys.stderr)
        return 2

    demo = Demo(args)
    interrupted = threading.Event()

    def on_signal(signum, frame):
        interrupted.set()
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    run = secrets.token_hex(2)
    orders: list[Order] = []
    outcomes: dict[str, int] = {}
    try:
        demo.start()
        total = args.orders or None
        if total is None:
            where(demo, args)
        log(f"sending {'%d orders' % total if total else 'orders until Ctrl-C'} (ids ORD-{run}-NNNN)")

        def progress():
            done = [o for o in orders if o.result]
            outcomes.clear()
            for o in done:
                outcomes[o.result["status"]] = outcomes.get(o.result["status"], 0) + 1
            progress_bar(len(done), total, outcomes)

        n = 0
        while total is None or n < total:
            batch = []
            for _ in range(min(len(ORDER_CYCLE), (total - n) if total else len(ORDER_CYCLE))):
                # Four digits: the default path rule takes a segment as an order id only
                # when it has a run of three digits or more (/models/orders/<ID>/...).
                o = Order(n, f"ORD-{run}-{n:04d}", ORDER_CYCLE[n % len(ORDER_CYCLE)])
                orders.append(o)
                batch.append(o)
                n += 1
            demo.run_orders(batch, progress)
        print(file=sys.stderr)
        log("all orders are over; waiting for their traces in Jaeger")
        demo.wait_traces(orders)
        rows = demo.report(orders)
        print_report(rows)
        if args.summary:
            Path(args.summary).write_text(json.dumps(rows, indent=2) + "\n")
            log(f"report written to {args.summary}")
        where(demo, args)
        return 0
    except KeyboardInterrupt:
        print(file=sys.stderr)
        log("Ctrl-C: stopping")
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for p in demo.procs:
            if p.name.startswith("customer"):
                demo.stop_proc(p)
        if orders and any(o.result for o in orders):
            done = [o for o in orders if o.result]
            demo.wait_traces(done, timeout=20)
            print_report(demo.report(done))
        log(f"the traces stay in {Path(args.data_dir).resolve() / 'jaeger'} (Badger): the next demo's "
            "Jaeger serves them again")
        return 0
    except DemoError as e:
        log(f"error: {e}")
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        demo.stop()
        log("stopped")


def where(demo: Demo, args) -> None:
    data = Path(args.data_dir).resolve() / "jaeger"
    log("where to look:")
    if getattr(demo, "page_url", None):
        log(f"  the web page (while the demo runs): {demo.page_url}")
    log(f"  an order's journey in the terminal: {args.sonde} orders --jaeger {demo.jaeger_url} ORDER_ID")
    log(f"  Jaeger's query API (while the demo runs; its UI's assets are not installed here): "
        f"{demo.jaeger_url}/api/traces?service=shop")
    log(f"  the traces stay in {data} (Badger): the next demo's Jaeger serves them again")


if __name__ == "__main__":
    sys.exit(main())
