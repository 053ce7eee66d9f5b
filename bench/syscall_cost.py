#!/usr/bin/env python3
"""What one syscall costs a traced process, per socket backend: the time of a loop of
write()/read() pairs on a TCP loopback connection (sonde's full path: socket lookup,
stream offset, payload copy, ring buffer) and on a pipe (not a socket: one map lookup),
with no agent, with `sonde run --probe-backend kprobe` and with `--probe-backend
tracepoint`. Ratios and differences in one run, never a timed test.

With --hooks, also empty programs on the write syscall through bpftrace (kprobe,
syscall tracepoint, and fentry as bpftrace's kfunc), to compare the hooks alone and to
see whether fentry loads on the running kernel.

    bench/syscall_cost.py [--pairs N] [--hooks] [--backends kprobe,tracepoint]

Run as root; SONDE_BIN picks the agent (default target/release/sonde). Made for
`cargo xtask vm-test`'s kernels (see README, "Kernels"), where it runs as
`scripts/vm-guest.sh ... --bench`, and works on any kernel.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PAYLOAD = b"x" * 64


def tcp_pairs(n: int) -> float:
    """Seconds for n write+read pairs on one loopback TCP connection (4 syscalls each:
    the client writes, the server reads, writes back, the client reads)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    cli = socket.create_connection(srv.getsockname())
    conn, _ = srv.accept()
    a, b = cli.fileno(), conn.fileno()
    t = time.perf_counter()
    for _ in range(n):
        os.write(a, PAYLOAD)
        os.read(b, 4096)
        os.write(b, PAYLOAD)
        os.read(a, 4096)
    dt = time.perf_counter() - t
    for s in (cli, conn, srv):
        s.close()
    return dt


def pipe_pairs(n: int) -> float:
    """Seconds for n write+read pairs on a pipe (2 syscalls each, neither a socket)."""
    r, w = os.pipe()
    t = time.perf_counter()
    for _ in range(n):
        os.write(w, PAYLOAD)
        os.read(r, 4096)
    dt = time.perf_counter() - t
    os.close(r)
    os.close(w)
    return dt


def measure(n: int, rounds: int = 3) -> tuple[float, float]:
    """Best of `rounds`: (ns per TCP syscall, ns per pipe syscall)."""
    tcp = min(tcp_pairs(n) for _ in range(rounds)) / (4 * n) * 1e9
    pipe = min(pipe_pairs(n) for _ in range(rounds)) / (2 * n) * 1e9
    return tcp, pipe


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_agent(backend: str, workdir: Path) -> subprocess.Popen:
    bin_ = os.environ.get("SONDE_BIN", str(REPO / "target/release/sonde"))
    port = free_port()
    err = open(workdir / f"agent-{backend}.stderr", "wb")
    p = subprocess.Popen([bin_, "run", "--probe-backend", backend, "--output", "otlp-json",
                          "--output-file", str(workdir / f"spans-{backend}.jsonl"),
                          "--admin-addr", f"127.0.0.1:{port}"],
                         stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if p.poll() is not None:
            sys.exit(f"agent ({backend}) exited with {p.returncode}:\n"
                     + (workdir / f"agent-{backend}.stderr").read_text(errors="replace")[-3000:])
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                if r.status == 200:
                    return p
        except OSError:
            pass
        time.sleep(0.5)
    p.kill()
    sys.exit(f"agent ({backend}) not ready within 300 s")


def program_time(pid: int) -> tuple[int, int]:
    """(run_time_ns, run_cnt) summed over the agent's loaded programs, from the fdinfo of
    their file descriptors (the kernel counts them with kernel.bpf_stats_enabled=1)."""
    total_ns = total_cnt = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
        if "prog_tag" in fields and "run_cnt" in fields:
            total_ns += int(fields["run_time_ns"])
            total_cnt += int(fields["run_cnt"])
    return total_ns, total_cnt


def stop(p: subprocess.Popen) -> None:
    p.send_signal(signal.SIGINT)
    try:
        p.wait(timeout=60)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def bpftrace_hooks(n: int) -> list[tuple[str, str]]:
    """(hook, result) for an empty bpftrace program on each kind of write hook."""
    bt = shutil.which("bpftrace")
    if not bt:
        return [("bpftrace", "not installed (apt-get install bpftrace)")]
    out = []
    for name, probe in [("kprobe", "kprobe:__x64_sys_write"),
                        ("tracepoint", "tracepoint:syscalls:sys_enter_write"),
                        ("fentry", "kfunc:vmlinux:__x64_sys_write")]:
        p = subprocess.Popen([bt, "-e", f"{probe} {{ }} BEGIN {{ printf(\"ready\\n\"); }}"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        seen = []
        for line in p.stdout:
            seen.append(line)
            if line.strip() == "ready":
                break
        if not seen or seen[-1].strip() != "ready":
            p.wait()
            out.append((name, "does not load: " + " ".join("".join(seen).split())[:300]))
            continue
        _, pipe = measure(n)
        p.send_signal(signal.SIGINT)
        p.wait(timeout=60)
        out.append((name, f"{pipe:.0f} ns per pipe syscall (half are writes)"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=20000)
    ap.add_argument("--backends", default="kprobe,tracepoint")
    ap.add_argument("--hooks", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: the agent loads eBPF programs")
    workdir = Path(tempfile.mkdtemp(prefix="sonde-syscall-cost-"))
    print(f"kernel {os.uname().release}, {args.pairs} pairs per round, best of 3", flush=True)
    # A first round warms caches (and, under emulation, QEMU's translated code).
    measure(args.pairs // 4, rounds=1)
    base_tcp, base_pipe = measure(args.pairs)
    print(f"  no agent:    {base_tcp:8.0f} ns per TCP syscall, {base_pipe:8.0f} ns per pipe syscall",
          flush=True)
    for backend in args.backends.split(","):
        p = start_agent(backend, workdir)
        Path("/proc/sys/kernel/bpf_stats_enabled").write_text("1")
        ns0, cnt0 = program_time(p.pid)
        tcp, pipe = measure(args.pairs)
        ns1, cnt1 = program_time(p.pid)
        Path("/proc/sys/kernel/bpf_stats_enabled").write_text("0")
        stop(p)
        runs = cnt1 - cnt0
        per_run = (ns1 - ns0) / runs if runs else 0
        print(f"  {backend + ':':12s} {tcp:8.0f} ns per TCP syscall (+{tcp - base_tcp:.0f}), "
              f"{pipe:8.0f} ns per pipe syscall (+{pipe - base_pipe:.0f}); programs ran "
              f"{runs} times, {per_run:.0f} ns each on average", flush=True)
    if args.hooks:
        print(f"  empty bpftrace program on write (pipe loop, no hook: {base_pipe:.0f} ns):",
              flush=True)
        for name, result in bpftrace_hooks(args.pairs):
            print(f"    {name:10s} {result}", flush=True)


if __name__ == "__main__":
    main()
