//! The pipeline over synthetic events: connections that end with exchanges open, and
//! where the next message starts.

use std::sync::{Arc, Mutex, atomic::Ordering};

use agent_common::{AF_INET, DataEvent, Direction, EventHeader, EventKind, SockTuple, SyscallId};

use super::*;
use crate::spans::{INCOMPLETE, INCOMPLETE_REASON, SpanKind, Status, Value};

const PID: u32 = 7;

/// A pipeline whose spans land in the returned list (see [`released`]).
fn pipeline(opts: PipelineOptions) -> (Pipeline, Arc<Mutex<Vec<Span>>>, Arc<Metrics>) {
    let spans = Arc::new(Mutex::new(Vec::new()));
    let into = spans.clone();
    let metrics = Arc::new(Metrics::default());
    let mut p = Pipeline::new(
        PipelineOptions {
            exclude_own_sockets: false,
            ..opts
        },
        metrics.clone(),
        Box::new(move |s| into.lock().unwrap().push(s)),
    );
    p.set_mono_to_unix(0);
    (p, spans, metrics)
}

fn tuple(sport: u16) -> SockTuple {
    let mut t = SockTuple {
        family: AF_INET,
        sport,
        dport: 8080,
        ..SockTuple::default()
    };
    t.saddr[..4].copy_from_slice(&[192, 0, 2, 1]);
    t.daddr[..4].copy_from_slice(&[192, 0, 2, 2]);
    t
}

fn header(kind: EventKind, fd: u32, ts_ns: u64) -> EventHeader {
    EventHeader {
        kind: kind as u32,
        tgid: PID,
        tid: PID,
        fd,
        ts_ns,
    }
}

fn connect(p: &mut Pipeline, fd: u32, sport: u16, ts_ns: u64) {
    p.handle(Event::Connect {
        header: header(EventKind::Connect, fd, ts_ns),
        tuple: tuple(sport),
        ret: 0,
    });
}

/// A write (`Egress`) or read of `len` bytes at stream `offset`, of which `captured`
/// were copied.
#[allow(clippy::too_many_arguments)]
fn data(
    p: &mut Pipeline,
    fd: u32,
    sport: u16,
    dir: Direction,
    offset: u64,
    len: u64,
    captured: &[u8],
    ts_ns: u64,
) {
    let h = header(EventKind::Data, fd, ts_ns);
    data_event(
        p,
        h,
        tuple(sport),
        agent_common::role::CLIENT,
        (dir, offset, len),
        captured,
    );
}

/// A data event with this header, tuple and role: `len` bytes at stream `offset` moved
/// in direction `dir`, of which `captured` were copied.
fn data_event(
    p: &mut Pipeline,
    h: EventHeader,
    tuple: SockTuple,
    role: u32,
    (dir, offset, len): (Direction, u64, u64),
    captured: &[u8],
) {
    p.handle(Event::Data {
        header: h,
        data: DataEvent {
            header: h,
            tuple,
            offset,
            len,
            captured: captured.len() as u32,
            direction: dir as u32,
            syscall: match dir {
                Direction::Ingress => SyscallId::Read,
                Direction::Egress => SyscallId::Write,
            } as u32,
            role,
        },
        payload: captured,
    });
}

const GET: &[u8] = b"GET /orders/42 HTTP/1.1\r\nHost: crm\r\n\r\n";

fn str_attr<'a>(span: &'a Span, key: &str) -> Option<&'a str> {
    match span.attribute(key) {
        Some(Value::Str(s)) => Some(s),
        _ => None,
    }
}

/// Lets go of the spans held for their other end (which the peer addresses, if they
/// are this machine's, make them wait for), as if long after, so the tests do not
/// depend on the host's addresses.
fn released(p: &mut Pipeline, spans: &Mutex<Vec<Span>>) -> Vec<Span> {
    p.tick(1 << 62);
    std::mem::take(&mut *spans.lock().unwrap())
}

fn incomplete_reason(
    p: &mut Pipeline,
    spans: &Mutex<Vec<Span>>,
) -> Vec<(String, Option<String>, u64)> {
    released(p, spans)
        .iter()
        .map(|s| {
            assert_eq!(s.status, Status::Unset, "{}", s.name);
            let marked = s.attribute(INCOMPLETE) == Some(&Value::Bool(true));
            let reason = str_attr(s, INCOMPLETE_REASON).map(str::to_owned);
            assert_eq!(marked, reason.is_some(), "{}", s.name);
            (s.name.clone(), reason, s.end_unix_nanos)
        })
        .collect()
}

#[test]
fn a_request_without_response_is_an_incomplete_span_whatever_ends_its_connection() {
    type End = fn(&mut Pipeline);
    let cases: [(&str, End); 5] = [
        ("connection_closed", |p| {
            p.handle(Event::Close {
                header: header(EventKind::Close, 3, 5_000),
                tuple: tuple(40000),
            })
        }),
        ("process_exit", |p| {
            p.handle(Event::Exit {
                header: header(EventKind::Exit, 0, 5_000),
                exit_code: 0,
            })
        }),
        ("idle", |p| p.tick(1_000 + 3_000_000_000)),
        ("agent_stop", Pipeline::finish),
        ("capture_end", Pipeline::finish_capture),
    ];
    for (reason, end) in cases {
        let (mut p, spans, _) = pipeline(PipelineOptions {
            idle_timeout: Duration::from_secs(2),
            ..PipelineOptions::default()
        });
        connect(&mut p, 3, 40000, 500);
        data(
            &mut p,
            3,
            40000,
            Direction::Egress,
            0,
            GET.len() as u64,
            GET,
            1_000,
        );
        end(&mut p);
        assert_eq!(
            incomplete_reason(&mut p, &spans),
            [(
                "GET /orders/{id}".to_owned(),
                Some(reason.to_owned()),
                1_000
            )],
            "the span ends at the last byte seen"
        );
    }
}

#[test]
fn an_evicted_connection_leaves_an_incomplete_span() {
    let (mut p, spans, metrics) = pipeline(PipelineOptions {
        max_connections: 1,
        ..PipelineOptions::default()
    });
    connect(&mut p, 3, 40000, 500);
    data(
        &mut p,
        3,
        40000,
        Direction::Egress,
        0,
        GET.len() as u64,
        GET,
        1_000,
    );
    connect(&mut p, 4, 40001, 2_000);
    assert_eq!(
        incomplete_reason(&mut p, &spans),
        [(
            "GET /orders/{id}".to_owned(),
            Some("evicted".to_owned()),
            1_000
        )]
    );
    assert_eq!(metrics.connections_evicted.load(Ordering::Relaxed), 1);
}

#[test]
fn a_reused_descriptor_ends_the_old_exchange_and_starts_afresh() {
    let (mut p, spans, _) = pipeline(PipelineOptions::default());
    connect(&mut p, 3, 40000, 500);
    data(
        &mut p,
        3,
        40000,
        Direction::Egress,
        0,
        GET.len() as u64,
        GET,
        1_000,
    );
    // Same descriptor, other ports, no close seen: a new connection.
    data(
        &mut p,
        3,
        40001,
        Direction::Egress,
        0,
        GET.len() as u64,
        GET,
        2_000,
    );
    let resp = b"HTTP/1.1 204 No Content\r\n\r\n";
    data(
        &mut p,
        3,
        40001,
        Direction::Ingress,
        0,
        resp.len() as u64,
        resp,
        3_000,
    );
    assert_eq!(
        incomplete_reason(&mut p, &spans),
        [
            (
                "GET /orders/{id}".to_owned(),
                Some("connection_closed".to_owned()),
                1_000
            ),
            ("GET /orders/{id}".to_owned(), None, 3_000)
        ]
    );
}

#[test]
fn a_whole_exchange_is_not_marked_incomplete() {
    let (mut p, spans, _) = pipeline(PipelineOptions::default());
    connect(&mut p, 3, 40000, 500);
    data(
        &mut p,
        3,
        40000,
        Direction::Egress,
        0,
        GET.len() as u64,
        GET,
        1_000,
    );
    let resp = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
    data(
        &mut p,
        3,
        40000,
        Direction::Ingress,
        0,
        resp.len() as u64,
        resp,
        2_000,
    );
    p.finish();
    assert_eq!(
        incomplete_reason(&mut p, &spans),
        [("GET /orders/{id}".to_owned(), None, 2_000)]
    );
}

/// A POST whose body is `body` bytes long; its head.
fn post_head(body: u64) -> Vec<u8> {
    format!("POST /models HTTP/1.1\r\nHost: files\r\nContent-Length: {body}\r\n\r\n").into_bytes()
}

#[test]
fn the_hook_is_told_where_a_message_after_a_large_body_starts() {
    let (mut p, spans, metrics) = pipeline(PipelineOptions::default());
    let calls = Arc::new(Mutex::new(Vec::new()));
    let into = calls.clone();
    p.set_message_start_hook(Box::new(move |m| {
        assert!(!m.amqp_frames);
        into.lock()
            .unwrap()
            .push((m.pid, m.fd, m.direction, m.tls, m.offset));
    }));
    connect(&mut p, 3, 40000, 500);
    let head = post_head(100_000);
    let next = head.len() as u64 + 100_000;
    // The head and the first body bytes, in one write of which 16 KiB were copied.
    let mut first = head.clone();
    first.resize(16 * 1024, b'x');
    data(
        &mut p,
        3,
        40000,
        Direction::Egress,
        0,
        60_000,
        &first,
        1_000,
    );
    assert_eq!(
        *calls.lock().unwrap(),
        [(PID, 3, Direction::Egress, false, next)]
    );
    // More of the body: the same start, not told again.
    data(
        &mut p,
        3,
        40000,
        Direction::Egress,
        60_000,
        30_000,
        &[b'x'; 100],
        2_000,
    );
    assert_eq!(calls.lock().unwrap().len(), 1);
    // The kernel copied from the message start: the next request is whole.
    data(
        &mut p,
        3,
        40000,
        Direction::Egress,
        next,
        GET.len() as u64,
        GET,
        3_000,
    );
    let resp = b"HTTP/1.1 204 No Content\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n";
    data(
        &mut p,
        3,
        40000,
        Direction::Ingress,
        0,
        resp.len() as u64,
        resp,
        4_000,
    );
    let names: Vec<String> = released(&mut p, &spans)
        .iter()
        .map(|s| s.name.clone())
        .collect();
    assert_eq!(names, ["POST /models", "GET /orders/{id}"]);
    assert_eq!(metrics.message_starts_missed.load(Ordering::Relaxed), 0);
    assert_eq!(calls.lock().unwrap().len(), 1);
}

#[test]
fn a_message_that_starts_in_uncaptured_bytes_is_counted_as_missed() {
    let (mut p, _, metrics) = pipeline(PipelineOptions::default());
    connect(&mut p, 3, 40000, 500);
    let head = post_head(20_000);
    let next = head.len() as u64 + 20_000;
    let mut first = head.clone();
    first.resize(16 * 1024, b'x');
    // One write holds the whole body and the next request; only 16 KiB were copied.
    let len = next + GET.len() as u64;
    data(&mut p, 3, 40000, Direction::Egress, 0, len, &first, 1_000);
    assert_eq!(metrics.message_starts_missed.load(Ordering::Relaxed), 1);
    // A gap that ends exactly where the next message starts misses nothing.
    let (mut p, _, metrics) = pipeline(PipelineOptions::default());
    connect(&mut p, 3, 40000, 500);
    data(&mut p, 3, 40000, Direction::Egress, 0, next, &first, 1_000);
    data(
        &mut p,
        3,
        40000,
        Direction::Egress,
        next,
        GET.len() as u64,
        GET,
        2_000,
    );
    assert_eq!(metrics.message_starts_missed.load(Ordering::Relaxed), 0);
}

/// AMQP frames as a client and a broker write them.
mod amqp_frames {
    use amq_protocol::{
        frame::{AMQPContentHeader, AMQPFrame, WriteContext, gen_frame},
        protocol::{AMQPClass, basic},
    };

    fn frame(f: AMQPFrame) -> Vec<u8> {
        gen_frame(&f)(WriteContext::from(Vec::new()))
            .expect("frame serialises")
            .write
    }

    /// basic.deliver of `body` on channel 1 to consumer `tag`, with its content.
    pub fn delivery(tag: &str, delivery_tag: u64, body: &[u8]) -> Vec<u8> {
        let deliver = basic::Deliver {
            consumer_tag: tag.into(),
            delivery_tag,
            redelivered: false,
            exchange: "orders".into(),
            routing_key: "order.created".into(),
        };
        [
            frame(AMQPFrame::Method(
                1,
                AMQPClass::Basic(basic::AMQPMethod::Deliver(deliver)),
            )),
            frame(AMQPFrame::Header(
                1,
                AMQPContentHeader {
                    class_id: 60,
                    body_size: body.len() as u64,
                    properties: basic::AMQPProperties::default(),
                },
            )),
            frame(AMQPFrame::Body(1, body.to_vec())),
        ]
        .concat()
    }
}

#[test]
fn a_delivery_to_a_consumer_that_predates_the_agent_and_never_acks_is_a_consumer_span() {
    let (mut p, spans, _) = pipeline(PipelineOptions::default());
    // No connect seen: the connection (and its basic.consume) predates the agent.
    let first = amqp_frames::delivery("amq.ctag-old", 1, br#"{"order_id": 42}"#);
    data(
        &mut p,
        5,
        40100,
        Direction::Ingress,
        9_000,
        first.len() as u64,
        &first,
        1_000,
    );
    let more = amqp_frames::delivery("amq.ctag-old", 2, br#"{"order_id": 43}"#);
    let at = 9_000 + first.len() as u64;
    data(
        &mut p,
        5,
        40100,
        Direction::Ingress,
        at,
        more.len() as u64,
        &more,
        2_000,
    );
    // No ack comes: after the wait for one (5 s), and the wait for the publish that
    // carried the message (3 s), long before the idle timeout and without the
    // connection ending.
    p.tick(6_000_000_000);
    p.tick(10_000_000_000);
    // And the wait for the order id of the trace (1 s).
    p.tick(11_000_000_000);
    let got: Vec<(String, SpanKind, Option<String>)> = std::mem::take(&mut *spans.lock().unwrap())
        .iter()
        .map(|s| {
            let outcome = str_attr(s, crate::spans::amqp::OUTCOME).map(str::to_owned);
            (s.name.clone(), s.kind, outcome)
        })
        .collect();
    let unknown = Some("unknown".to_owned());
    assert_eq!(
        got,
        [
            (
                "deliver orders:order.created".to_owned(),
                SpanKind::Consumer,
                unknown.clone()
            ),
            (
                "deliver orders:order.created".to_owned(),
                SpanKind::Consumer,
                unknown
            ),
        ]
    );
}

#[test]
fn spans_that_leave_the_order_id_hold_early_for_its_byte_bound_are_counted() {
    // Room for no span: each one that comes pushes the one before it out early.
    let (mut p, spans, metrics) = pipeline(PipelineOptions {
        order_hold_max_bytes: 1,
        ..PipelineOptions::default()
    });
    connect(&mut p, 3, 40000, 1_000);
    let resp = b"HTTP/1.1 204 No Content\r\n\r\n";
    for i in 0..3u64 {
        let (request_at, response_at) = (i * GET.len() as u64, i * resp.len() as u64);
        let ts = 2_000 + i * 1_000;
        data(
            &mut p,
            3,
            40000,
            Direction::Egress,
            request_at,
            GET.len() as u64,
            GET,
            ts,
        );
        let len = resp.len() as u64;
        data(
            &mut p,
            3,
            40000,
            Direction::Ingress,
            response_at,
            len,
            resp,
            ts + 500,
        );
    }
    assert_eq!(released(&mut p, &spans).len(), 3);
    assert_eq!(metrics.order_holds_cut.load(Ordering::Relaxed), 2);
}

/// One read or write of a whole message by process `pid` on a loopback connection
/// between ports `local` and `remote`.
fn loopback(
    p: &mut Pipeline,
    pid: u32,
    ports: (u16, u16),
    server: bool,
    msg: (Direction, u64, &[u8]),
    ts_ns: u64,
) {
    let mut t = SockTuple {
        family: AF_INET,
        sport: ports.0,
        dport: ports.1,
        ..SockTuple::default()
    };
    t.saddr[..4].copy_from_slice(&[127, 0, 0, 1]);
    t.daddr[..4].copy_from_slice(&[127, 0, 0, 1]);
    let (dir, offset, bytes) = msg;
    let h = EventHeader {
        tgid: pid,
        tid: pid,
        ..header(EventKind::Data, 3, ts_ns)
    };
    let role = if server {
        agent_common::role::SERVER
    } else {
        agent_common::role::CLIENT
    };
    data_event(p, h, t, role, (dir, offset, bytes.len() as u64), bytes);
}

const OK: &[u8] = b"HTTP/1.1 204 No Content\r\n\r\n";
const SECOND: u64 = 1_000_000_000;

/// The server (pid [`PID`], port 8080) of the loopback connection from port 40000.
fn at_server(p: &mut Pipeline, msg: (Direction, u64, &[u8]), ts_ns: u64) {
    loopback(p, PID, (8080, 40000), true, msg, ts_ns);
}

/// The client (pid [`PID`] + 1) of that connection.
fn at_client(p: &mut Pipeline, msg: (Direction, u64, &[u8]), ts_ns: u64) {
    loopback(p, PID + 1, (40000, 8080), false, msg, ts_ns);
}

/// Stream offsets of the `i`th request and response of a keep-alive connection.
fn offsets(i: u64) -> (u64, u64) {
    (i * GET.len() as u64, i * OK.len() as u64)
}

#[test]
fn a_server_whose_local_client_is_not_traced_does_not_hold_its_spans_for_it() {
    // No hold for order ids, to see only the hold for the other end.
    let (mut p, spans, _) = pipeline(PipelineOptions {
        order_hold: Duration::ZERO,
        ..PipelineOptions::default()
    });
    // Exchanges at 0 s (the connection's first) and at 1 s, the client not traced.
    for (i, ts) in [(0u64, 1_000), (1, SECOND)] {
        let (req, resp) = offsets(i);
        at_server(&mut p, (Direction::Ingress, req, GET), ts);
        at_server(&mut p, (Direction::Egress, resp, OK), ts + 500);
    }
    p.tick(SECOND + 300_000_000);
    // The first waited out the connection's first 200 ms, the second nothing: neither
    // the 1.5 s hold for a client span that never comes.
    let got = std::mem::take(&mut *spans.lock().unwrap());
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(got.iter().all(|s| s.parent_span_id.is_none()));
}

#[test]
fn a_server_whose_local_client_is_traced_waits_for_its_span_whichever_comes_first() {
    let (mut p, spans, _) = pipeline(PipelineOptions::default());
    for (i, ts) in [(0u64, 1_000), (1, SECOND)] {
        let (req, resp) = offsets(i);
        // At 1 s the server's read comes before the client's write.
        let client_first = i == 0;
        if client_first {
            at_client(&mut p, (Direction::Egress, req, GET), ts);
        }
        at_server(&mut p, (Direction::Ingress, req, GET), ts + 100);
        if !client_first {
            at_client(&mut p, (Direction::Egress, req, GET), ts + 200);
        }
        at_server(&mut p, (Direction::Egress, resp, OK), ts + 500);
        at_client(&mut p, (Direction::Ingress, resp, OK), ts + 600);
    }
    let got = released(&mut p, &spans);
    assert_eq!(got.len(), 4, "{got:?}");
    let (servers, clients): (Vec<&Span>, Vec<&Span>) =
        got.iter().partition(|s| s.kind == SpanKind::Server);
    for server in servers {
        let parent = clients
            .iter()
            .find(|c| Some(c.span_id) == server.parent_span_id)
            .unwrap_or_else(|| panic!("server span without its client parent: {got:?}"));
        assert_eq!(parent.trace_id, server.trace_id);
    }
}
