"""Redaction on by default (issue 12, item 4), against the real agent: real clients
(curl, Python's urllib) send every kind of secret to real Python servers over HTTP and
HTTPS: Authorization, Proxy-Authorization, Cookie and X-API-Key request headers, a
Set-Cookie response header, query parameters and JSON fields named password, token,
secret, api_key and card number, payment card numbers in the path, the query and the
bodies, a name the config file adds (ssn), and a program the server runs with
`--password` on its command line. Config file rules that would copy secret headers,
parameters and fields into attributes are there too.

Then no secret may appear anywhere in what the agent wrote: its OTLP JSON output, its
log (stderr and stdout), nor in what `sonde replay` makes of a tcpdump capture of the
same plain-HTTP traffic, to stdout and to OTLP JSON. The spans must still be there,
with [REDACTED] where the secrets were, and /metrics counts the redacted values.
Runs as root.
"""
import json
import random
import signal
import subprocess
import time
import urllib.request
import uuid

import pytest

from clientlib import PY, make_cert, start_port_server
from sonde_testlib import (
    CLIENT, SERVER, Agent, by_kind, fmt_spans, require_root, run_curl, sonde_bin,
)

REDACTED = "[REDACTED]"


def luhn_card(prefix: str, length: int = 16) -> str:
    """A random card number with a valid Luhn check digit."""
    digits = [int(c) for c in prefix]
    while len(digits) < length - 1:
        digits.append(random.randrange(10))
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2 == 0:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return "".join(map(str, digits)) + str((10 - total % 10) % 10)


def secret(name: str) -> str:
    return f"{name}{uuid.uuid4().hex[:12]}"


# One set of secrets per run, each unique, so that a find is never a coincidence.
S = {k: secret(k) for k in [
    "bearer", "basic", "cookie", "apikey", "setcookie", "qtoken", "qpassword", "qapikey",
    "qsecret", "qssn", "jpassword", "japikey", "jsecret", "jtoken", "argpw", "argtoken",
    "resppassword", "amqppw",
]}
CARDS = {
    "path": luhn_card("4"),
    "query": luhn_card("51"),
    "body_spaced": luhn_card("4"),
    "json": luhn_card("37", 15),
    "response": luhn_card("6011"),
}

CONFIG = """\
# Rules that would copy secrets into attributes: redaction must win.
business:
  rules:
    - attribute: auth.header
      header: Authorization
    - attribute: tenant.key
      header: X-API-Key
    - attribute: customer.pw
      json: password
      in: request
    - attribute: ref.q
      query: api_key
    - attribute: shop.note
      query: note
redaction:
  names: [ssn]
"""

SERVER_CODE = r'''
import json, ssl, subprocess, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ARGPW, ARGTOKEN, SETCOOKIE, RESPPW, RESPCARD = sys.argv[1:6]

class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a):
        pass
    def reply(self):
        # A program run while handling the request, with secrets on its command line.
        subprocess.run(["/bin/true", "--password", ARGPW, "--token=" + ARGTOKEN])
        body = json.dumps({"ok": True, "password": RESPPW, "card": RESPCARD}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Set-Cookie", "sid=" + SETCOOKIE + "; HttpOnly")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_GET(self):
        self.reply()
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.reply()

srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
if len(sys.argv) > 7:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(sys.argv[6], sys.argv[7])
    ctx.set_alpn_protocols(["http/1.1"])
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
print("PORT", srv.server_address[1], flush=True)
srv.serve_forever()
'''


def every_secret() -> list[str]:
    found = list(S.values())
    for card in CARDS.values():
        found += [card, " ".join(card[i:i + 4] for i in range(0, len(card), 4))]
    return found


def leaked(text: str) -> list[str]:
    return [s for s in every_secret() if s in text]


def path_and_query() -> str:
    return (f"/pay/{CARDS['path']}/charge?order=77&token={S['qtoken']}"
            f"&password={S['qpassword']}&api_key={S['qapikey']}&client_secret={S['qsecret']}"
            f"&ssn={S['qssn']}&note=card+{CARDS['query']}")


def body() -> str:
    return json.dumps({
        "order_id": "77", "password": S["jpassword"], "api_key": S["japikey"],
        "secret": S["jsecret"], "access_token": S["jtoken"], "cardNumber": CARDS["json"],
        "comment": "paid with " + " ".join(CARDS["body_spaced"][i:i + 4] for i in range(0, 16, 4)),
    })


HEADERS = {
    "Authorization": f"Bearer {S['bearer']}",
    "Proxy-Authorization": f"Basic {S['basic']}",
    "Cookie": f"session={S['cookie']}",
    "X-API-Key": S["apikey"],
    "Content-Type": "application/json",
}


def curl_args() -> list[str]:
    args = ["-X", "POST", "--data", body()]
    for k, v in HEADERS.items():
        args += ["-H", f"{k}: {v}"]
    return args


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The agent with the config file, a tcpdump of the plain-HTTP server's port, the
    servers, and the requests; yields what was written once the agent has stopped."""
    require_root()
    work = tmp_path_factory.mktemp("redaction")
    cfg = work / "sonde.yaml"
    cfg.write_text(CONFIG)
    agent = Agent(work / "agent", args=["--config", str(cfg)])
    agent.start()
    cert = make_cert(work / "tls")
    script = work / "secret_server.py"
    script.write_text(SERVER_CODE)
    server_args = [S["argpw"], S["argtoken"], S["setcookie"], S["resppassword"], CARDS["response"]]
    plain = start_port_server([PY, script, *server_args], work, "plain_server")
    tls = start_port_server([PY, script, *server_args, cert.cert, cert.key], work, "tls_server")
    pcap = work / "plain.pcap"
    dump = subprocess.Popen(["tcpdump", "-i", "lo", "-U", "-s", "0", "-w", str(pcap),
                             f"tcp port {plain.port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    line = dump.stderr.readline()
    if "listening" not in line:
        dump.kill()
        pytest.fail(f"tcpdump did not start: {line}", pytrace=False)
    try:
        clients = []
        plain_url = f"http://127.0.0.1:{plain.port}{path_and_query()}"
        for url, extra in [(plain_url, []), (tls.url(path_and_query()), ["--cacert", str(cert.cert)])]:
            c = run_curl([url], extra=curl_args() + extra)
            assert c.out[0]["code"] == 200, f"curl {url}: {c.out} {c.stderr}"
            clients.append(c.pid)
        py = subprocess.run([PY, "-c", (
            "import sys, urllib.request\n"
            "req = urllib.request.Request(sys.argv[1], data=sys.argv[2].encode(), method='POST',"
            " headers=dict(h.split(': ', 1) for h in sys.argv[3:]))\n"
            "print(urllib.request.urlopen(req, timeout=10).status)\n"),
            plain_url, body(), *[f"{k}: {v}" for k, v in HEADERS.items()]],
            capture_output=True, text=True, timeout=60)
        assert py.returncode == 0 and py.stdout.strip() == "200", py.stderr
        servers = plain.pids() | tls.pids()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            spans = agent.spans_of(servers)
            if len(by_kind(spans, SERVER)) >= 3:
                break
            time.sleep(0.2)
        time.sleep(1.5)
        status, metrics = agent.get("/metrics")
    finally:
        dump.send_signal(signal.SIGINT)
        dump.wait(timeout=10)
        plain.stop()
        tls.stop()
        code = agent.stop()
    assert code == 0, f"agent exited with {code}\n{agent.stderr_tail()}"
    assert status == 200
    yield {
        "agent": agent, "servers": servers, "clients": clients, "metrics": metrics,
        "pcap": pcap, "cfg": cfg, "work": work,
    }


def test_no_secret_in_any_exported_span_or_log(run):
    agent = run["agent"]
    spans = agent.spans()
    servers = by_kind([s for s in spans if s.pid in run["servers"]], SERVER)
    clients = by_kind([s for s in spans if s.pid in run["clients"]], CLIENT)
    # The spans are there (HTTP and HTTPS, curl and Python), so redaction, not a lost
    # span, is why the secrets are missing.
    assert len(servers) == 3, f"expected 3 server spans:\n{fmt_spans(servers)}"
    assert len(clients) == 2, f"expected the 2 curl client spans:\n{fmt_spans(clients)}"
    assert {s.attrs.get("url.scheme") for s in servers} == {"http", "https"}
    for s in servers + clients:
        q = s.attrs.get("url.query", "")
        for name in ["token", "password", "api_key", "client_secret", "ssn"]:
            assert f"{name}={REDACTED}" in q, f"{name} not redacted in url.query: {s}"
        assert "order=77" in q, f"ordinary parameters stay: {s}"
        assert f"/pay/{REDACTED}/charge" in s.attrs.get("url.path", ""), s
    for s in clients:
        assert f"token={REDACTED}" in s.attrs["url.full"], s
    for s in servers:
        # The config file's rules found the values, and got [REDACTED] instead.
        for attr in ["auth.header", "tenant.key", "customer.pw", "ref.q"]:
            assert s.attrs.get(attr) == REDACTED, f"{attr}: {s}"
        assert s.attrs.get("shop.note") == f"card {REDACTED}", s
        assert s.attrs.get("order.id") == "77", s
    programs = [s for s in spans if s.pid in run["servers"]
                and s.attrs.get("process.executable.name") == "true"]
    assert programs, "no span for the program the server ran"
    for p in programs:
        assert p.attrs["process.command_args"][1:3] == ["--password", REDACTED], p
    raw = agent.spans_file.read_text()
    assert not leaked(raw), f"secrets in the exported spans: {leaked(raw)}"
    log = agent.stderr_path.read_text(errors="replace") + agent.stdout_path.read_text(errors="replace")
    assert not leaked(log), f"secrets in the agent's log: {leaked(log)}"
    redacted = [ln for ln in run["metrics"].splitlines()
                if ln.startswith("sonde_values_redacted_total ")]
    assert redacted and int(redacted[0].split()[1]) > 0, run["metrics"]


@pytest.mark.parametrize("output", ["stdout", "otlp-json"])
def test_replay_of_a_capture_exports_no_secret(run, output):
    pcap = run["pcap"]
    captured = pcap.read_bytes()
    # The capture does hold the secrets: the test would see a leak.
    assert S["qtoken"].encode() in captured and S["jpassword"].encode() in captured
    out_file = run["work"] / f"replay-{output}.jsonl"
    cmd = [str(sonde_bin()), "replay", str(pcap), "--config", str(run["cfg"]), "--output", output]
    if output == "otlp-json":
        cmd += ["--output-file", str(out_file)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    text = r.stdout + (out_file.read_text() if output == "otlp-json" else "")
    assert text.count(REDACTED) >= 10, f"no redacted spans came out:\n{text[:3000]}\n{r.stderr}"
    assert not leaked(text + r.stderr), f"secrets in replay output: {leaked(text + r.stderr)}"
