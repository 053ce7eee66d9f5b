"""What an operator sees when sonde cannot start: each mistake gets one clear line on
stderr naming what is wrong and what to do, and a non-zero exit, never a verifier dump
or a panic."""
import os
import shutil
import subprocess

import pytest

from sonde_testlib import require_root, sonde_bin


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


def test_forcing_a_backend_the_kernel_lacks_names_the_kernel_option():
    require_root()
    if os.path.exists("/sys/bus/event_source/devices/kprobe/type"):
        pytest.fail("this kernel has kprobes: the test machine is expected to be one without "
                    "(CONFIG_KPROBES off); adapt the test to force a backend this kernel lacks")
    r = run(["run", "--probe-backend", "kprobe"])
    assert_refused(r, "cannot attach kprobes", "CONFIG_KPROBES", "--probe-backend tracepoint")


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
