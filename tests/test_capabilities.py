"""Least privilege (issue 12, item 2): the real agent started with exactly the
capability set of deploy/kubernetes/sonde-daemonset.yaml (the bounding set cut with
capsh, so that even root holds nothing else) traces HTTP and HTTPS; with any one of
those capabilities dropped it either stops with an error naming the capability, or
says in one line which feature is off and keeps tracing the rest. Runs as root.
"""
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from clientlib import PY, TLS_DIR, make_cert, start_port_server
from sonde_testlib import (
    CLIENT, REPO, Agent, by_kind, fmt_spans, require_root, run_curl, start_python_http_server,
)

DAEMONSET = REPO / "deploy" / "kubernetes" / "sonde-daemonset.yaml"


def daemonset_caps() -> list[str]:
    """The capabilities the DaemonSet's agent container adds (after dropping ALL), read
    from its `add:` line; the manifest must not make the container privileged."""
    text = DAEMONSET.read_text()
    assert not re.search(r"^\s*privileged:\s*true", text, re.M), "the DaemonSet is privileged"
    assert re.search(r"^\s*drop:\s*\[ALL\]", text, re.M), "the DaemonSet must drop ALL first"
    m = re.search(r"^\s*add:\s*\[([A-Z_, ]+)\]", text, re.M)
    assert m, f"no capabilities add: [...] line in {DAEMONSET}"
    return [f"cap_{c.strip().lower()}" for c in m.group(1).split(",")]


def all_caps() -> list[str]:
    out = subprocess.run(["capsh", "--print"], capture_output=True, text=True, check=True).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("Bounding set"))
    return line.split("=", 1)[1].strip().split(",")


class CapAgent(Agent):
    """`sonde run` under capsh with the bounding set cut to `keep`."""

    def __init__(self, workdir: Path, keep: list[str]):
        super().__init__(workdir)
        self.keep = keep

    def command(self) -> list[str]:
        drop = ",".join(c for c in all_caps() if c not in self.keep)
        return ["capsh", f"--drop={drop}", "--", "-c", 'exec "$@"', "sonde", *super().command()]


def effective_caps(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^CapEff:\s*([0-9a-f]+)", status, re.M).group(1), 16)


CAP_BITS = {"cap_dac_read_search": 2, "cap_net_admin": 12, "cap_sys_ptrace": 19,
            "cap_sys_admin": 21, "cap_perfmon": 38, "cap_bpf": 39}


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    require_root()
    if not shutil.which("capsh"):
        pytest.fail("capsh is missing: apt-get install libcap2-bin (scripts/setup-tests.sh)",
                    pytrace=False)
    return make_cert(tmp_path_factory.mktemp("tls"))


def traffic(agent, tmp_path, cert, https_server):
    """A curl over HTTP to python -m http.server and a curl over HTTPS to a Python TLS
    server; answers the curl client spans (plain, tls) the agent exported."""
    plain = start_python_http_server(tmp_path, tmp_path)
    try:
        c1 = run_curl([f"http://127.0.0.1:{plain.port}/"])
        c2 = run_curl([https_server.url("/orders/5")], extra=["--cacert", str(cert.cert)])
        assert c1.out[0]["code"] == 200 and c2.out[0]["code"] == 200
        http = by_kind(agent.wait_spans([c1.pid], 1, what="of curl over HTTP"), CLIENT)
        # The HTTPS span, if any, comes as fast as the HTTP one did; wait a little more.
        time.sleep(1.5)
        https = by_kind(agent.spans_of([c2.pid]), CLIENT)
        return http, https
    finally:
        plain.stop()


def log_of(agent) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", agent.stderr_path.read_text(errors="replace"))


@pytest.fixture(scope="module")
def https_server(cert, tmp_path_factory):
    s = start_port_server([PY, TLS_DIR / "https_server.py", cert.cert, cert.key],
                          tmp_path_factory.mktemp("https"), "https_server")
    yield s
    s.stop()


def test_the_daemonset_set_traces_http_and_https(tmp_path, cert, https_server):
    keep = daemonset_caps()
    agent = CapAgent(tmp_path / "agent", keep)
    agent.start()
    try:
        want = sum(1 << CAP_BITS[c] for c in keep)
        assert effective_caps(agent.proc.pid) == want, (
            f"the agent holds {effective_caps(agent.proc.pid):#x}, the DaemonSet's set is {want:#x}")
        http, https = traffic(agent, tmp_path, cert, https_server)
        assert [s.attrs.get("url.scheme") for s in http] == ["http"], fmt_spans(http)
        assert [s.attrs.get("url.scheme") for s in https] == ["https"], fmt_spans(https)
        assert https[0].attrs.get("url.path") == "/orders/5", https[0]
        log = log_of(agent)
        assert "capability=" not in log, f"a capability was reported missing:\n{log[-3000:]}"
    finally:
        assert agent.stop() == 0, agent.stderr_tail()


# What each capability of the DaemonSet's set does when it alone is missing:
# (capability, words the log must say, HTTPS still captured)
ONE_MISSING = [
    ("cap_bpf", "CAP_BPF is missing; CAP_SYS_ADMIN stands in for it", True),
    ("cap_perfmon", "CAP_PERFMON is missing; CAP_SYS_ADMIN stands in for it", True),
    ("cap_sys_admin", "TLS capture is off", False),
    ("cap_sys_ptrace", "CAP_SYS_PTRACE is missing", None),
    ("cap_dac_read_search", "CAP_DAC_READ_SEARCH is missing", None),
]


@pytest.mark.parametrize("cap,says,https_on", ONE_MISSING, ids=[c[0] for c in ONE_MISSING])
def test_one_capability_missing_says_what_is_off(tmp_path, cert, https_server, cap, says,
                                                 https_on):
    keep = [c for c in daemonset_caps() if c != cap]
    assert len(keep) == len(daemonset_caps()) - 1, f"{cap} is not in the DaemonSet's set"
    agent = CapAgent(tmp_path / "agent", keep)
    agent.start()
    try:
        http, https = traffic(agent, tmp_path, cert, https_server)
        assert [s.attrs.get("url.scheme") for s in http] == ["http"], (
            f"without {cap} plain HTTP must still be traced:\n{fmt_spans(http)}")
        log = log_of(agent)
        assert says in log, f"without {cap} the log must say {says!r}:\n{log[-3000:]}"
        line = next(ln for ln in log.splitlines() if says in ln)
        assert cap.upper() in line or "CAP_SYS_ADMIN" in line, line
        if https_on is True:
            assert len(https) == 1, fmt_spans(https)
        elif https_on is False:
            assert not https, f"HTTPS was captured without {cap}:\n{fmt_spans(https)}"
    finally:
        assert agent.stop() == 0, agent.stderr_tail()


def test_without_cap_bpf_and_cap_sys_admin_the_error_names_cap_bpf(tmp_path):
    keep = [c for c in daemonset_caps() if c not in ("cap_bpf", "cap_sys_admin")]
    agent = CapAgent(tmp_path / "agent", keep)
    r = subprocess.run(agent.command(), capture_output=True, text=True, timeout=60,
                       stdin=subprocess.DEVNULL)
    assert r.returncode != 0
    assert "lacks CAP_BPF" in r.stderr, r.stderr
