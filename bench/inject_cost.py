"""Cost of the injector's programs (`--inject-traceparent`): run_time_ns/run_cnt of
each from the agent's /proc/PID/fdinfo (kernel.bpf_stats_enabled=1 while it runs, put
back after), over N keep-alive HTTP GETs from a client in a cgroup of its own, the
agent limited to it, to a server outside it. Run as root.

usage: python3 bench/inject_cost.py SONDE_BIN N"""
import http.server, os, socket, subprocess, sys, threading, time, urllib.request
sonde, n = sys.argv[1], int(sys.argv[2])
def cgroup2_root():
    for line in open("/proc/self/mountinfo"):
        left, _, right = line.partition(" - ")
        if right.split(" ")[0] == "cgroup2":
            return left.split(" ")[4]
    raise SystemExit("no cgroup v2 file system is mounted")
CG = os.path.join(cgroup2_root(), f"sonde-inject-cost-{os.getpid()}")
os.makedirs(CG, exist_ok=True)
admin = 19878
agent = subprocess.Popen([sonde, "run", "--output", "otlp-json", "--output-file", f"/tmp/sonde-inject-cost-{os.getpid()}.jsonl",
                          "--admin-addr", f"127.0.0.1:{admin}", "--inject-traceparent", "--cgroup", CG],
                         stdout=subprocess.DEVNULL, stderr=open(f"/tmp/sonde-inject-cost-{os.getpid()}.log", "w"))
try:
    for _ in range(600):
        time.sleep(0.5)
        try:
            m = urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics").read().decode()
            if "sonde_inject_active 1" in m:
                break
        except OSError:
            pass
    else:
        raise SystemExit("injector never attached: " + open(f"/tmp/sonde-inject-cost-{os.getpid()}.log").read()[-2000:])

    class H(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        def do_GET(self):
            self.send_response(200); self.send_header("Content-Length", "2"); self.end_headers(); self.wfile.write(b"ok")
        def log_message(self, *a): pass
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    port = srv.server_address[1]
    threading.Thread(target=srv.serve_forever, daemon=True).start()

    def progs():
        out = {}
        for fd in os.listdir(f"/proc/{agent.pid}/fdinfo"):
            try:
                info = dict(l.split(":", 1) for l in open(f"/proc/{agent.pid}/fdinfo/{fd}").read().splitlines() if ":" in l)
            except OSError:
                continue
            if "prog_type" in info and "run_cnt" in info:
                key = (int(info["prog_type"]), info.get("prog_tag", "").strip())
                out[key] = (int(info["run_time_ns"]), int(info["run_cnt"]))
        return out
    old = open("/proc/sys/kernel/bpf_stats_enabled").read().strip()
    open("/proc/sys/kernel/bpf_stats_enabled", "w").write("1")
    try:
        before = progs()
        client = f"""
import socket, sys
s = socket.create_connection(("127.0.0.1", {port}))
req = b"GET /cost HTTP/1.1\\r\\nHost: 127.0.0.1\\r\\nUser-Agent: k\\r\\n\\r\\n"
resp = b"HTTP/1.1 200 OK\\r\\n"
for i in range({n}):
    s.sendall(req)
    got = b""
    while not got.endswith(b"ok"):
        got += s.recv(65536)
print(len(req))
"""
        r = subprocess.run([sys.executable, "-c", client], capture_output=True, text=True,
                           preexec_fn=lambda: open(CG + "/cgroup.procs", "w").write("0"))
        assert r.returncode == 0, r.stderr
        after = progs()
    finally:
        open("/proc/sys/kernel/bpf_stats_enabled", "w").write(old)
    names = {16: "sk_msg", 14: "sk_skb", 13: "sock_ops"}
    for k, (t, c) in after.items():
        if k[0] in names:
            bt, bc = before.get(k, (0, 0))
            dt, dc = t - bt, c - bc
            if dc:
                print(f"{names[k[0]]}: {dc} runs, {dt} ns, {dt / dc / 1000:.2f} us/run, {dt / n / 1000:.2f} us/request (request {r.stdout.strip()} bytes, {n} requests)")
    m = urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics").read().decode()
    print([l for l in m.splitlines() if l.startswith("sonde_inject_injected_total")])
finally:
    agent.terminate(); agent.wait()
    try: os.rmdir(CG)
    except OSError: pass
