#!/usr/bin/env python3
"""What tracing with sonde costs: each workload run untraced and traced by turns in one
run (at least 3 pairs), as ratios and per-request figures.

    cargo xtask bench [-- --quick] [-- --json PATH] [-- --workloads http,https]

Workloads (real parts, each on its own ports):
  http        nginx (one worker) under wrk at saturation, keep-alive, a small JSON answer
  http-rate   the same nginx at a fixed rate (vegeta), for the latency percentiles
  https       nginx over TLS (the system's OpenSSL) under wrk at saturation
  amqp        RabbitMQ: a Go publisher (confirms) and a Go consumer (manual acks)
  inject      http with --inject-traceparent against http traced without it, wrk traced
              in both (it is the one written into): what injection adds

The services run in a cgroup of the benchmark's own and the agent is limited to it
(`--cgroup`), so that whatever else runs on the machine is not counted; the load
generators stay outside it (except for inject, whose baseline is the same workload
traced without injection rather than untraced). Per traced round the benchmark reads
the agent's CPU time (user+sys, /proc), its peak RSS (VmHWM), the run time of its eBPF
programs (sonde_bpf_program_run_seconds_total, with kernel.bpf_stats_enabled=1 for the
run), and its loss counters (events lost, spans dropped). Figures are medians over the
pairs; the ratios compare each traced round with the untraced round before it.

It prints a Markdown table, and writes JSON with --json. Not a pass/fail test: the
numbers of a shared machine move; CI runs --quick only to show the command works.
Run as root (the agent loads eBPF programs); SONDE_BIN picks the agent.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOOLS = REPO / ".tools"
WORKLOADS = ("http", "http-rate", "https", "amqp", "inject")


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def fail(msg: str) -> None:
    sys.exit(f"bench: {msg}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen | None, what: str, timeout: float = 60,
              log_file: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            said = ""
            if log_file is not None and log_file.exists():
                said = ":\n" + log_file.read_text(errors="replace")[-2000:]
            fail(f"{what} exited with {proc.returncode} before listening on {port}{said}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    fail(f"{what} did not listen on {port} within {timeout} s")


# ------------------------------------------------------------------ the OTLP receiver

class Receiver(BaseHTTPRequestHandler):
    """Where the agent exports (OTLP http/protobuf): counts bytes, answers 200."""
    protocol_version = "HTTP/1.1"
    lock = threading.Lock()
    bytes = 0

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        with Receiver.lock:
            Receiver.bytes += len(body)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()


# ------------------------------------------------------------------ the cgroup

def cgroup2_root() -> Path:
    for line in open("/proc/mounts"):
        p = line.split()
        if len(p) > 2 and p[2] == "cgroup2":
            return Path(p[1])
    fail("no cgroup v2 mount in /proc/mounts: the benchmark limits the agent with --cgroup")


class Cgroup:
    def __init__(self):
        self.root = cgroup2_root()
        self.path = self.root / f"sonde-bench-{os.getpid()}"
        self.path.mkdir(exist_ok=True)

    def preexec(self):
        procs = str(self.path / "cgroup.procs")

        def enter():
            with open(procs, "w") as f:
                f.write(str(os.getpid()))
        return enter

    @contextmanager
    def entered(self):
        """This process in the cgroup for the block: what it starts there stays there."""
        mine = open("/proc/self/cgroup").read().strip().split("::", 1)[-1]
        back = self.root / mine.lstrip("/")
        (self.path / "cgroup.procs").write_text(str(os.getpid()))
        try:
            yield
        finally:
            (back / "cgroup.procs").write_text(str(os.getpid()))

    def remove(self):
        for _ in range(50):
            try:
                pids = (self.path / "cgroup.procs").read_text().split()
            except FileNotFoundError:
                return
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)


def interrupt(proc: subprocess.Popen) -> None:
    """SIGINT, as Ctrl-C would (the agent and perf both finish their output on it), then
    SIGKILL after 60 s."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ------------------------------------------------------------------ the agent

class Agent:
    def __init__(self, sonde: str, cgroup: Cgroup, otlp_port: int, work: Path, extra: list[str]):
        self.admin = free_port()
        self.log = work / f"agent-{self.admin}.log"
        self.proc = subprocess.Popen(
            [sonde, "run", "--cgroup", str(cgroup.path), "--output", "otlp",
             "--otlp-endpoint", f"http://127.0.0.1:{otlp_port}", "--otlp-protocol", "http/protobuf",
             "--admin-addr", f"127.0.0.1:{self.admin}", *extra],
            stdout=subprocess.DEVNULL, stderr=open(self.log, "wb"), stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 180
        while True:
            if self.proc.poll() is not None:
                fail(f"the agent exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/readyz", timeout=2).status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.proc.kill()
                fail(f"the agent was not ready within 180 s:\n{self.tail()}")
            time.sleep(0.2)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def metrics(self) -> dict[str, float]:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/metrics", timeout=10).read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                try:
                    out[name] = float(value)
                except ValueError:
                    pass
        return out

    def cpu_seconds(self) -> float:
        fields = open(f"/proc/{self.proc.pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def peak_rss_mib(self) -> float:
        for line in open(f"/proc/{self.proc.pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def sample(self) -> dict:
        """The agent's CPU and its programs' run time now. The programs' times reach
        /metrics once a second: wait for a fresh reading first."""
        time.sleep(1.2)
        m = self.metrics()
        bpf = sum(v for k, v in m.items() if k.startswith("sonde_bpf_program_run_seconds_total"))
        return {"cpu": self.cpu_seconds(), "bpf": bpf, "programs": programs(m), "metrics": m}

    def stop(self) -> dict[str, float]:
        # Spans still held for linking or queued for export are not lost yet: wait
        # until every span built has been exported or dropped (30 s at most).
        deadline = time.monotonic() + 30
        m = self.metrics()
        while time.monotonic() < deadline and m.get("sonde_spans_built_total", 0) > (
                m.get("sonde_spans_exported_total", 0) + losses(m)[1]):
            time.sleep(0.2)
            m = self.metrics()
        rss = self.peak_rss_mib()
        interrupt(self.proc)
        m["peak_rss_mib"] = rss
        return m


PROGRAM = re.compile(r'^sonde_bpf_program_(run_seconds|runs)_total\{program="([^"]+)"\}$')


def programs(m: dict[str, float]) -> dict[str, dict[str, float]]:
    """Each eBPF program's run time (s) and runs so far, from the agent's /metrics."""
    out: dict[str, dict[str, float]] = {}
    for k, v in m.items():
        hit = PROGRAM.match(k)
        if hit:
            out.setdefault(hit.group(2), {"seconds": 0.0, "runs": 0.0})[
                "seconds" if hit.group(1) == "run_seconds" else "runs"] = v
    return out


def per_request(before: dict, after: dict, n: int) -> dict[str, dict[str, float]]:
    """What each program cost per request between two samples: µs, runs, and ns per run."""
    out = {}
    for name, a in after.items():
        b = before.get(name, {"seconds": 0.0, "runs": 0.0})
        seconds, runs = a["seconds"] - b["seconds"], a["runs"] - b["runs"]
        if n and runs > 0:
            out[name] = {"us_per_request": seconds * 1e6 / n, "runs_per_request": runs / n,
                         "ns_per_run": seconds * 1e9 / runs}
    return out


LOSS = re.compile(r"^sonde_[a-z_]*(lost|dropped|missed|evicted|skipped|malformed|failures|"
                  r"unconfirmed|overflow)[a-z_]*(\{[^}]*\})?$")


def loss_counters(m: dict[str, float]) -> dict[str, float]:
    """Every counter whose name says something was lost, dropped, missed or skipped
    (README: "What can be lost"), where it is not 0: one added later shows up here."""
    return {k: v for k, v in m.items() if v and LOSS.match(k)}


def losses(m: dict[str, float]) -> tuple[float, float]:
    lost = m.get("sonde_events_lost_total", 0.0)
    dropped = sum(v for k, v in m.items() if k.startswith("sonde_spans_dropped_total"))
    return lost, dropped


# ------------------------------------------------------------------ the services

NGINX_CONF = """\
daemon off;
master_process on;
worker_processes 1;
user root;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  server {{
    listen 127.0.0.1:{port};
    location /orders/ {{ default_type application/json; return 200 '{{"order_id":"42","status":"printing"}}'; }}
  }}
  server {{
    listen 127.0.0.1:{tls_port} ssl;
    ssl_certificate {d}/cert.pem;
    ssl_certificate_key {d}/key.pem;
    location /orders/ {{ default_type application/json; return 200 '{{"order_id":"42","status":"printing"}}'; }}
  }}
}}
"""


class Services:
    """nginx (plain and TLS) and, when asked, a RabbitMQ node, all in the cgroup."""

    def __init__(self, work: Path, cgroup: Cgroup, rabbit: bool):
        self.work, self.cgroup = work, cgroup
        self.port, self.tls_port = free_port(), free_port()
        d = work / "nginx"
        d.mkdir()
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                        "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                        "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem")],
                       check=True, capture_output=True)
        (d / "nginx.conf").write_text(NGINX_CONF.format(d=d, port=self.port, tls_port=self.tls_port))
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        self.nginx = subprocess.Popen([nginx, "-c", str(d / "nginx.conf"), "-e", str(d / "error.log")],
                                      preexec_fn=cgroup.preexec(), stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port, self.nginx, "nginx", log_file=d / "error.log")
        wait_port(self.tls_port, self.nginx, "nginx (TLS)", log_file=d / "error.log")
        self.nginx_bin = nginx
        self.rabbit = None
        if rabbit:
            sys.path.insert(0, str(REPO / "tests"))
            from clientlib import RabbitMQ  # the tests' own broker, on free ports
            log("starting RabbitMQ")
            with cgroup.entered():
                self.rabbit = RabbitMQ().start()

    def stop(self):
        if self.rabbit is not None:
            self.rabbit.stop()
        self.nginx.terminate()
        try:
            self.nginx.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.nginx.kill()


# ------------------------------------------------------------------ the loads

def wrk(url: str, seconds: float, conns: int, preexec=None) -> dict:
    out = subprocess.run(["wrk", "-t1", f"-c{conns}", f"-d{seconds:g}s", url], capture_output=True,
                         text=True, check=True, preexec_fn=preexec).stdout
    m = re.search(r"(\d+) requests in ([\d.]+)(\w+)", out)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not m or not rps:
        fail(f"could not read wrk's output:\n{out}")
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"requests": int(m.group(1)), "rate": float(rps.group(1)),
            "errors": int(errors.group(1)) if errors else 0}


def vegeta(url: str, seconds: float, rate: int) -> dict:
    binary = TOOLS / "vegeta"
    if not binary.exists():
        fail(f"{binary} is missing (scripts/setup-bench.sh builds it)")
    attack = subprocess.run([str(binary), "attack", f"-rate={rate}/s", f"-duration={seconds}s",
                             "-keepalive=true", "-connections=64", "-workers=16",
                             # Never more than 64 at once: vegeta otherwise adds workers when
                             # answers slow down, and each worker past the kept-alive
                             # connections opens one per request; the TIME-WAIT sockets
                             # then make connect(2) search for a port (seconds of system
                             # time), answers slow further, and the rate collapses (measured:
                             # 315/s of 10,000, p99 31 s, untraced too once it started).
                             "-max-workers=64", "-max-connections=64"],
                            input=f"GET {url}\n".encode(), capture_output=True, check=True).stdout
    report = json.loads(subprocess.run([str(binary), "report", "-type=json"], input=attack,
                                       capture_output=True, check=True).stdout)
    lat = report["latencies"]
    return {"requests": report["requests"], "rate": report["throughput"],
            "p50_us": lat["50th"] / 1000, "p99_us": lat["99th"] / 1000,
            "success": report["success"]}


def amqp(services: Services, messages: int) -> dict:
    client = TOOLS / "sonde-go-clients"
    if not client.exists():
        fail(f"{client} is missing (scripts/setup-clients.sh builds it)")
    url = services.rabbit.url
    q = f"bench-{time.monotonic_ns()}"
    consumer = subprocess.Popen([str(client), "amqp-consume", "-url", url, "-exchange", "bench",
                                 "-queue", f"{q}:{q}", "-count", str(messages)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=services.cgroup.preexec())
    if consumer.stdout.readline().strip() != "READY":
        fail(f"the AMQP consumer did not start: {consumer.stderr.read()}")
    start = time.monotonic()
    subprocess.run([str(client), "amqp-publish", "-url", url, "-exchange", "bench", "-rk", q,
                    "-count", str(messages), "-size", "256", "-confirm", "-id", q],
                   check=True, capture_output=True, preexec_fn=services.cgroup.preexec())
    _, err = consumer.communicate(timeout=120)
    if consumer.returncode != 0:
        fail(f"the AMQP consumer failed: {err}")
    seconds = time.monotonic() - start
    return {"requests": messages, "rate": messages / seconds}


# ------------------------------------------------------------------ rounds

def run_workload(name: str, args, services: Services, sonde: str, cgroup: Cgroup, otlp: int,
                 work: Path) -> dict:
    plain = f"http://127.0.0.1:{services.port}/orders/42"
    tls = f"https://127.0.0.1:{services.tls_port}/orders/42"
    extra: list[str] = []
    if name == "http":
        def load():
            return wrk(plain, args.seconds, args.connections)
    elif name == "http-rate":
        def load():
            return vegeta(plain, args.seconds, args.rate)
    elif name == "https":
        def load():
            return wrk(tls, args.seconds, args.connections)
    elif name == "amqp":
        def load():
            return amqp(services, args.messages)
    elif name == "inject":
        extra = ["--inject-traceparent"]

        def load():
            return wrk(plain, args.seconds, args.connections, preexec=cgroup.preexec())
    else:
        fail(f"unknown workload {name!r}; known: {', '.join(WORKLOADS)}")

    rounds = []
    for i in range(args.pairs):
        if name == "inject":
            # What injection adds: the same workload traced without it first.
            log(f"{name}: pair {i + 1} of {args.pairs}: traced without injection")
            plain_agent = Agent(sonde, cgroup, otlp, work, [])
            try:
                untraced = load()
            finally:
                plain_agent.stop()
        else:
            log(f"{name}: pair {i + 1} of {args.pairs}: untraced")
            untraced = load()
        log(f"{name}: pair {i + 1} of {args.pairs}: traced")
        agent = Agent(sonde, cgroup, otlp, work, extra)
        try:
            if name == "https":
                warm_tls(agent, services, tls)
            before = agent.sample()
            perf = start_profile(args.profile, agent, name, i)
            traced = load()
            stop_profile(perf)
            after = agent.sample()
        finally:
            end = agent.stop()
        lost, dropped = losses(end)
        lost0, dropped0 = losses(before["metrics"])
        n = traced["requests"]
        rounds.append({
            "untraced": untraced, "traced": traced,
            "ratio": traced["rate"] / untraced["rate"] if untraced["rate"] else None,
            "agent_cpu_us_per_request": (after["cpu"] - before["cpu"]) * 1e6 / n if n else None,
            "bpf_us_per_request": (after["bpf"] - before["bpf"]) * 1e6 / n if n else None,
            "bpf_programs": per_request(before["programs"], after["programs"], n),
            "agent_peak_rss_mib": end["peak_rss_mib"],
            "events_lost": lost - lost0,
            "spans_dropped": dropped - dropped0,
            "spans_exported": end.get("sonde_spans_exported_total", 0),
            "bpf_stats_enabled": end.get("sonde_bpf_stats_enabled"),
            "loss_counters": loss_counters(end),
        })
    return summarize(name, rounds)


def start_profile(out: Path | None, agent: Agent, workload: str, i: int):
    """With --profile: `perf record` of the agent's threads while the traced round's load
    runs, into OUT/<workload>-<round>.perf.data (read with `perf report -i`)."""
    if out is None:
        return None
    perf = shutil.which("perf")
    if perf is None:
        fail("--profile needs perf (Debian's linux-perf)")
    out.mkdir(parents=True, exist_ok=True)
    data = out / f"{workload}-{i + 1}.perf.data"
    # DWARF unwinding: the agent is built without frame pointers, so -g alone gives
    # stacks cut after the first frame.
    proc = subprocess.Popen([perf, "record", "-q", "-F", "499", "--call-graph", "dwarf",
                             "-p", str(agent.proc.pid),
                             "-o", str(data)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)
    time.sleep(0.5)
    if proc.poll() is not None:
        fail(f"perf record exited with {proc.returncode}: {proc.stderr.read().decode(errors='replace')}")
    log(f"{workload}: profiling the agent into {data}")
    return proc


def stop_profile(proc) -> None:
    if proc is not None:
        interrupt(proc)


def warm_tls(agent: Agent, services: Services, url: str) -> None:
    """The agent finds nginx's libssl and puts its uprobes on it within a moment of
    starting; the measurement starts once it has."""
    deadline = time.monotonic() + 120
    while "TLS uprobes attached" not in agent.log.read_text(errors="replace"):
        if time.monotonic() > deadline:
            fail(f"the agent did not attach its TLS uprobes within 120 s:\n{agent.tail()}")
        time.sleep(0.2)


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(name: str, rounds: list[dict]) -> dict:
    s = {
        "pairs": len(rounds),
        "baseline": "traced without injection" if name == "inject" else "untraced",
        "untraced_rate": [r["untraced"]["rate"] for r in rounds],
        "traced_rate": [r["traced"]["rate"] for r in rounds],
        "throughput_ratio": med(r["ratio"] for r in rounds),
        "agent_cpu_us_per_request": med(r["agent_cpu_us_per_request"] for r in rounds),
        "bpf_us_per_request": med(r["bpf_us_per_request"] for r in rounds),
        "bpf_programs": {
            p: {f: med(r["bpf_programs"].get(p, {}).get(f) for r in rounds)
                for f in ("us_per_request", "runs_per_request", "ns_per_run")}
            for p in sorted({p for r in rounds for p in r["bpf_programs"]})},
        "agent_peak_rss_mib": max(r["agent_peak_rss_mib"] for r in rounds),
        "events_lost": sum(r["events_lost"] for r in rounds),
        "spans_dropped": sum(r["spans_dropped"] for r in rounds),
        "spans_exported": sum(r["spans_exported"] for r in rounds),
        "traced_requests": sum(r["traced"]["requests"] for r in rounds),
        "bpf_stats_enabled": all(r["bpf_stats_enabled"] == 1 for r in rounds),
        "loss_counters": [r["loss_counters"] for r in rounds],
    }
    if name == "http-rate":
        s["untraced_p99_us"] = [r["untraced"]["p99_us"] for r in rounds]
        s["traced_p99_us"] = [r["traced"]["p99_us"] for r in rounds]
        s["p99_added_us"] = med(r["traced"]["p99_us"] - r["untraced"]["p99_us"] for r in rounds)
        s["p50_added_us"] = med(r["traced"]["p50_us"] - r["untraced"]["p50_us"] for r in rounds)
    return s


# ------------------------------------------------------------------ report

def fmt(v, digits=2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return f"{v:,}"


def table(results: dict) -> str:
    unit = {"amqp": "messages/s", "inject": "requests/s; baseline: traced without injection"}
    lines = ["| workload | untraced /s | traced /s | traced / untraced | p99 added | agent CPU per request | eBPF per request | agent peak RSS | events lost | spans dropped |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(
            f"| {name} ({unit.get(name, 'requests/s')}) | {fmt(med(r['untraced_rate']), 0)} | "
            f"{fmt(med(r['traced_rate']), 0)} | {fmt(r['throughput_ratio'], 3)} | "
            f"{fmt(r.get('p99_added_us'), 0) + ' µs' if r.get('p99_added_us') is not None else '-'} | "
            f"{fmt(r['agent_cpu_us_per_request'])} µs | {fmt(r['bpf_us_per_request'])} µs | "
            f"{fmt(r['agent_peak_rss_mib'], 1)} MiB | {fmt(int(r['events_lost']))} | "
            f"{fmt(int(r['spans_dropped']))} |")
    return "\n".join(lines)


def program_table(results: dict, top: int = 8) -> str:
    """The programs that cost the most per request, per workload (medians over the
    traced rounds)."""
    lines = ["| workload | eBPF program | µs per request | runs per request | ns per run |",
             "|---|---|---|---|---|"]
    for name, r in results.items():
        progs = sorted(r.get("bpf_programs", {}).items(),
                       key=lambda kv: -(kv[1]["us_per_request"] or 0))
        for prog, f in progs[:top]:
            lines.append(f"| {name} | {prog} | {fmt(f['us_per_request'], 3)} | "
                         f"{fmt(f['runs_per_request'], 2)} | {fmt(f['ns_per_run'], 0)} |")
    return "\n".join(lines)


def machine() -> dict:
    model = ""
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return {"kernel": platform.release(), "cpus": os.cpu_count(), "cpu": model,
            "load_average_at_start": os.getloadavg()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 short pairs per workload (about 4 min)")
    ap.add_argument("--json", type=Path, help="write the results here too")
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=15.0, help="per round")
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--rate", type=int, default=5000, help="http-rate: requests per second")
    ap.add_argument("--messages", type=int, default=20000, help="amqp: messages per round")
    ap.add_argument("--profile", type=Path, metavar="DIR",
                    help="perf record the agent during each traced round into DIR")
    args = ap.parse_args()
    if args.quick:
        args.seconds, args.messages = 3.0, 2000
    if args.pairs < 1:
        fail("--pairs must be at least 1")
    if os.geteuid() != 0:
        fail("run as root: the agent loads eBPF programs")
    sonde = os.environ.get("SONDE_BIN", str(REPO / "target/release/sonde"))
    if not os.access(sonde, os.X_OK):
        fail(f"no agent at {sonde} (cargo xtask build, or set SONDE_BIN)")
    for tool in ("nginx", "wrk", "openssl"):
        if not (shutil.which(tool) or os.path.exists(f"/usr/sbin/{tool}")):
            fail(f"{tool} is not installed (scripts/setup.sh installs it)")
    names = [w.strip() for w in args.workloads.split(",") if w.strip()]
    for n in names:
        if n not in WORKLOADS:
            fail(f"unknown workload {n!r}; known: {', '.join(WORKLOADS)}")

    stats_path = Path("/proc/sys/kernel/bpf_stats_enabled")
    stats_before = stats_path.read_text().strip()
    stats_path.write_text("1")
    receiver = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    cgroup = Cgroup()
    work = Path(tempfile.mkdtemp(prefix="sonde-bench-"))
    services = None
    started = time.monotonic()
    host = machine()
    try:
        services = Services(work, cgroup, rabbit="amqp" in names)
        results = {n: run_workload(n, args, services, sonde, cgroup, receiver.server_address[1], work)
                   for n in names}
    finally:
        if services is not None:
            services.stop()
        cgroup.remove()
        stats_path.write_text(stats_before)
        shutil.rmtree(work, ignore_errors=True)
    report = {"machine": host, "quick": args.quick, "pairs": args.pairs, "seconds": args.seconds,
              "wall_seconds": round(time.monotonic() - started, 1), "workloads": results}
    if "http" in results:
        # The plain-HTTP figures, with the fixed-rate latency from http-rate.
        http = dict(results["http"])
        http["p99_added_us"] = results.get("http-rate", {}).get("p99_added_us")
        report["http"] = {k: http[k] for k in (
            "throughput_ratio", "p99_added_us", "agent_cpu_us_per_request", "bpf_us_per_request",
            "agent_peak_rss_mib", "events_lost", "spans_dropped")}
    print(table(results))
    print()
    print(program_table(results))
    print(f"\n{host['cpus']} CPUs ({host['cpu']}), kernel {host['kernel']}, load average at start "
          f"{', '.join(f'{x:.2f}' for x in host['load_average_at_start'])}; {args.pairs} pairs of "
          f"{args.seconds:g} s rounds; took {report['wall_seconds']:.0f} s")
    for name, r in results.items():
        for i, counters in enumerate(r["loss_counters"]):
            for k, v in sorted(counters.items()):
                print(f"{name}, traced round {i + 1}: {k} {v:g}")
    if not all(r["bpf_stats_enabled"] for r in results.values()):
        print("note: the agent did not see kernel.bpf_stats_enabled=1 in every round: eBPF time is incomplete")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        log(f"JSON in {args.json}")


if __name__ == "__main__":
    main()
