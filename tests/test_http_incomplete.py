"""Integration: exchanges that never finish still become spans, marked incomplete.

A real server (tests/servers/app.py, GET /never) that never answers, and a real client
(curl) that gives up after a second and closes: both ends must still show up, as a client
span and a server span linked in one trace, marked `sonde.incomplete=true` with the
reason, without a status code, not errors, and ending at the last byte seen (the
request), not when the client gave up. Runs as root.
"""
import shutil
import subprocess
import time

from sonde_testlib import CLIENT, SERVER, by_kind, fmt_spans

GIVE_UP_S = 1.0


def test_a_request_never_answered_is_an_incomplete_span_on_both_ends(agent, app, t0):
    curl = shutil.which("curl") or "/usr/bin/curl"
    started = time.monotonic()
    p = subprocess.Popen([curl, "-sS", "--http1.1", "--max-time", str(GIVE_UP_S), "-o", "/dev/null",
                          app.url("/never")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, err = p.communicate(timeout=60)
    waited = time.monotonic() - started
    # curl's "operation timed out": the client gave up, the server never answered.
    assert p.returncode == 28, f"curl should have timed out (exit 28), got {p.returncode}: {err}"
    assert waited >= GIVE_UP_S

    srv = agent.wait_spans(app.pids, 1, what="server span of the unanswered request")
    cli = agent.wait_spans([p.pid], 1, what="client span of the unanswered request")
    seen = fmt_spans(srv + cli)
    assert len(srv) == 1 and len(cli) == 1, seen
    assert by_kind(srv, SERVER) == srv and by_kind(cli, CLIENT) == cli, seen
    s, c = srv[0], cli[0]
    for span, reasons in ((s, {"connection_closed"}), (c, {"connection_closed", "process_exit"})):
        assert span.name == "GET /never", seen
        assert span.attrs.get("sonde.incomplete") is True, f"not marked incomplete:\n{seen}"
        assert span.attrs.get("sonde.incomplete.reason") in reasons, seen
        assert "http.response.status_code" not in span.attrs, seen
        assert span.status_code == 0, f"an unanswered request is not an error in itself:\n{seen}"
        assert span.attrs.get("url.path") == "/never", seen
        assert t0 <= span.start <= span.end, seen
        # It ends at the last byte seen, the request, long before the client gave up.
        assert span.end - span.start < GIVE_UP_S * 1e9 / 2, seen
    assert c.attrs.get("url.full") == app.url("/never"), seen
    # Same node, same connection: the server span is still the client span's child.
    assert s.trace_id == c.trace_id and s.parent_span_id == c.span_id, seen
