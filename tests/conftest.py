"""Fixtures for sonde's privileged tests. See sonde_testlib for the helpers."""
import os
import time

import pytest

from sonde_testlib import (HELLO, Agent, backend_matrix, require_root, start_app, start_nginx,
                           start_python_http_server)

# SONDE_TEST_BACKENDS: every test of the `agent` fixture once per backend (vm-test --ci).
BACKENDS = backend_matrix()


def _agent_scope(fixture_name, config):
    # Under emulation (vm-test) loading the programs takes about a minute: one agent
    # serves every module there.
    return "session" if os.environ.get("SONDE_TEST_ONE_AGENT") == "1" else "module"


@pytest.fixture(scope=_agent_scope, params=BACKENDS or None,
                ids=[b for b, _ in BACKENDS] or None)
def agent(request, tmp_path_factory):
    """One `sonde run --output otlp-json` for the module's tests (their spans are told
    apart by the pids of each test's own processes), or for the whole session with
    SONDE_TEST_ONE_AGENT=1 (one per backend of SONDE_TEST_BACKENDS). Teardown: SIGINT,
    the agent must exit 0; the spans written by then are parsed."""
    require_root()
    backend, expect = getattr(request, "param", (None, None))
    a = Agent(tmp_path_factory.mktemp(f"agent-{backend}" if backend else "agent"),
              backend=backend, expect=expect)
    a.start()
    yield a
    code = a.stop()
    a.spans()  # parse what the final flush wrote
    assert code == 0, f"agent exited with {code} after SIGINT\n--- stderr ---\n{a.stderr_tail()}"


@pytest.fixture
def t0():
    return time.time_ns()


@pytest.fixture
def app(agent, tmp_path):
    s = start_app(tmp_path)
    yield s
    s.stop()


@pytest.fixture
def nginx(agent, tmp_path):
    s = start_nginx(tmp_path)
    yield s
    s.stop()


@pytest.fixture
def http_server(agent, tmp_path):
    d = tmp_path / "www"
    d.mkdir()
    (d / "hello.txt").write_bytes(HELLO)
    s = start_python_http_server(tmp_path, d)
    yield s
    s.stop()
