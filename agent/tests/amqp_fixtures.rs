//! Real RabbitMQ captures (agent/tests/fixtures/amqp/<case>.pcap, taken with tcpdump on
//! loopback while capture.py drove pika against a local broker) replayed through the
//! AMQP parser, the span builder and the message linker; the operations and spans
//! must match <case>.expected. A loopback capture holds both ends of each connection,
//! so each is parsed twice: as the client (pika) saw it and as the broker did, which
//! gives the broker's spans too. Set UPDATE_EXPECT=1 to rewrite the expected files
//! after a deliberate change, and review the diff.
//!
//! `sonde replay` over the same captures (each end of a connection a process of its
//! own, the broker end named after its listening address) must give the broker's view
//! as well: see `replay_shows_the_broker_view`.
//!
//! As for HTTP, the parser must not depend on how the bytes arrive: every prefix of
//! each connection, from either end, gives a prefix of the operations of the whole
//! (never more, never others), and any split of the reads gives the same operations.
//!
//! The pcap reader here is test-only: loopback Ethernet, IPv4 or IPv6, TCP, no
//! reordering; retransmitted bytes are dropped by sequence number.

use std::{
    collections::HashMap, fs::File, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration,
};

use agent_common::Direction;
use pcap_file::pcap::PcapReader;
use proptest::prelude::*;
use sonde::{
    conn::ConnInfo,
    context::{MessageKey, MessageLinker},
    protocols::amqp::{AmqpOperation, AmqpParser},
    replay::replay_file,
    spans::{
        Resource, Span, SpanId, SpanKind, Status, Value,
        amqp::{DELIVERIES, QUEUES, amqp_span},
        hex,
    },
    telemetry::Metrics,
};

/// One TCP connection's payload, per syscall-like segment, from the client's view.
struct Connection {
    client: SocketAddr,
    server: SocketAddr,
    /// (direction seen by the client, bytes, ns since the capture's first packet)
    segments: Vec<(Direction, Vec<u8>, u64)>,
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/amqp")
        .join(name)
}

/// The TCP connections of a capture, in the order they were opened.
fn connections(case: &str) -> Vec<Connection> {
    let file = File::open(fixture(&format!("{case}.pcap"))).expect("fixture exists");
    let mut reader = PcapReader::new(file).expect("a classic pcap file");
    let mut conns: Vec<Connection> = Vec::new();
    let mut by_pair: HashMap<(SocketAddr, SocketAddr), (usize, Direction)> = HashMap::new();
    let mut next_seq: HashMap<(SocketAddr, SocketAddr), u32> = HashMap::new();
    let mut first_ts = None;
    while let Some(packet) = reader.next_packet() {
        let packet = packet.expect("readable packet");
        let ts = packet.timestamp.as_nanos() as u64;
        let t0 = *first_ts.get_or_insert(ts);
        let Some((src, dst, seq, flags, payload)) = tcp(&packet.data) else {
            continue;
        };
        let (syn, ack) = (flags & 0x02 != 0, flags & 0x10 != 0);
        if syn {
            next_seq.insert((src, dst), seq.wrapping_add(1));
            if !ack {
                by_pair.insert((src, dst), (conns.len(), Direction::Egress));
                by_pair.insert((dst, src), (conns.len(), Direction::Ingress));
                conns.push(Connection {
                    client: src,
                    server: dst,
                    segments: Vec::new(),
                });
            }
            continue;
        }
        let (Some(&(i, dir)), Some(expected)) =
            (by_pair.get(&(src, dst)), next_seq.get_mut(&(src, dst)))
        else {
            continue;
        };
        // Drop what was already seen (retransmissions).
        let behind = expected.wrapping_sub(seq) as usize;
        if behind >= payload.len() && behind < 1 << 30 {
            continue;
        }
        let fresh = if behind < 1 << 30 {
            &payload[behind..]
        } else {
            payload
        };
        *expected = seq.wrapping_add(payload.len() as u32);
        if !fresh.is_empty() {
            conns[i].segments.push((dir, fresh.to_vec(), ts - t0));
        }
    }
    conns
}

/// Source, destination, sequence number, flags and payload of an Ethernet TCP frame.
fn tcp(frame: &[u8]) -> Option<(SocketAddr, SocketAddr, u32, u8, &[u8])> {
    let ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    let ip = frame.get(14..)?;
    let (src, dst, segment) = match ethertype {
        0x0800 => {
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
            if ip[9] != 6 {
                return None;
            }
            let src: [u8; 4] = ip[12..16].try_into().ok()?;
            let dst: [u8; 4] = ip[16..20].try_into().ok()?;
            (
                std::net::IpAddr::from(src),
                std::net::IpAddr::from(dst),
                ip.get(ihl..total)?,
            )
        }
        0x86dd => {
            let len = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
            if ip[6] != 6 {
                return None;
            }
            let src: [u8; 16] = ip[8..24].try_into().ok()?;
            let dst: [u8; 16] = ip[24..40].try_into().ok()?;
            (
                std::net::IpAddr::from(src),
                std::net::IpAddr::from(dst),
                ip.get(40..40 + len)?,
            )
        }
        _ => return None,
    };
    let sport = u16::from_be_bytes([segment[0], segment[1]]);
    let dport = u16::from_be_bytes([segment[2], segment[3]]);
    let seq = u32::from_be_bytes(segment[4..8].try_into().ok()?);
    let offset = usize::from(segment[12] >> 4) * 4;
    Some((
        SocketAddr::new(src, sport),
        SocketAddr::new(dst, dport),
        seq,
        segment[13],
        segment.get(offset..)?,
    ))
}

/// Parses one connection; `cap` octets of each segment are captured, the rest skipped.
fn operations(conn: &Connection, cap: usize) -> Vec<AmqpOperation> {
    parse(conn, cap, false)
}

/// Parses one connection as the client (`broker` false) or the broker saw it.
fn parse(conn: &Connection, cap: usize, broker: bool) -> Vec<AmqpOperation> {
    let mut p = AmqpParser::new();
    let last = feed(&mut p, &conn.segments, cap, broker);
    p.close(last);
    assert_ne!(p.is_amqp(), Some(false));
    p.take_operations()
}

/// Feeds the first `cut` octets of `segments` to `p` (the last segment cut short), from
/// the client's or the broker's end; returns the time of the last.
fn feed_prefix(
    p: &mut AmqpParser,
    segments: &[(Direction, Vec<u8>, u64)],
    mut cut: usize,
    broker: bool,
) -> u64 {
    let mut last = 0;
    for (dir, data, ts) in segments {
        if cut == 0 {
            break;
        }
        let dir = if broker { dir.opposite() } else { *dir };
        let n = cut.min(data.len());
        p.feed(dir, &data[..n], *ts);
        cut -= n;
        last = *ts;
    }
    last
}

/// Feeds `segments` to `p` from the client's or the broker's end, `cap` octets of each
/// captured and the rest skipped; returns the time of the last.
fn feed(
    p: &mut AmqpParser,
    segments: &[(Direction, Vec<u8>, u64)],
    cap: usize,
    broker: bool,
) -> u64 {
    let mut last = 0;
    for (dir, data, ts) in segments {
        let dir = if broker { dir.opposite() } else { *dir };
        let n = cap.min(data.len());
        p.feed(dir, &data[..n], *ts);
        p.skip(dir, (data.len() - n) as u64, *ts);
        last = *ts;
    }
    last
}

const CASES: [&str; 7] = [
    "confirms_acks",
    "nack_requeue",
    "large_body",
    "fanout",
    "get_return_error",
    "node_to_go",
    "go_to_node",
];

fn resource(name: String) -> Arc<Resource> {
    Arc::new(Resource {
        service_name: name,
        pid: 1,
        executable_name: "python3".into(),
        host_name: "test".into(),
        attributes: vec![],
        generic_name: false,
    })
}

/// What the linker is offered, at the time the pipeline would offer it.
enum Offer {
    Span(String, Span, MessageKey),
    /// A delivery the broker sent, and when.
    Dispatch(MessageKey, u64),
}

/// The golden text of a capture: each connection's operations as the client and as the
/// broker saw them, then every span after linking, with parents written as the label
/// of the span they point to (`cN.M` client spans, `bN.M` the broker's).
fn replay(case: &str) -> String {
    let conns = connections(case);
    let mut text = String::new();
    let mut offers: Vec<(u64, Offer)> = Vec::new();
    // Span numbers, client and broker spans counted apart.
    let mut numbers = [0usize; 2];
    for (i, conn) in conns.iter().enumerate() {
        for broker in [false, true] {
            let (side, info) = if broker {
                let info = ConnInfo {
                    local: conn.server,
                    remote: conn.client,
                };
                (format!("b{i}"), info)
            } else {
                let info = ConnInfo {
                    local: conn.client,
                    remote: conn.server,
                };
                (format!("c{i}"), info)
            };
            let view = if broker { " (broker)" } else { "" };
            text.push_str(&format!("connection c{i}{view}\n"));
            let service = if broker {
                "broker".to_owned()
            } else {
                side.clone()
            };
            for op in parse(conn, usize::MAX, broker) {
                text.push_str(&format!("  {op}\n"));
                if let AmqpOperation::Dispatch(d) = &op {
                    let key = MessageKey::of(&op).expect("a dispatch has a key");
                    offers.push((d.end_ns, Offer::Dispatch(key, d.end_ns)));
                } else if let (Some(span), Some(key)) = (
                    amqp_span(&op, &info, resource(service.clone()), 0),
                    MessageKey::of(&op),
                ) {
                    let n = &mut numbers[usize::from(broker)];
                    let label = format!("{side}.{n}");
                    *n += 1;
                    offers.push((span.end_unix_nanos, Offer::Span(label, span, key)));
                } else if let Some(span) = amqp_span(&op, &info, resource(service.clone()), 0) {
                    text.push_str(&format!("  error span: {} {:?}\n", span.name, span.status));
                }
            }
        }
    }
    // Offer as the pipeline would: in the order the operations complete.
    offers.sort_by_key(|(t, _)| *t);
    let labels: HashMap<SpanId, String> = offers
        .iter()
        .filter_map(|(_, o)| match o {
            Offer::Span(l, s, _) => Some((s.span_id, l.clone())),
            Offer::Dispatch(..) => None,
        })
        .collect();
    let mut linker = MessageLinker::new(Duration::from_secs(5), Duration::from_secs(300), 1000);
    let mut out = Vec::new();
    for (now, offer) in offers {
        match offer {
            Offer::Span(_, span, key) => out.extend(linker.offer(span, key, now)),
            Offer::Dispatch(key, at) => linker.offer_dispatch(key, at, now),
        }
    }
    out.extend(linker.drain());
    out.sort_by(|a, b| labels[&a.span_id].cmp(&labels[&b.span_id]));
    text.push_str("spans\n");
    for s in &out {
        let parent = match s.parent_span_id {
            None => "-".to_owned(),
            Some(p) => labels
                .get(&p)
                .cloned()
                .unwrap_or_else(|| format!("{}/{}", hex(&s.trace_id), hex(&p))),
        };
        let status = match &s.status {
            Status::Error(e) => format!(" error={e:?}"),
            _ => String::new(),
        };
        let mut attrs: Vec<String> = s
            .attributes
            .iter()
            .map(|kv| format!("{}={}", kv.key, kv.value))
            .collect();
        attrs.sort();
        text.push_str(&format!(
            "  {} {:?} {:?} parent={parent}{status}\n    {}\n",
            labels[&s.span_id],
            s.kind,
            s.name,
            attrs.join(" ")
        ));
    }
    text
}

fn check(case: &str) {
    let got = replay(case);
    let path = fixture(&format!("{case}.expected"));
    if std::env::var_os("UPDATE_EXPECT").is_some() {
        std::fs::write(&path, &got).expect("write expected");
        return;
    }
    let want = std::fs::read_to_string(&path).expect("expected file exists");
    assert_eq!(got, want, "{case}: replay differs from {}", path.display());
}

#[test]
fn confirms_acks() {
    check("confirms_acks");
}

#[test]
fn nack_requeue() {
    check("nack_requeue");
}

#[test]
fn large_body() {
    check("large_body");
}

#[test]
fn fanout() {
    check("fanout");
}

#[test]
fn get_return_error() {
    check("get_return_error");
}

/// Node.js (amqplib) publishing with confirms to a topic exchange, Go (amqp091-go)
/// consuming with manual acks.
#[test]
fn node_to_go() {
    check("node_to_go");
}

/// Go (amqp091-go) publishing with confirms to a fanout exchange, Node.js (amqplib)
/// consuming two queues with automatic acks.
#[test]
fn go_to_node() {
    check("go_to_node");
}

/// With only the first 4 KiB of every segment captured, as the kernel side does, the
/// same messages come out, with shorter body prefixes.
#[test]
fn capture_cap_keeps_the_same_messages() {
    for case in [
        "confirms_acks",
        "nack_requeue",
        "large_body",
        "fanout",
        "get_return_error",
    ] {
        for conn in connections(case) {
            let full = operations(&conn, usize::MAX);
            let capped = operations(&conn, 4096);
            let strip = |ops: &[AmqpOperation]| -> Vec<String> {
                ops.iter()
                    .map(|op| match op {
                        AmqpOperation::Publish(p) => {
                            format!(
                                "publish {} {} {} {:?}",
                                p.message.exchange,
                                p.message.routing_key,
                                p.message.body_size,
                                p.confirmed
                            )
                        }
                        AmqpOperation::Delivery(d) => {
                            format!(
                                "delivery {} {} {} {:?}",
                                d.message.routing_key,
                                d.delivery_tag,
                                d.message.body_size,
                                d.outcome
                            )
                        }
                        other => other.to_string(),
                    })
                    .collect()
            };
            assert_eq!(strip(&capped), strip(&full), "{case}");
        }
    }
}

/// Every prefix of every connection of capture `case`, as the client and as the broker
/// saw it, yields a prefix of the operations of the whole connection: what the parser
/// emits it never takes back, and it emits nothing the whole stream does not. Closing
/// after the prefix must not panic either (it may finish what is open). One test per
/// capture (and per end for the large one: each prefix is parsed from the start, so it
/// costs most), so that they run in parallel.
fn every_prefix_yields_a_prefix_of_the_operations(case: &str, ends: &[bool]) {
    for (i, conn) in connections(case).iter().enumerate() {
        let total: usize = conn.segments.iter().map(|(_, d, _)| d.len()).sum();
        assert!(total > 0, "{case} c{i}: no payload");
        for &broker in ends {
            let full = parse(conn, usize::MAX, broker);
            assert!(!full.is_empty(), "{case} c{i}: no operations at all");
            let show = |ops: &[AmqpOperation]| {
                ops.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("\n")
            };
            for cut in 0..=total {
                let mut p = AmqpParser::new();
                let last = feed_prefix(&mut p, &conn.segments, cut, broker);
                let got = p.take_operations();
                assert!(
                    got.len() <= full.len() && got[..] == full[..got.len()],
                    "{case} c{i} (broker {broker}): a prefix of {cut} of {total} octets gave\n{}\nbut the whole gave\n{}",
                    show(&got),
                    show(&full),
                );
                assert_ne!(p.is_amqp(), Some(false), "{case} c{i}: prefix of {cut}");
                p.close(last);
                p.take_operations();
            }
        }
    }
}

#[test]
fn every_prefix_confirms_acks() {
    every_prefix_yields_a_prefix_of_the_operations("confirms_acks", &[false, true]);
}

#[test]
fn every_prefix_nack_requeue() {
    every_prefix_yields_a_prefix_of_the_operations("nack_requeue", &[false, true]);
}

#[test]
fn every_prefix_large_body_client() {
    every_prefix_yields_a_prefix_of_the_operations("large_body", &[false]);
}

#[test]
fn every_prefix_large_body_broker() {
    every_prefix_yields_a_prefix_of_the_operations("large_body", &[true]);
}

#[test]
fn every_prefix_fanout() {
    every_prefix_yields_a_prefix_of_the_operations("fanout", &[false, true]);
}

#[test]
fn every_prefix_get_return_error() {
    every_prefix_yields_a_prefix_of_the_operations("get_return_error", &[false, true]);
}

#[test]
fn every_prefix_node_to_go() {
    every_prefix_yields_a_prefix_of_the_operations("node_to_go", &[false, true]);
}

#[test]
fn every_prefix_go_to_node() {
    every_prefix_yields_a_prefix_of_the_operations("go_to_node", &[false, true]);
}

/// `segments` with each one cut into several reads, at positions taken from `cuts`.
fn split(segments: &[(Direction, Vec<u8>, u64)], cuts: &[u16]) -> Vec<(Direction, Vec<u8>, u64)> {
    let mut cuts = cuts.iter().copied().cycle();
    let mut out = Vec::new();
    for (dir, data, ts) in segments {
        let mut rest = &data[..];
        while !rest.is_empty() {
            let n = match cuts.next() {
                Some(c) => 1 + usize::from(c) % rest.len(),
                None => rest.len(),
            };
            out.push((*dir, rest[..n].to_vec(), *ts));
            rest = &rest[n..];
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Any split of the reads of every capture, from either end, gives the same
    /// operations as the reads as captured.
    #[test]
    fn any_split_of_the_reads_gives_the_same_operations(cuts in prop::collection::vec(any::<u16>(), 0..64)) {
        for case in CASES {
            for (i, conn) in connections(case).iter().enumerate() {
                for broker in [false, true] {
                    let expected = parse(conn, usize::MAX, broker);
                    let split = Connection {
                        client: conn.client,
                        server: conn.server,
                        segments: split(&conn.segments, &cuts),
                    };
                    let got = parse(&split, usize::MAX, broker);
                    prop_assert_eq!(&got, &expected, "{} c{} (broker {})", case, i, broker);
                }
            }
        }
    }
}

/// Every split of each direction's bytes into two reads gives the same operations.
#[test]
fn any_read_boundary_gives_the_same_operations() {
    for conn in connections("confirms_acks") {
        let expected: Vec<String> = operations(&conn, usize::MAX)
            .iter()
            .map(ToString::to_string)
            .collect();
        for (i, (_, data, _)) in conn.segments.iter().enumerate() {
            for cut in 1..data.len() {
                let mut split = Connection {
                    client: conn.client,
                    server: conn.server,
                    segments: Vec::new(),
                };
                for (j, (dir, d, ts)) in conn.segments.iter().enumerate() {
                    if i == j {
                        split.segments.push((*dir, d[..cut].to_vec(), *ts));
                        split.segments.push((*dir, d[cut..].to_vec(), *ts));
                    } else {
                        split.segments.push((*dir, d.clone(), *ts));
                    }
                }
                let got: Vec<String> = operations(&split, usize::MAX)
                    .iter()
                    .map(ToString::to_string)
                    .collect();
                assert_eq!(got, expected, "segment {i} cut {cut}");
            }
        }
    }
}

/// `sonde replay` runs the whole pipeline over a capture, with the broker end of each
/// connection as a process of its own: the broker's spans come out beside the clients'.
/// Each publish has exactly one broker span on the broker's service, the child of the
/// producer span of the same message; the consumer spans stay children of the producer
/// span. The fan-out's broker spans list both queues.
#[test]
fn replay_shows_the_broker_view() {
    let str_attr = |s: &Span, key: &str| match s.attribute(key) {
        Some(Value::Str(v)) => Some(v.clone()),
        _ => None,
    };
    for case in CASES {
        let spans = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let into = spans.clone();
        let outcome = replay_file(
            &fixture(&format!("{case}.pcap")),
            Arc::new(Metrics::default()),
            Box::new(move |span| into.lock().unwrap().push(span)),
        );
        assert!(outcome.error.is_none(), "{case}: {:?}", outcome.error);
        let spans: Vec<Span> = std::mem::take(&mut *spans.lock().unwrap());
        let of =
            |kind: SpanKind| -> Vec<&Span> { spans.iter().filter(|s| s.kind == kind).collect() };
        let (producers, brokers, consumers) = (
            of(SpanKind::Producer),
            of(SpanKind::Server),
            of(SpanKind::Consumer),
        );
        let id = |s: &Span| str_attr(s, "messaging.message.id");
        assert_eq!(
            brokers.len(),
            producers.len(),
            "{case}: one broker span per publish"
        );
        for b in &brokers {
            assert_eq!(b.resource.service_name, "127.0.0.1:5673", "{case}: {b:?}");
            assert!(b.name.starts_with("route "), "{case}: {}", b.name);
            let parent = producers
                .iter()
                .find(|p| Some(p.span_id) == b.parent_span_id)
                .unwrap_or_else(|| panic!("{case}: broker span without its producer: {b:?}"));
            assert_eq!((b.trace_id, id(b)), (parent.trace_id, id(parent)), "{case}");
            assert!(b.end_unix_nanos >= b.start_unix_nanos);
            // As many deliveries as the consumer spans of the message.
            let delivered = consumers.iter().filter(|c| id(c) == id(b)).count();
            let Some(Value::Int(n)) = b.attribute(DELIVERIES) else {
                panic!("{case}: {b:?}")
            };
            assert_eq!(*n as usize, delivered, "{case}: deliveries of {:?}", id(b));
        }
        for c in &consumers {
            let parent = producers
                .iter()
                .find(|p| Some(p.span_id) == c.parent_span_id)
                .unwrap_or_else(|| panic!("{case}: consumer not under a producer: {c:?}"));
            assert_eq!(id(c), id(parent), "{case}");
        }
        if case == "fanout" {
            assert_eq!(brokers.len(), 2);
            for b in &brokers {
                let Some(Value::StrArray(queues)) = b.attribute(QUEUES) else {
                    panic!("{b:?}")
                };
                let mut queues = queues.clone();
                queues.sort();
                assert_eq!(queues, ["audit", "crm"]);
                assert_eq!(b.name, "route events:order.status");
                assert_eq!(
                    str_attr(b, "messaging.rabbitmq.exchange").as_deref(),
                    Some("events")
                );
                // It ends at the last delivery the broker sent: before the last
                // consumer span of the message ends, after the publish started.
                let last = consumers
                    .iter()
                    .filter(|c| id(c) == id(b))
                    .map(|c| c.end_unix_nanos)
                    .max()
                    .unwrap();
                assert!(b.end_unix_nanos <= last, "{b:?}");
            }
        }
    }
}
