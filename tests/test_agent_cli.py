"""What an operator sees when sonde cannot start: each mistake gets one clear line on
stderr naming what is wrong and what to do, and a non-zero exit, never a verifier dump
or a panic."""
import gzip
import os
import platform
import shutil
import subprocess

import pytest

from sonde_testlib import READY_TIMEOUT, STOP_TIMEOUT, require_root, sonde_bin


def run(args, env=None, user=None, timeout=30):
    cmd = [str(sonde_bin()), *args]
    if user:
        # A copy the unprivileged user can execute, wherever the build tree lives.
        copy = "/tmp/sonde-unprivileged-test"
        shutil.copy(sonde_bin(), copy)
        os.chmod(copy, 0o755)
        cmd = ["su", user, "-s", "/bin/sh", "-c", " ".join([copy, *args])]
    full_env = {**os.environ, **(env or {})}
    full_env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
    return subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=timeout)


def assert_refused(result, *needles):
    assert result.returncode != 0, f"expected a refusal, got exit 0\n{result.stderr}"
    assert "panicked" not in result.stderr, result.stderr
    for n in needles:
        assert n in result.stderr, f"{n!r} not in stderr:\n{result.stderr}"


def test_without_privileges_it_says_what_is_missing():
    require_root()  # to switch to an unprivileged user
    r = run(["run"], user="nobody")
    assert_refused(r, "needs root", "CAP_BPF", "CAP_PERFMON")


KPROBE_PMU = "/sys/bus/event_source/devices/kprobe/type"


def kernel_config_kprobes():
    """CONFIG_KPROBES of the running kernel, from /proc/config.gz or
    /boot/config-<release>: (True or False, where it was read), or (None, why not)."""
    sources = [("/proc/config.gz", gzip.open), (f"/boot/config-{platform.release()}", open)]
    for path, opener in sources:
        try:
            with opener(path, "rt") as f:
                lines = f.read().splitlines()
        except OSError:
            continue
        return "CONFIG_KPROBES=y" in lines, path
    return None, "neither " + " nor ".join(p for p, _ in sources) + " is readable"


def test_the_kprobe_backend_works_where_the_kernel_has_kprobes_and_is_refused_where_not(tmp_path):
    """Forcing `--probe-backend kprobe`: on a kernel without kprobes (this project's
    Firecracker kernel) a refusal naming the kernel option; on one with them (Debian's
    6.1 and 6.12) the agent starts on kprobes and traces a request once."""
    require_root()
    configured, source = kernel_config_kprobes()
    pmu = os.path.exists(KPROBE_PMU)
    if configured is not None and configured != pmu:
        pytest.fail(f"{source} says CONFIG_KPROBES={'y' if configured else 'n'} but {KPROBE_PMU} "
                    f"{'exists' if pmu else 'is missing'}: the kprobe PMU comes with kprobes "
                    "(CONFIG_KPROBE_EVENTS); a kernel split like this is not one the agent knows")
    # Without a kernel config to read, the kprobe PMU is what the agent itself checks.
    has_kprobes = pmu if configured is None else configured
    if not has_kprobes:
        r = run(["run", "--probe-backend", "kprobe"])
        assert_refused(r, "cannot attach kprobes", "CONFIG_KPROBES", "--probe-backend tracepoint")
        return
    if platform.machine() != "x86_64":
        r = run(["run", "--probe-backend", "kprobe"])
        assert_refused(r, "x86-64")
        return
    code, err, kinds = trace_one_request(
        [str(sonde_bin()), "run", "--probe-backend", "kprobe"], tmp_path, "/forced-kprobe")
    assert code == 0, f"({source}: kprobes) {err}"
    assert "backend=kprobe" in err, err
    assert kinds == [2, 3], f"want one server and one client span, got kinds {kinds}\n{err}"


@pytest.mark.parametrize(
    "args,env,needles",
    [
        (["run", "--payload-cap", "99999"], {}, ["--payload-cap", "16384"]),
        (["run", "--output", "otlp-json"], {}, ["--output-file"]),
        (["run", "--output", "otlp"], {"OTEL_EXPORTER_OTLP_PROTOCOL": "carrier-pigeon"}, ["carrier-pigeon", "grpc"]),
        (["run", "--output", "otlp", "--otlp-endpoint", "ftp://x"], {}, ["ftp"]),
        (["run", "--ring-buffer-mb", "3"], {}, ["power of two"]),
        (["run", "--output", "otlp-json", "--output-file", "/nonexistent-dir/spans.jsonl"], {}, ["/nonexistent-dir/spans.jsonl"]),
        (["run", "--probe-backend", "magic"], {}, ["magic"]),
    ],
)
def test_bad_settings_are_refused_with_a_clear_message(args, env, needles):
    require_root()
    assert_refused(run(args, env=env), *needles)


def test_a_busy_admin_port_is_reported():
    require_root()
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    port = s.getsockname()[1]
    try:
        r = run(["run", "--admin-addr", f"127.0.0.1:{port}"])
        assert_refused(r, f"127.0.0.1:{port}", "--admin-addr")
    finally:
        s.close()


# A mount namespace shows the agent a kprobe PMU whose perf events cannot be created:
# its type is one no PMU of the running kernel has, whether the kernel has kprobes
# (then the real kprobe PMU is hidden) or not (like this project's, CONFIG_KPROBES off).
# In auto mode the agent must load every kprobe program (so the verifier checks them
# here too), fail to attach, detach what it attached, fall back to syscall tracepoints,
# and trace as usual.
FAKE_KPROBE_PMU = r'''
set -e
D=/sys/bus/event_source/devices
S=$(mktemp -d)
for d in $(ls $D); do
  mkdir -p $S/$d; cp $D/$d/type $S/$d/ 2>/dev/null || true
  if [ -d $D/$d/format ]; then mkdir -p $S/$d/format; cp $D/$d/format/* $S/$d/format/ 2>/dev/null || true; fi
done
unused=$(( $(cat $D/*/type | sort -n | tail -1) + 1000 ))
rm -rf $S/kprobe
mkdir -p $S/kprobe/format; echo $unused > $S/kprobe/type; echo "config:0" > $S/kprobe/format/retprobe
mount --bind $S $D
exec "$@"
'''


def trace_one_request(agent_cmd, tmp_path, path):
    """Runs the agent (`agent_cmd`, a `sonde run` command line, maybe behind a wrapper)
    until ready, makes one HTTP request for `path` to a Python server, stops the agent
    with SIGINT: (exit code, stderr, sorted kinds of the spans for `path`)."""
    import json
    import signal
    import socket
    import time
    import urllib.request

    from sonde_testlib import free_port, wait_listening

    spans_file = tmp_path / "spans.jsonl"
    admin = free_port()
    agent = subprocess.Popen(
        [*agent_cmd, "--output", "otlp-json", "--output-file", str(spans_file),
         "--admin-addr", f"127.0.0.1:{admin}"],
        stderr=subprocess.PIPE, text=True)
    server = None
    try:
        # Loading every program takes a minute or more under emulation (vm-test).
        deadline = time.time() + READY_TIMEOUT
        while time.time() < deadline:
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=1).status == 200:
                    break
            except OSError:
                if agent.poll() is not None:
                    pytest.fail(f"agent exited with {agent.returncode} before ready:\n{agent.stderr.read()}")
                time.sleep(0.2)
        else:
            agent.kill()
            pytest.fail(f"agent never ready:\n{agent.stderr.read()}")
        port = free_port()
        server = subprocess.Popen(["python3", "-m", "http.server", str(port), "--bind", "127.0.0.1",
                                   "--directory", str(tmp_path)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_listening(port, server)
        with socket.create_connection(("127.0.0.1", port)) as c:
            c.sendall(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
            while c.recv(65536):
                pass
        time.sleep(2)
    finally:
        if server:
            server.kill()
        agent.send_signal(signal.SIGINT)
        _, err = agent.communicate(timeout=STOP_TIMEOUT)
    kinds = sorted(
        s["kind"]
        for line in spans_file.read_text().splitlines()
        for rs in json.loads(line)["resourceSpans"]
        for ss in rs["scopeSpans"]
        for s in ss["spans"]
        for a in s["attributes"]
        if a["key"] == "url.path" and a["value"].get("stringValue") == path
    ) if spans_file.exists() else []
    return agent.returncode, err, kinds


def test_auto_falls_back_to_tracepoints_when_kprobes_do_not_attach(tmp_path):
    require_root()
    script = tmp_path / "fake-kprobe.sh"
    script.write_text(FAKE_KPROBE_PMU)
    code, err, kinds = trace_one_request(
        ["unshare", "-m", "bash", str(script), str(sonde_bin()), "run"], tmp_path, "/kprobe-fallback")
    assert code == 0, err
    assert "kprobes did not attach; using syscall tracepoints" in err, err
    assert "backend=tracepoint" in err, err
    # The server's span and this test's own client span, each exactly once: a kprobe
    # left attached beside the tracepoints would double them.
    assert kinds == [2, 3], f"want one server and one client span, got kinds {kinds}\n{err}"


def test_forced_kprobes_that_do_not_attach_are_an_error(tmp_path):
    require_root()
    script = tmp_path / "fake-kprobe.sh"
    script.write_text(FAKE_KPROBE_PMU)
    r = subprocess.run(["unshare", "-m", "bash", str(script), str(sonde_bin()), "run",
                        "--probe-backend", "kprobe"], capture_output=True, text=True,
                       timeout=max(60, READY_TIMEOUT))
    assert_refused(r, "kprobe __x64_sys_read")
