//! `sonde replay`: real captures in tests/fixtures/replay (see the README there) must give
//! the spans in `<case>.expected`; synthetic captures written here exercise what real
//! loopback captures rarely show (reordering, retransmission, lost segments, captures
//! that start mid-connection or end mid-packet, garbage); and the built binary is run
//! end to end. Set UPDATE_EXPECT=1 to rewrite the expected files after a deliberate
//! change, and review the diff.

use std::{
    borrow::Cow,
    collections::HashMap,
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    sync::{Arc, Mutex},
    time::Duration,
};

use opentelemetry_semantic_conventions::attribute as semconv;
use pcap_file::{
    DataLink, TsResolution,
    pcap::{PcapHeader, PcapPacket, PcapWriter},
    pcapng::{
        PcapNgWriter,
        blocks::{
            enhanced_packet::EnhancedPacketBlock, interface_description::InterfaceDescriptionBlock,
        },
    },
};
use sonde::{
    replay::{Outcome, ReplayError, replay_file},
    spans::{Span, SpanKind, Status, Value},
    telemetry::Metrics,
};

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/replay")
}

/// Replays `path` in this process; the spans in the order the pipeline gave them.
fn replay(path: &Path) -> (Vec<Span>, Outcome) {
    let spans = Arc::new(Mutex::new(Vec::new()));
    let into = spans.clone();
    let outcome = replay_file(
        path,
        Arc::new(Metrics::default()),
        Box::new(move |span| into.lock().unwrap().push(span)),
    );
    let spans = std::mem::take(&mut *spans.lock().unwrap());
    (spans, outcome)
}

fn int(span: &Span, key: &str) -> String {
    match span.attribute(key) {
        Some(Value::Int(i)) => i.to_string(),
        Some(other) => other.to_string(),
        None => "-".to_owned(),
    }
}

fn string(span: &Span, key: &str) -> String {
    match span.attribute(key) {
        Some(Value::Str(s)) => s.clone(),
        Some(other) => other.to_string(),
        None => "-".to_owned(),
    }
}

/// One line per span, in order of start (client before server at equal times): kind,
/// name, status, server address and port, the service, the parent as the number of its
/// line, and the body sizes.
fn render(spans: &[Span]) -> String {
    let mut sorted: Vec<&Span> = spans.iter().collect();
    let kind_order = |k: SpanKind| match k {
        SpanKind::Client => 0,
        _ => 1,
    };
    sorted.sort_by_key(|s| (s.start_unix_nanos, kind_order(s.kind), s.name.clone()));
    let line_of: HashMap<[u8; 8], usize> = sorted
        .iter()
        .enumerate()
        .map(|(i, s)| (s.span_id, i + 1))
        .collect();
    let mut out = String::new();
    for (i, s) in sorted.iter().enumerate() {
        let status = match &s.status {
            Status::Error(_) => " ERROR",
            _ => "",
        };
        let parent = match s.parent_span_id {
            Some(p) => line_of
                .get(&p)
                .map_or("elsewhere".to_owned(), |n| format!("#{n}")),
            None => "-".to_owned(),
        };
        let _ = writeln!(
            out,
            "#{} {:?} {:?} {}{} server.address={} server.port={} service={} parent={} body={}/{}",
            i + 1,
            s.kind,
            s.name,
            int(s, semconv::HTTP_RESPONSE_STATUS_CODE),
            status,
            string(s, semconv::SERVER_ADDRESS),
            int(s, semconv::SERVER_PORT),
            s.resource.service_name,
            parent,
            int(s, semconv::HTTP_REQUEST_BODY_SIZE),
            int(s, semconv::HTTP_RESPONSE_BODY_SIZE),
        );
    }
    out
}

fn check_expected(name: &str, got: &str) {
    let path = fixture_dir().join(format!("{name}.expected"));
    if std::env::var_os("UPDATE_EXPECT").is_some() {
        std::fs::write(&path, got).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(
        got,
        want,
        "{name}: replayed spans differ from {}",
        path.display()
    );
}

#[test]
fn real_captures_give_the_expected_spans() {
    let mut cases: Vec<PathBuf> = std::fs::read_dir(fixture_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "pcap" || e == "pcapng"))
        .collect();
    cases.sort();
    let formats: Vec<_> = cases.iter().filter_map(|p| p.extension()).collect();
    assert!(
        formats.contains(&"pcap".as_ref()) && formats.contains(&"pcapng".as_ref()),
        "{cases:?}"
    );
    for case in &cases {
        let (spans, outcome) = replay(case);
        assert!(
            outcome.error.is_none(),
            "{}: {:?}",
            case.display(),
            outcome.error
        );
        assert_eq!(outcome.summary.spans, spans.len() as u64);
        assert!(!spans.is_empty(), "{}", case.display());
        check_expected(
            &case.file_stem().unwrap().to_string_lossy(),
            &render(&spans),
        );
    }
}

// ---- synthetic captures ----

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
const FIN: u8 = 0x01;
const RST: u8 = 0x04;
const PSH_ACK: u8 = 0x18;

/// One TCP segment of a synthetic conversation.
#[derive(Clone, Debug)]
struct Seg {
    from_client: bool,
    seq: u32,
    ack: u32,
    flags: u8,
    payload: Vec<u8>,
}

/// A TCP conversation written segment by segment, with sequence numbers kept.
struct Conv {
    client: SocketAddr,
    server: SocketAddr,
    client_seq: u32,
    server_seq: u32,
    segs: Vec<Seg>,
}

impl Conv {
    fn new(client: &str, server: &str, client_isn: u32, server_isn: u32) -> Self {
        Conv {
            client: client.parse().unwrap(),
            server: server.parse().unwrap(),
            client_seq: client_isn,
            server_seq: server_isn,
            segs: Vec::new(),
        }
    }

    fn push(&mut self, from_client: bool, flags: u8, payload: &[u8]) {
        let (seq, ack) = if from_client {
            (self.client_seq, self.server_seq)
        } else {
            (self.server_seq, self.client_seq)
        };
        self.segs.push(Seg {
            from_client,
            seq,
            ack,
            flags,
            payload: payload.to_vec(),
        });
        let used = payload.len() as u32 + u32::from(flags & (SYN | FIN) != 0);
        if from_client {
            self.client_seq = self.client_seq.wrapping_add(used);
        } else {
            self.server_seq = self.server_seq.wrapping_add(used);
        }
    }

    fn handshake(mut self) -> Self {
        self.push(true, SYN, b"");
        let isn = self.server_seq;
        self.segs.push(Seg {
            from_client: false,
            seq: isn,
            ack: self.client_seq,
            flags: SYN | ACK,
            payload: vec![],
        });
        self.server_seq = isn.wrapping_add(1);
        self.push(true, ACK, b"");
        self
    }

    /// `data` from one end in segments of at most `mss` bytes, then the other end's ACK.
    fn send(&mut self, from_client: bool, data: &[u8], mss: usize) {
        for chunk in data.chunks(mss) {
            self.push(from_client, PSH_ACK, chunk);
        }
        self.push(!from_client, ACK, b"");
    }

    fn exchange(&mut self, request: &[u8], response: &[u8], mss: usize) {
        self.send(true, request, mss);
        self.send(false, response, mss);
    }

    fn close(&mut self) {
        self.push(true, FIN | ACK, b"");
        self.push(false, FIN | ACK, b"");
        self.push(true, ACK, b"");
    }

    /// Indices of the segments carrying payload from the server.
    fn server_data(&self) -> Vec<usize> {
        (0..self.segs.len())
            .filter(|&i| !self.segs[i].from_client && !self.segs[i].payload.is_empty())
            .collect()
    }
}

fn checksum_free_ipv4(src: IpAddr, dst: IpAddr, proto: u8, l4: &[u8]) -> Vec<u8> {
    let (IpAddr::V4(s), IpAddr::V4(d)) = (src, dst) else {
        panic!("IPv4 only")
    };
    let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, proto, 0, 0];
    ip[2..4].copy_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
    ip.extend_from_slice(&s.octets());
    ip.extend_from_slice(&d.octets());
    ip.extend_from_slice(l4);
    ip
}

fn ip_packet(src: SocketAddr, dst: SocketAddr, seg: &Seg) -> Vec<u8> {
    let mut tcp = Vec::new();
    tcp.extend_from_slice(&src.port().to_be_bytes());
    tcp.extend_from_slice(&dst.port().to_be_bytes());
    tcp.extend_from_slice(&seg.seq.to_be_bytes());
    tcp.extend_from_slice(&seg.ack.to_be_bytes());
    tcp.extend_from_slice(&[0x50, seg.flags, 0xff, 0xff, 0, 0, 0, 0]);
    tcp.extend_from_slice(&seg.payload);
    match (src.ip(), dst.ip()) {
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut ip = vec![0x60, 0, 0, 0];
            ip.extend_from_slice(&(tcp.len() as u16).to_be_bytes());
            ip.extend_from_slice(&[6, 64]);
            ip.extend_from_slice(&s.octets());
            ip.extend_from_slice(&d.octets());
            ip.extend_from_slice(&tcp);
            ip
        }
        (s, d) => checksum_free_ipv4(s, d, 6, &tcp),
    }
}

fn frame(link: DataLink, ip: &[u8]) -> Vec<u8> {
    let v6 = ip[0] >> 4 == 6;
    let ethertype: [u8; 2] = if v6 { [0x86, 0xdd] } else { [0x08, 0x00] };
    let mut f = match link {
        DataLink::ETHERNET => {
            let mut f = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2];
            f.extend_from_slice(&ethertype);
            f
        }
        DataLink::LINUX_SLL => {
            let mut f = vec![0, 0, 0, 1, 0, 6, 2, 0, 0, 0, 0, 1, 0, 0];
            f.extend_from_slice(&ethertype);
            f
        }
        DataLink::LINUX_SLL2 => {
            let mut f = ethertype.to_vec();
            f.extend_from_slice(&[0, 0, 0, 0, 0, 1, 0, 1, 0, 6, 2, 0, 0, 0, 0, 1, 0, 0]);
            f
        }
        DataLink::NULL => (if v6 { 30u32 } else { 2 }).to_le_bytes().to_vec(),
        DataLink::LOOP => (if v6 { 30u32 } else { 2 }).to_be_bytes().to_vec(),
        DataLink::RAW => Vec::new(),
        other => panic!("{other:?}"),
    };
    f.extend_from_slice(ip);
    f
}

/// A packet of a synthetic capture: its link-layer bytes and how long it was on the wire.
struct Packet {
    data: Vec<u8>,
    orig_len: u32,
}

fn packets(conv: &Conv, link: DataLink) -> Vec<Packet> {
    conv.segs
        .iter()
        .map(|seg| {
            let (src, dst) = if seg.from_client {
                (conv.client, conv.server)
            } else {
                (conv.server, conv.client)
            };
            let data = frame(link, &ip_packet(src, dst, seg));
            Packet {
                orig_len: data.len() as u32,
                data,
            }
        })
        .collect()
}

/// Packet k is at 1 ms + k ms after a fixed instant.
fn timestamp(k: usize) -> Duration {
    Duration::from_secs(1_780_000_000) + Duration::from_millis(k as u64 + 1)
}

fn write_pcap(path: &Path, link: DataLink, packets: &[Packet]) {
    let header = PcapHeader {
        datalink: link,
        ts_resolution: TsResolution::NanoSecond,
        snaplen: 262_144,
        ..PcapHeader::default()
    };
    let mut w = PcapWriter::with_header(std::fs::File::create(path).unwrap(), header).unwrap();
    for (k, p) in packets.iter().enumerate() {
        w.write_packet(&PcapPacket::new(timestamp(k), p.orig_len, &p.data))
            .unwrap();
    }
}

/// Writes a pcapng capture; returns where each packet's block starts in the file.
fn write_pcapng(path: &Path, link: DataLink, packets: &[Packet]) -> Vec<usize> {
    let mut w = PcapNgWriter::new(Vec::new()).unwrap();
    w.write_pcapng_block(InterfaceDescriptionBlock::new(link, 262_144))
        .unwrap();
    let mut starts = Vec::new();
    for (k, p) in packets.iter().enumerate() {
        starts.push(w.get_ref().len());
        // The interface has the default resolution, microseconds.
        let units = Duration::from_nanos(timestamp(k).as_micros() as u64);
        let block = EnhancedPacketBlock {
            interface_id: 0,
            timestamp: units,
            original_len: p.orig_len,
            data: Cow::Borrowed(&p.data),
            options: vec![],
        };
        w.write_pcapng_block(block).unwrap();
    }
    std::fs::write(path, w.into_inner()).unwrap();
    starts
}

fn replay_packets(link: DataLink, packets: &[Packet]) -> (Vec<Span>, Outcome) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("capture.pcap");
    write_pcap(&path, link, packets);
    replay(&path)
}

const GET_ORDER: &[u8] = b"GET /orders/7 HTTP/1.1\r\nHost: shop:8080\r\nUser-Agent: t\r\n\r\n";

fn ok_response(body_len: usize) -> Vec<u8> {
    let mut r = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {body_len}\r\n\r\n"
    )
    .into_bytes();
    r.extend((0..body_len).map(|i| b'a' + (i % 26) as u8));
    r
}

fn not_found() -> Vec<u8> {
    b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n\r\nnot found".to_vec()
}

/// The lines the client and server spans of one exchange on the default conversation
/// render to; `code` is the response's status code. Client spans are errors from 400 on,
/// server spans from 500 on.
fn pair(first: usize, name: &str, code: u16, body: (u64, u64)) -> String {
    let (req, resp) = body;
    let client = if code >= 400 {
        format!("{code} ERROR")
    } else {
        code.to_string()
    };
    let server = if code >= 500 {
        format!("{code} ERROR")
    } else {
        code.to_string()
    };
    format!(
        "#{first} Client {name:?} {client} server.address=shop server.port=8080 service=10.0.0.7 parent=- body={req}/{resp}\n\
         #{} Server {name:?} {server} server.address=shop server.port=8080 service=10.0.0.5:8080 parent=#{first} body={req}/{resp}\n",
        first + 1
    )
}

fn default_conv() -> Conv {
    Conv::new("10.0.0.7:40312", "10.0.0.5:8080", 1000, 5000).handshake()
}

#[test]
fn reordered_segments_and_wrapping_sequence_numbers() {
    // Both ends' sequence numbers wrap inside the exchange.
    let mut conv = Conv::new(
        "10.0.0.7:40312",
        "10.0.0.5:8080",
        u32::MAX - 30,
        u32::MAX - 2000,
    )
    .handshake();
    conv.send(true, GET_ORDER, 20);
    conv.send(false, &ok_response(3000), 700);
    conv.exchange(
        b"GET /missing HTTP/1.1\r\nHost: shop:8080\r\n\r\n",
        &not_found(),
        700,
    );
    conv.close();
    // The first request's segments come in reverse order, and the second and third
    // segments of the first response trade places.
    let request: Vec<usize> = (0..conv.segs.len())
        .filter(|&i| conv.segs[i].from_client && conv.segs[i].payload.len() == 20)
        .collect();
    assert!(request.len() >= 2);
    let reversed: Vec<Seg> = request
        .iter()
        .rev()
        .map(|&i| conv.segs[i].clone())
        .collect();
    for (&i, seg) in request.iter().zip(reversed) {
        conv.segs[i] = seg;
    }
    let data = conv.server_data();
    conv.segs.swap(data[1], data[2]);
    let (spans, outcome) = replay_packets(DataLink::ETHERNET, &packets(&conv, DataLink::ETHERNET));
    assert!(outcome.error.is_none());
    assert_eq!(
        render(&spans),
        pair(1, "GET /orders/{id}", 200, (0, 3000)) + &pair(3, "GET /missing", 404, (0, 9))
    );
    assert_eq!(outcome.summary.bytes_missing, 0);
}

#[test]
fn retransmitted_and_overlapping_segments_are_delivered_once() {
    let mut conv = default_conv();
    conv.exchange(GET_ORDER, &ok_response(2000), 500);
    conv.close();
    let data = conv.server_data();
    // A plain retransmission of the second segment, and one of the third that also
    // repeats the end of the second.
    let again = conv.segs[data[1]].clone();
    let mut overlap = conv.segs[data[2]].clone();
    let prev = &conv.segs[data[1]];
    overlap.seq = overlap.seq.wrapping_sub(100);
    overlap.payload = [
        &prev.payload[prev.payload.len() - 100..],
        &overlap.payload[..],
    ]
    .concat();
    conv.segs.insert(data[2] + 1, overlap);
    conv.segs.insert(data[1] + 1, again);
    let (spans, outcome) = replay_packets(DataLink::ETHERNET, &packets(&conv, DataLink::ETHERNET));
    assert!(outcome.error.is_none());
    assert_eq!(render(&spans), pair(1, "GET /orders/{id}", 200, (0, 2000)));
}

#[test]
fn a_segment_lost_inside_a_large_body_leaves_the_spans_right() {
    let mut conv = default_conv();
    conv.exchange(GET_ORDER, &ok_response(100_000), 1400);
    conv.exchange(
        b"GET /next HTTP/1.1\r\nHost: shop:8080\r\n\r\n",
        &ok_response(10),
        1400,
    );
    conv.close();
    let data = conv.server_data();
    // The capture missed one segment in the middle of the body; the client got it (its
    // ACK covers it), so it is never sent again.
    let lost = conv.segs.remove(data[30]);
    assert_eq!(lost.payload.len(), 1400);
    let (spans, outcome) = replay_packets(DataLink::ETHERNET, &packets(&conv, DataLink::ETHERNET));
    assert!(outcome.error.is_none());
    assert_eq!(
        render(&spans),
        pair(1, "GET /orders/{id}", 200, (0, 100_000)) + &pair(3, "GET /next", 200, (0, 10))
    );
    assert_eq!(outcome.summary.bytes_missing, 1400);
}

#[test]
fn a_lost_segment_never_acknowledged_is_skipped_at_the_end_of_the_capture() {
    let mut conv = default_conv();
    conv.send(true, GET_ORDER, 1400);
    // The capture ends before the client acknowledges anything of the response.
    for chunk in ok_response(20_000).chunks(1400) {
        conv.push(false, PSH_ACK, chunk);
    }
    let data = conv.server_data();
    conv.segs.remove(data[5]);
    let (spans, outcome) = replay_packets(DataLink::ETHERNET, &packets(&conv, DataLink::ETHERNET));
    assert!(outcome.error.is_none());
    assert_eq!(
        render(&spans),
        pair(1, "GET /orders/{id}", 200, (0, 20_000))
    );
    assert_eq!(outcome.summary.bytes_missing, 1400);
}

#[test]
fn bodies_cut_by_the_snapshot_length_still_count() {
    let mut conv = default_conv();
    conv.exchange(GET_ORDER, &ok_response(5000), 1400);
    conv.exchange(
        b"GET /next HTTP/1.1\r\nHost: shop:8080\r\n\r\n",
        &not_found(),
        1400,
    );
    conv.close();
    // tcpdump -s 200: every frame keeps its first 200 bytes only.
    let cut: Vec<Packet> = packets(&conv, DataLink::ETHERNET)
        .into_iter()
        .map(|p| Packet {
            orig_len: p.orig_len,
            data: p.data[..p.data.len().min(200)].to_vec(),
        })
        .collect();
    let (spans, outcome) = replay_packets(DataLink::ETHERNET, &cut);
    assert!(outcome.error.is_none());
    let want = pair(1, "GET /orders/{id}", 200, (0, 5000)) + &pair(3, "GET /next", 404, (0, 9));
    assert_eq!(render(&spans), want);
}

#[test]
fn a_capture_that_starts_mid_connection_gives_the_later_exchanges() {
    let mut conv = Conv::new("10.0.0.7:40312", "10.0.0.5:8080", 1000, 5000).handshake();
    conv.exchange(GET_ORDER, &ok_response(3000), 1000);
    let start = conv.segs.len();
    conv.exchange(
        b"POST /orders HTTP/1.1\r\nHost: shop:8080\r\nContent-Length: 5\r\n\r\nhello",
        &ok_response(2),
        1000,
    );
    conv.exchange(GET_ORDER, &ok_response(4), 1000);
    conv.close();
    // The capture starts while the connection idles between two exchanges: no
    // handshake, and sequence numbers far from zero.
    conv.segs.drain(..start);
    let (spans, outcome) = replay_packets(DataLink::ETHERNET, &packets(&conv, DataLink::ETHERNET));
    assert!(outcome.error.is_none());
    // The server is told from the client by its lower port.
    assert_eq!(
        render(&spans),
        pair(1, "POST /orders", 200, (5, 2)) + &pair(3, "GET /orders/{id}", 200, (0, 4))
    );
    assert_eq!(outcome.summary.connections, 1);
}

#[test]
fn a_capture_cut_inside_its_last_packet_is_an_error_after_the_spans() {
    let mut conv = default_conv();
    conv.exchange(GET_ORDER, &ok_response(10), 1400);
    conv.exchange(
        b"GET /next HTTP/1.1\r\nHost: shop:8080\r\n\r\n",
        &ok_response(3000),
        1400,
    );
    let mut packets = packets(&conv, DataLink::ETHERNET);
    // The last packet is the end of the second response, and the file ends inside it.
    packets.pop();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cut.pcap");
    write_pcap(&path, DataLink::ETHERNET, &packets);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 50]).unwrap();
    let (spans, outcome) = replay(&path);
    let error = outcome.error.expect("an error");
    assert!(
        matches!(error, ReplayError::Truncated { packet, .. } if packet == packets.len() as u64),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(
        message.contains("cut.pcap") && message.contains(&format!("packet {}", packets.len())),
        "{message}"
    );
    assert_eq!(outcome.summary.packets, packets.len() as u64 - 1);
    // The first exchange was whole; the second lost its last bytes with the packet.
    let rendered = render(&spans);
    assert!(
        rendered.starts_with(&pair(1, "GET /orders/{id}", 200, (0, 10))),
        "{rendered}"
    );
}

#[test]
fn a_corrupt_block_names_its_packet() {
    let mut conv = default_conv();
    conv.exchange(GET_ORDER, &ok_response(10), 1400);
    conv.close();
    let packets = packets(&conv, DataLink::ETHERNET);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("corrupt.pcapng");
    let starts = write_pcapng(&path, DataLink::ETHERNET, &packets);
    let mut bytes = std::fs::read(&path).unwrap();
    // Packet 9's block length no longer matches its trailer.
    bytes[starts[8] + 4] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();
    let (spans, outcome) = replay(&path);
    let message = outcome.error.expect("an error").to_string();
    assert!(message.contains("corrupt.pcapng: packet 9"), "{message}");
    assert_eq!(outcome.summary.packets, 8);
    assert_eq!(render(&spans), pair(1, "GET /orders/{id}", 200, (0, 10)));
}

#[test]
fn pcapng_and_every_link_type_give_the_same_spans() {
    let want = pair(1, "GET /orders/{id}", 200, (0, 10));
    let dir = tempfile::tempdir().unwrap();
    for link in [
        DataLink::ETHERNET,
        DataLink::LINUX_SLL,
        DataLink::LINUX_SLL2,
        DataLink::NULL,
        DataLink::LOOP,
        DataLink::RAW,
    ] {
        let mut conv = default_conv();
        conv.exchange(GET_ORDER, &ok_response(10), 1400);
        conv.close();
        let (spans, outcome) = replay_packets(link, &packets(&conv, link));
        assert!(outcome.error.is_none(), "{link:?}");
        assert_eq!(render(&spans), want, "{link:?}");
        let path = dir.path().join("c.pcapng");
        write_pcapng(&path, link, &packets(&conv, link));
        let (spans, outcome) = replay(&path);
        assert!(outcome.error.is_none(), "{link:?} pcapng");
        assert_eq!(render(&spans), want, "{link:?} pcapng");
        assert_eq!(
            spans[0].start_unix_nanos / 1_000_000,
            timestamp(3).as_millis() as u64,
            "{link:?} pcapng times"
        );
    }
    // IPv6 too.
    let mut conv = Conv::new("[fd00::7]:40312", "[fd00::5]:8080", 1, 2).handshake();
    conv.exchange(GET_ORDER, &ok_response(10), 1400);
    let (spans, _) = replay_packets(DataLink::LINUX_SLL2, &packets(&conv, DataLink::LINUX_SLL2));
    assert_eq!(
        render(&spans),
        want.replace("service=10.0.0.7", "service=fd00::7")
            .replace("service=10.0.0.5:8080", "service=[fd00::5]:8080")
    );
}

#[test]
fn garbage_and_other_protocols_make_no_spans() {
    let mut conv = Conv::new("10.0.0.7:40999", "10.0.0.5:9999", 77, 88).handshake();
    let noise: Vec<u8> = (0..3000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    conv.exchange(&noise[..1500], &noise[1500..], 1000);
    conv.close();
    let mut packets = packets(&conv, DataLink::ETHERNET);
    // A UDP datagram and an ARP frame are counted and skipped.
    let udp = checksum_free_ipv4(
        "10.0.0.7".parse().unwrap(),
        "10.0.0.5".parse().unwrap(),
        17,
        &[0, 53, 0, 53, 0, 8, 0, 0],
    );
    packets.push(Packet {
        orig_len: 0,
        data: frame(DataLink::ETHERNET, &udp),
    });
    let mut arp = vec![0xff; 6];
    arp.extend_from_slice(&[2, 0, 0, 0, 0, 1, 0x08, 0x06]);
    arp.extend_from_slice(&[0; 28]);
    packets.push(Packet {
        orig_len: 0,
        data: arp,
    });
    for p in &mut packets {
        p.orig_len = p.data.len() as u32;
    }
    let (spans, outcome) = replay_packets(DataLink::ETHERNET, &packets);
    assert!(outcome.error.is_none());
    assert!(spans.is_empty(), "{}", render(&spans));
    assert_eq!(outcome.summary.skipped, 2);
    assert_eq!(outcome.summary.connections, 1);
    assert_eq!(outcome.summary.packets, packets.len() as u64);
}

#[test]
fn a_reset_ends_the_connection_and_a_reused_port_is_a_new_one() {
    let mut conv = default_conv();
    conv.send(true, GET_ORDER, 1400);
    conv.push(false, RST | ACK, b"");
    // The same ports again, a new connection.
    let mut again = Conv::new("10.0.0.7:40312", "10.0.0.5:8080", 900_000, 700_000).handshake();
    again.exchange(GET_ORDER, &ok_response(10), 1400);
    conv.segs.extend(again.segs);
    let (spans, outcome) = replay_packets(DataLink::ETHERNET, &packets(&conv, DataLink::ETHERNET));
    assert!(outcome.error.is_none());
    assert_eq!(outcome.summary.connections, 2);
    let rendered = render(&spans);
    // The reset request has no response: its client and server spans are marked
    // incomplete, not errors; the new connection's exchange is whole.
    assert!(
        rendered.contains(&pair(3, "GET /orders/{id}", 200, (0, 10))),
        "{rendered}"
    );
    assert_eq!(
        incomplete(&spans),
        ["connection_closed", "connection_closed", "-", "-"]
    );
}

/// `sonde.incomplete.reason` of each span in start order (client first), `-` for a
/// whole exchange; an incomplete span is never an error.
fn incomplete(spans: &[Span]) -> Vec<String> {
    let mut sorted: Vec<&Span> = spans.iter().collect();
    sorted.sort_by_key(|s| (s.start_unix_nanos, s.kind != SpanKind::Client));
    sorted
        .iter()
        .map(|s| {
            let reason = string(s, sonde::spans::INCOMPLETE_REASON);
            if reason != "-" {
                assert_eq!(
                    s.attribute(sonde::spans::INCOMPLETE),
                    Some(&Value::Bool(true))
                );
                assert_eq!(s.status, Status::Unset, "{}", s.name);
            }
            reason
        })
        .collect()
}

#[test]
fn a_request_still_unanswered_when_the_capture_ends_is_an_incomplete_span() {
    let mut conv = default_conv();
    conv.exchange(GET_ORDER, &ok_response(10), 1400);
    // The server never answers the second request before the capture ends.
    conv.send(true, GET_ORDER, 1400);
    let (spans, outcome) = replay_packets(DataLink::ETHERNET, &packets(&conv, DataLink::ETHERNET));
    assert!(outcome.error.is_none());
    assert_eq!(spans.len(), 4, "{}", render(&spans));
    assert_eq!(incomplete(&spans), ["-", "-", "capture_end", "capture_end"]);
    // The unanswered client span is still the parent of the server span.
    let rendered = render(&spans);
    assert!(rendered.contains("parent=#3"), "{rendered}");
}

// ---- the binary ----

fn sonde() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sonde"));
    c.env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env_remove("SONDE_OUTPUT")
        .env_remove("SONDE_OUTPUT_FILE");
    c
}

/// (service.name, span name, kind, parent span id) of every span in OTLP JSON lines.
fn otlp_spans(text: &str) -> Vec<(String, String, u64, String)> {
    let mut out = Vec::new();
    for line in text.lines() {
        let request: serde_json::Value =
            serde_json::from_str(line).expect("one JSON request per line");
        for rs in request["resourceSpans"].as_array().unwrap() {
            let service = rs["resource"]["attributes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|kv| kv["key"] == "service.name")
                .map(|kv| kv["value"]["stringValue"].as_str().unwrap().to_owned())
                .unwrap();
            for ss in rs["scopeSpans"].as_array().unwrap() {
                for span in ss["spans"].as_array().unwrap() {
                    out.push((
                        service.clone(),
                        span["name"].as_str().unwrap().to_owned(),
                        span["kind"].as_u64().unwrap(),
                        span["parentSpanId"].as_str().unwrap_or("").to_owned(),
                    ));
                }
            }
        }
    }
    out.sort();
    out
}

#[test]
fn the_binary_replays_a_capture_into_otlp_json() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("spans.jsonl");
    let capture = fixture_dir().join("python_keepalive.pcap");
    let run = sonde()
        .args([
            "replay",
            capture.to_str().unwrap(),
            "--output",
            "otlp-json",
            "--output-file",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    assert!(
        stderr.contains(
            "python_keepalive.pcap: 29 packets (0 not TCP, skipped), 1 TCP connections, 8 spans"
        ),
        "{stderr}"
    );
    let spans = otlp_spans(&std::fs::read_to_string(&out).unwrap());
    let names: Vec<(&str, &str, u64)> = spans
        .iter()
        .map(|(s, n, k, _)| (s.as_str(), n.as_str(), *k))
        .collect();
    // OTLP kinds: 2 server, 3 client.
    assert_eq!(
        names,
        [
            ("127.0.0.1", "GET /chunked", 3),
            ("127.0.0.1", "GET /missing", 3),
            ("127.0.0.1", "GET /orders/{id}", 3),
            ("127.0.0.1", "POST /orders", 3),
            ("127.0.0.1:18580", "GET /chunked", 2),
            ("127.0.0.1:18580", "GET /missing", 2),
            ("127.0.0.1:18580", "GET /orders/{id}", 2),
            ("127.0.0.1:18580", "POST /orders", 2),
        ]
    );
    assert!(
        spans.iter().filter(|s| s.2 == 2).all(|s| !s.3.is_empty()),
        "server spans are children: {spans:?}"
    );
}

#[test]
fn the_binary_exports_what_it_replayed_before_a_cut_and_fails_naming_the_packet() {
    let dir = tempfile::tempdir().unwrap();
    let capture = dir.path().join("cut.pcap");
    let whole = std::fs::read(fixture_dir().join("python_keepalive.pcap")).unwrap();
    std::fs::write(&capture, &whole[..whole.len() - 20]).unwrap();
    let out = dir.path().join("spans.jsonl");
    let run = sonde()
        .args([
            "replay",
            capture.to_str().unwrap(),
            "--output",
            "otlp-json",
            "--output-file",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success());
    assert!(
        stderr.contains("cut.pcap: packet 29 is cut short"),
        "{stderr}"
    );
    assert!(stderr.contains("28 packets"), "{stderr}");
    assert_eq!(
        otlp_spans(&std::fs::read_to_string(&out).unwrap()).len(),
        8,
        "{stderr}"
    );
}

#[test]
fn the_binary_says_what_is_wrong_with_a_file_that_is_no_capture() {
    let dir = tempfile::tempdir().unwrap();
    let notes = dir.path().join("notes.txt");
    std::fs::write(&notes, "GET / HTTP/1.1\r\n\r\n").unwrap();
    let run = sonde()
        .args(["replay", notes.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success());
    assert!(
        stderr.contains("notes.txt is not a pcap or pcapng capture"),
        "{stderr}"
    );
    let run = sonde()
        .args(["replay", "/nonexistent/x.pcap"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&run.stderr).contains("cannot open capture /nonexistent/x.pcap")
    );
}

#[test]
fn a_grpcio_capture_gives_grpc_spans_with_the_status_from_the_trailers() {
    let (spans, outcome) = replay(&fixture_dir().join("grpc_h2c.pcap"));
    assert!(outcome.error.is_none(), "{:?}", outcome.error);
    assert_eq!(spans.len(), 4);
    let mut codes = Vec::new();
    for s in &spans {
        assert_eq!(string(s, semconv::NETWORK_PROTOCOL_VERSION), "2");
        assert_eq!(string(s, "rpc.system"), "grpc");
        assert_eq!(string(s, "rpc.service"), "sonde.test.Orders");
        assert_eq!(string(s, "rpc.method"), "Get");
        assert_eq!(string(s, semconv::URL_PATH), "/sonde.test.Orders/Get");
        let code = int(s, "rpc.grpc.status_code");
        assert_eq!(matches!(s.status, Status::Error(_)), code == "5", "{s:?}");
        codes.push(code);
    }
    codes.sort();
    assert_eq!(codes, ["0", "0", "5", "5"]);
}
