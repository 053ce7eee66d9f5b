"""Finding TLS code in a program that already carries uprobes.

The kernel writes the breakpoints of the uprobes on a file into every new mapping of
it that may be executable. An agent that looked for RET instructions in a mapping of a
Go binary another tracer (here: a first sonde) already probes saw breakpoints there
instead, found no RETs, and left the program's TLS traffic untraced. Two agents run at
once here, the second started after the first has probed a Go server: the second must
find the Go functions and trace an HTTPS exchange with the server."""
import time

from clientlib import GO_SERVICE, make_cert, require_go, run_json, start_port_server, wait_tls_attached
from sonde_testlib import CLIENT, SERVER, Agent


def test_a_second_agent_finds_go_tls_code_the_first_one_probes(tmp_path):
    go = require_go()
    cert = make_cert(tmp_path / "tls")
    first = Agent(tmp_path / "first").start()
    server = None
    second = None
    try:
        server = start_port_server([go, "tls-server", "-cert", cert.cert, "-key", cert.key],
                                   tmp_path, "go tls-server")
        wait_tls_attached(first, go)
        second = Agent(tmp_path / "second").start()
        # Found by the start-up scan, where the server already runs with the first
        # agent's breakpoints in it.
        wait_tls_attached(second, go)
        t0 = time.time_ns()
        client = run_json([go, "tls-client", "-ca", cert.cert, "-base",
                           f"https://127.0.0.1:{server.port}", "GET:/orders/7"],
                          what="go tls-client")
        got = second.wait_spans({server.pid, client.pid}, 2)
        kinds = sorted(s.kind for s in got)
        assert kinds == sorted([SERVER, CLIENT]), got
        for s in got:
            assert s.attrs.get("url.path") == "/orders/7", s
            assert s.attrs.get("tls.established") is True, s
            assert s.service == GO_SERVICE, s
            assert s.start >= t0, s
    finally:
        if server is not None:
            server.stop()
        for a in (second, first):
            if a is not None:
                assert a.stop() == 0, a.stderr_tail()
