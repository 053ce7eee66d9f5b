//! HTTP/2 parser tests: frames built with a real HPACK encoder (loona-hpack), every
//! split of the bytes, connections that predate the agent, losses and limits.

use agent_common::Direction::{self, Egress, Ingress};
use loona_hpack::Encoder;

use super::*;

pub(crate) fn frame(ty: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = len.to_be_bytes()[1..].to_vec();
    f.push(ty);
    f.push(flags);
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

pub(crate) fn headers(enc: &mut Encoder<'_>, fields: &[(&str, &str)]) -> Vec<u8> {
    enc.encode(fields.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())))
}

/// A client's bytes and a server's bytes for two multiplexed requests, a gRPC call
/// ending in NOT_FOUND (trailers) and a reset stream.
fn conversation() -> (Vec<u8>, Vec<u8>) {
    let mut ce = Encoder::new();
    let mut se = Encoder::new();
    let mut c = PREFACE.to_vec();
    c.extend(frame(SETTINGS, 0, 0, &[]));
    let mut s = frame(SETTINGS, 0, 0, &[0, 3, 0, 0, 0, 100]);
    c.extend(frame(SETTINGS, 1, 0, &[]));
    let h1 = headers(
        &mut ce,
        &[
            (":method", "GET"),
            (":scheme", "https"),
            (":path", "/orders/1"),
            (":authority", "mes.local:8443"),
            (
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            ),
        ],
    );
    c.extend(frame(HEADERS, END_STREAM | END_HEADERS, 1, &h1));
    let h3 = headers(
        &mut ce,
        &[
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/shop.Orders/Get"),
            (":authority", "mes.local:8443"),
            ("content-type", "application/grpc"),
        ],
    );
    // Its block in two pieces: HEADERS then CONTINUATION.
    c.extend(frame(HEADERS, 0, 3, &h3[..3]));
    c.extend(frame(CONTINUATION, END_HEADERS, 3, &h3[3..]));
    c.extend(frame(
        DATA,
        END_STREAM | PADDED,
        3,
        b"\x02\0\0\0\0\x03abcXX",
    ));
    let h5 = headers(&mut ce, &[(":method", "GET"), (":path", "/slow")]);
    c.extend(frame(HEADERS, END_STREAM | END_HEADERS, 5, &h5));
    c.extend(frame(WINDOW_UPDATE, 0, 0, &[0, 0, 1, 0]));
    c.extend(frame(RST_STREAM, 0, 5, &[0, 0, 0, 8]));

    let r3 = headers(
        &mut se,
        &[(":status", "200"), ("content-type", "application/grpc")],
    );
    s.extend(frame(HEADERS, END_HEADERS, 3, &r3));
    let r1 = headers(&mut se, &[(":status", "404"), ("content-length", "5")]);
    s.extend(frame(HEADERS, END_HEADERS, 1, &r1));
    s.extend(frame(DATA, 0, 1, b"nope!"));
    s.extend(frame(PING, 0, 0, &[0; 8]));
    s.extend(frame(DATA, END_STREAM, 1, b""));
    let t3 = headers(
        &mut se,
        &[("grpc-status", "5"), ("grpc-message", "no such order")],
    );
    s.extend(frame(HEADERS, END_STREAM | END_HEADERS, 3, &t3));
    (c, s)
}

fn run(p: &mut Http2Parser, client: Direction, c: &[u8], s: &[u8], split: usize) -> Vec<Parsed> {
    let (a, b) = c.split_at(split.min(c.len()));
    p.feed(client, a, 1);
    p.feed(client, b, 2);
    let (a, b) = s.split_at(split.min(s.len()));
    p.feed(client.opposite(), a, 3);
    p.feed(client.opposite(), b, 4);
    p.close(5, EndReason::ConnectionClosed);
    let mut out = Vec::new();
    p.take(&mut out);
    out
}

fn exchanges(out: &[Parsed]) -> Vec<&HttpExchange> {
    out.iter()
        .filter_map(|p| match p {
            Parsed::Http(e) => Some(e),
            _ => None,
        })
        .collect()
}

fn summary(out: &[Parsed]) -> Vec<String> {
    let mut v: Vec<String> = exchanges(out)
        .iter()
        .map(|e| {
            format!(
                "{:?} {} {} {} -> {:?} req={} resp={} grpc={:?} incomplete={:?}",
                e.role,
                e.seq,
                e.request.method,
                e.request.target,
                e.response.as_ref().map(|r| r.status),
                e.request_body_size,
                e.response_body_size,
                e.response.as_ref().and_then(|r| r.header("grpc-status")),
                e.incomplete,
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn multiplexed_streams_become_one_exchange_each() {
    let (c, s) = conversation();
    let mut p = Http2Parser::new();
    let out = run(&mut p, Egress, &c, &s, usize::MAX);
    assert_eq!(p.detect(), Some(true));
    assert_eq!(
        summary(&out),
        [
            "Client 1 GET /orders/1 -> Some(404) req=0 resp=5 grpc=None incomplete=None",
            "Client 3 POST /shop.Orders/Get -> Some(200) req=8 resp=0 grpc=Some(\"5\") incomplete=None",
            "Client 5 GET /slow -> None req=0 resp=0 grpc=None incomplete=Some(StreamReset)",
        ]
    );
    let started = out
        .iter()
        .filter(|p| matches!(p, Parsed::Started(Started::Http { .. })))
        .count();
    assert_eq!(started, 3);
    let ex = exchanges(&out);
    let one = ex.iter().find(|e| e.seq == 1).unwrap();
    assert_eq!(one.request.version, 2);
    assert_eq!(one.request.header(":authority"), Some("mes.local:8443"));
    assert!(one.request.header("traceparent").is_some());
    assert_eq!(one.response_body, b"nope!");
    let three = ex.iter().find(|e| e.seq == 3).unwrap();
    // The pad length and the padding are not body.
    assert_eq!(three.request_body, b"\0\0\0\0\x03abc");
    assert!(!three.request.header_table_unknown);
}

#[test]
fn the_server_side_gives_server_exchanges() {
    let (c, s) = conversation();
    let mut p = Http2Parser::new();
    let out = run(&mut p, Ingress, &c, &s, usize::MAX);
    let roles: Vec<_> = exchanges(&out).iter().map(|e| e.role).collect();
    assert_eq!(roles, [Role::Server; 3]);
}

#[test]
fn every_split_gives_the_same_exchanges() {
    let (c, s) = conversation();
    let whole = summary(&run(&mut Http2Parser::new(), Egress, &c, &s, usize::MAX));
    for split in 0..c.len().max(s.len()) {
        let got = summary(&run(&mut Http2Parser::new(), Egress, &c, &s, split));
        assert_eq!(got, whole, "split at {split}");
    }
}

#[test]
fn byte_by_byte_gives_the_same_exchanges() {
    let (c, s) = conversation();
    let whole = summary(&run(&mut Http2Parser::new(), Egress, &c, &s, usize::MAX));
    let mut p = Http2Parser::new();
    for b in c.chunks(1) {
        p.feed(Egress, b, 1);
    }
    for b in s.chunks(1) {
        p.feed(Ingress, b, 2);
    }
    p.close(3, EndReason::ConnectionClosed);
    let mut out = Vec::new();
    p.take(&mut out);
    assert_eq!(summary(&out), whole);
}

#[test]
fn other_protocols_are_refused() {
    for bytes in [
        &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        b"AMQP\x00\x00\x09\x01",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
        b"PRI * HTTP/1.1\r\n",
    ] {
        let mut p = Http2Parser::new();
        p.feed(Egress, bytes, 1);
        assert_eq!(p.detect(), Some(false), "{bytes:?}");
    }
}

#[test]
fn a_connection_that_predates_the_agent_decodes_what_it_can() {
    let mut p = Http2Parser::new();
    p.resync(Egress);
    p.resync(Ingress);
    // A write cut in the middle of a frame: not frames from its first byte.
    p.feed(
        Egress,
        &frame(DATA, 0, 1, b"tail of an earlier body")[4..],
        1,
    );
    assert_eq!(p.detect(), None);
    // :method GET (static), then index 62: an entry an unseen block inserted (the
    // path, say), then a literal that inserts x-tenant: acme, then index 62 again,
    // which is now that entry.
    let mut h = vec![0x82, 0xbe, 0x40, 8];
    h.extend_from_slice(b"x-tenant");
    h.push(4);
    h.extend_from_slice(b"acme");
    h.push(0xbe);
    p.feed(Egress, &frame(HEADERS, END_STREAM | END_HEADERS, 9, &h), 2);
    assert_eq!(p.detect(), Some(true));
    // :status 200, then an unknown entry.
    p.feed(
        Ingress,
        &frame(HEADERS, END_STREAM | END_HEADERS, 9, &[0x88, 0xbe]),
        3,
    );
    let mut out = Vec::new();
    p.take(&mut out);
    let ex = exchanges(&out);
    assert_eq!(ex.len(), 1);
    let e = ex[0];
    assert_eq!(e.role, Role::Client);
    assert_eq!(e.request.method, "GET");
    // Never guessed: the path was in the unknown part of the table.
    assert_eq!(e.request.target, "");
    assert!(e.request.header_table_unknown);
    let tenants: Vec<_> = e
        .request
        .headers
        .iter()
        .filter(|(n, _)| n == "x-tenant")
        .collect();
    assert_eq!(tenants.len(), 2);
    assert_eq!(e.response.as_ref().unwrap().status, 200);
}

#[test]
fn a_gap_outside_a_body_loses_the_direction_until_frames_start_a_piece() {
    let mut ce = Encoder::new();
    let mut p = Http2Parser::new();
    p.feed(Egress, PREFACE, 1);
    p.skip(Egress, 30, 2);
    assert!(!p.in_sync(Egress));
    let h = headers(&mut ce, &[(":method", "GET"), (":path", "/a")]);
    p.feed(Egress, &frame(HEADERS, END_STREAM | END_HEADERS, 1, &h), 3);
    assert!(p.in_sync(Egress));
    // A gap inside a DATA payload is body.
    let mut se = Encoder::new();
    let r = headers(&mut se, &[(":status", "200")]);
    p.feed(Ingress, &frame(HEADERS, END_HEADERS, 1, &r), 4);
    let data = frame(DATA, END_STREAM, 1, &[b'x'; 100]);
    p.feed(Ingress, &data[..20], 5);
    p.skip(Ingress, 89, 6);
    assert!(p.in_sync(Ingress));
    let mut out = Vec::new();
    p.take(&mut out);
    let ex = exchanges(&out);
    assert_eq!(ex.len(), 1);
    assert_eq!(ex[0].request.target, "/a");
    assert_eq!(ex[0].response_body_size, 100);
    assert_eq!(ex[0].response_body.len(), 11);
}

#[test]
fn gaps_of_any_size_lose_nothing_but_sync() {
    // The fuzzer's find: gaps whose sizes add past u64::MAX.
    let mut p = Http2Parser::new();
    p.feed(Egress, PREFACE, 1);
    p.skip(Egress, u64::MAX, 2);
    p.skip(Egress, u64::MAX, 3);
    assert!(!p.in_sync(Egress));
    let mut ce = Encoder::new();
    let h = headers(&mut ce, &[(":method", "GET"), (":path", "/a")]);
    p.feed(Egress, &frame(HEADERS, END_STREAM | END_HEADERS, 1, &h), 4);
    assert!(p.in_sync(Egress));
}

#[test]
fn streams_past_the_limit_are_counted_not_kept() {
    let mut ce = Encoder::new();
    let mut p = Http2Parser::new();
    p.feed(Egress, PREFACE, 1);
    let before = COUNTERS.streams_dropped.load(Ordering::Relaxed);
    for i in 0..(MAX_STREAMS as u32 + 5) {
        let h = headers(&mut ce, &[(":method", "GET"), (":path", "/x")]);
        p.feed(Egress, &frame(HEADERS, END_HEADERS, 2 * i + 1, &h), 2);
    }
    assert_eq!(p.streams.len(), MAX_STREAMS);
    assert!(COUNTERS.streams_dropped.load(Ordering::Relaxed) >= before + 5);
}

#[test]
fn a_header_block_past_the_limit_is_counted_and_the_table_forgotten() {
    let mut p = Http2Parser::new();
    p.feed(Egress, PREFACE, 1);
    let before = COUNTERS.blocks_too_large.load(Ordering::Relaxed);
    let big = vec![0x82; MAX_HEADER_BLOCK / 2 + 1];
    p.feed(Egress, &frame(HEADERS, 0, 1, &big), 2);
    p.feed(Egress, &frame(CONTINUATION, END_HEADERS, 1, &big), 3);
    assert!(COUNTERS.blocks_too_large.load(Ordering::Relaxed) > before);
    assert!(p.streams.is_empty());
    assert!(p.halves[0].hpack.is_partial() || p.halves[1].hpack.is_partial());
}

#[test]
fn a_preface_after_a_resync_is_the_connection_start_after_all() {
    // A connection whose connect the agent did not see complete: the pipeline resyncs
    // both directions, then the preface comes.
    let (c, s) = conversation();
    let whole = summary(&run(&mut Http2Parser::new(), Egress, &c, &s, usize::MAX));
    let mut p = Http2Parser::new();
    p.resync(Egress);
    p.resync(Ingress);
    let got = summary(&run(&mut p, Egress, &c, &s, usize::MAX));
    assert_eq!(got, whole);
    assert!(!p.halves[0].hpack.is_partial() && !p.halves[1].hpack.is_partial());
}
