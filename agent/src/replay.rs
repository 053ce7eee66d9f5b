//! `sonde replay`: the user-space pipeline over a pcap or pcapng capture instead of the
//! kernel, so that a tcpdump becomes spans and parsers are tested on real traffic.
//!
//! Each TCP connection in the capture is fed to the [`Pipeline`] as the two traced
//! processes on one node would have been: the client end as one process, the server end
//! as another, each with its own descriptor for the connection. Bytes the client sends
//! are a write (egress) of the client process and a read (ingress) of the server
//! process, and the other way round. Processes are synthetic: a server process per
//! listening address (`service.name` "10.0.0.5:8080"), a client process per client IP
//! address (`service.name` "10.0.0.7"), with pids numbered from 1 in order of
//! appearance; `host.name` is the endpoint's IP address. The socket tuples carry the real
//! addresses, so `server.address`, `client.address` and the peer attributes are those
//! of the capture.
//!
//! Connect and accept events are made from the SYN and the SYN-ACK; a connection already
//! open when the capture started gets none, and the pipeline looks for a message
//! boundary as it does for connections older than the agent. Its client is the end
//! whose address was seen accepting connections earlier in the capture, else the end
//! with the higher port. A close of both ends follows a RST, or the FINs of both
//! directions, or, at the end of the capture, a FIN of either.
//!
//! TCP reassembly is written here by hand because the pipeline's stream cursor expects
//! whole reads with stream offsets, not segments with sequence numbers: per direction,
//! segments are put in sequence order (holding out-of-order ones, at most
//! [`MAX_HELD_BYTES`] and [`MAX_HELD_SEGMENTS`]), bytes already delivered are dropped
//! (retransmissions, overlaps), and sequence numbers wrap. A hole is given up on when
//! the receiver acknowledges bytes past it (the capture missed a segment the receiver
//! got), when it has been open for [`HOLE_TIMEOUT_NS`] of capture time, when the held
//! segments exceed their bound, or at the connection's end: the next bytes then go to
//! the pipeline with an offset past the hole, which the pipeline's cursor turns into a
//! gap its parsers skip by length. Packets cut short by the capture's snapshot length
//! are data events whose captured prefix is shorter than their length, in the same way.

use std::{
    borrow::Cow,
    collections::{BTreeMap, HashMap, HashSet},
    fs::File,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use agent_common::{
    AF_INET, AF_INET6, DataEvent, Direction, EventHeader, EventKind, SockTuple, SyscallId, role,
};
use anyhow::Result;
use pcap_file::{
    DataLink, PcapError, TsResolution,
    pcap::PcapReader,
    pcapng::{
        Block, PcapNgReader,
        blocks::interface_description::{InterfaceDescriptionBlock, InterfaceDescriptionOption},
    },
};
use thiserror::Error;
use tracing::warn;

use crate::{
    config::ReplayArgs,
    events::Event,
    export,
    pipeline::{Pipeline, PipelineOptions, Sink},
    spans::Resource,
    telemetry::Metrics,
};

/// Most bytes of out-of-order segments held per direction of a connection.
pub const MAX_HELD_BYTES: u64 = 1 << 20;
/// Most out-of-order segments held per direction of a connection.
pub const MAX_HELD_SEGMENTS: usize = 1024;
/// How long (capture time) a hole waits for a retransmission before it is skipped.
pub const HOLE_TIMEOUT_NS: u64 = 5_000_000_000;
/// How often (capture time) the pipeline's timers run.
const TICK_NS: u64 = 50_000_000;
/// Most connections reassembled at once; the least recently active go first.
const MAX_CONNECTIONS: usize = 65536;
/// A connection silent for this long (capture time) is forgotten, as the pipeline does.
const IDLE_NS: u64 = 600_000_000_000;
/// More than any real snapshot length: a packet claiming more is corrupt.
const MAX_PACKET_BYTES: u32 = 16 << 20;

/// What stopped a replay before the end of its capture.
#[derive(Debug, Error)]
pub enum ReplayError {
    #[error("cannot open capture {}: {error}", path.display())]
    Open { path: PathBuf, error: io::Error },
    #[error(
        "{} is not a pcap or pcapng capture ({reason}); write one with tcpdump -w, tshark -w or dumpcap",
        path.display()
    )]
    NotACapture { path: PathBuf, reason: String },
    #[error(
        "{}: packet {packet} is cut short: the file ends inside it (the capture was still \
         being written or was copied partly, or the packet's length field is corrupt); \
         the packets before it were replayed",
        path.display()
    )]
    Truncated { path: PathBuf, packet: u64 },
    #[error(
        "{}: packet {packet} is corrupt ({reason}); the packets before it were replayed",
        path.display()
    )]
    Corrupt {
        path: PathBuf,
        packet: u64,
        reason: String,
    },
    #[error("{}: cannot read packet {packet}: {error}", path.display())]
    Read {
        path: PathBuf,
        packet: u64,
        error: io::Error,
    },
}

/// What a replay went through.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Packets read from the capture.
    pub packets: u64,
    /// Packets that were not TCP over IPv4 or IPv6 (or fragments, or of a link type
    /// sonde cannot read), skipped.
    pub skipped: u64,
    /// TCP connections that carried a SYN or payload.
    pub connections: u64,
    /// Spans the pipeline produced.
    pub spans: u64,
    /// Bytes of TCP payload the capture missed (holes skipped).
    pub bytes_missing: u64,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} packets ({} not TCP, skipped), {} TCP connections, {} spans",
            self.packets, self.skipped, self.connections, self.spans
        )?;
        if self.bytes_missing > 0 {
            write!(f, ", {} bytes missing from the capture", self.bytes_missing)?;
        }
        Ok(())
    }
}

/// The end of a replay: what was done, and the error that stopped it early, if any.
/// The spans built before an error have gone to the sink all the same.
#[derive(Debug)]
pub struct Outcome {
    pub summary: Summary,
    pub error: Option<ReplayError>,
}

/// `sonde replay`: replays `args.file` and exports its spans like `sonde run` would.
pub async fn run(args: ReplayArgs) -> Result<()> {
    let metrics = Arc::new(Metrics::default());
    let output = args.out.resolve()?;
    let (exporter, export_task) = export::spawn(output, metrics.clone())?;
    // A capture is read much faster than spans are sent, and unlike the live agent a
    // replay can wait for room in the export queue instead of dropping.
    let sink: Sink = Box::new(move |span| exporter.export_waiting(span));
    let path = args.file.clone();
    let pipeline_metrics = metrics.clone();
    let outcome =
        tokio::task::spawn_blocking(move || replay_file(&path, pipeline_metrics, sink)).await?;
    export_task.shutdown(Duration::from_secs(30)).await;
    eprintln!("sonde replay: {}: {}", args.file.display(), outcome.summary);
    let dropped = metrics.spans_dropped.total();
    if dropped > 0 {
        warn!(dropped, "some spans could not be exported");
    }
    match outcome.error {
        Some(error) => Err(error.into()),
        None => Ok(()),
    }
}

/// Replays the capture at `path` through a new pipeline whose spans go to `sink`.
pub fn replay_file(path: &Path, metrics: Arc<Metrics>, sink: Sink) -> Outcome {
    let spans = Arc::new(AtomicU64::new(0));
    let counted = spans.clone();
    let mut sink = sink;
    let counting: Sink = Box::new(move |span| {
        counted.fetch_add(1, Ordering::Relaxed);
        sink(span);
    });
    let mut pipeline = Pipeline::new(
        PipelineOptions {
            exclude_own_sockets: false,
            link_remote_peers: true,
            ..PipelineOptions::default()
        },
        metrics,
        counting,
    );
    // Capture times are Unix times already.
    pipeline.set_mono_to_unix(0);
    let mut replayer = Replayer::new(pipeline);
    let error = match Capture::open(path) {
        Ok(mut capture) => loop {
            match capture.next_frame() {
                Ok(Some(frame)) => replayer.frame(&frame),
                Ok(None) => break None,
                Err(failure) => break Some(failure.into_error(path, replayer.summary.packets + 1)),
            }
        },
        Err(error) => Some(error),
    };
    replayer.finish();
    let mut summary = replayer.summary;
    summary.spans = spans.load(Ordering::Relaxed);
    Outcome { summary, error }
}

/// Why the next packet could not be read, before the file name and packet number are
/// known.
enum ReadFailure {
    Truncated,
    Corrupt(String),
    Io(io::Error),
}

impl ReadFailure {
    fn from_pcap(e: PcapError) -> Self {
        match e {
            PcapError::IoError(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                ReadFailure::Truncated
            }
            PcapError::IncompleteBuffer => ReadFailure::Truncated,
            PcapError::IoError(e) => ReadFailure::Io(e),
            other => ReadFailure::Corrupt(other.to_string()),
        }
    }

    fn into_error(self, path: &Path, packet: u64) -> ReplayError {
        let path = path.to_owned();
        match self {
            ReadFailure::Truncated => ReplayError::Truncated { path, packet },
            ReadFailure::Corrupt(reason) => ReplayError::Corrupt {
                path,
                packet,
                reason,
            },
            ReadFailure::Io(error) => ReplayError::Read {
                path,
                packet,
                error,
            },
        }
    }
}

/// One captured frame.
struct Frame<'a> {
    ts_ns: u64,
    link: DataLink,
    data: &'a [u8],
}

/// How the timestamps of one pcapng interface read.
struct Interface {
    link: DataLink,
    /// if_tsresol: units per second as a power of 10, or of 2 with the high bit set.
    ts_resolution: u8,
    /// if_tsoffset, seconds.
    ts_offset_s: u64,
}

impl Interface {
    fn of(idb: &InterfaceDescriptionBlock<'_>) -> Self {
        let mut i = Interface {
            link: idb.linktype,
            ts_resolution: 6,
            ts_offset_s: 0,
        };
        for option in &idb.options {
            match option {
                InterfaceDescriptionOption::IfTsResol(r) => i.ts_resolution = *r,
                InterfaceDescriptionOption::IfTsOffset(s) => i.ts_offset_s = *s,
                _ => {}
            }
        }
        i
    }

    fn ns(&self, units: u64) -> u64 {
        let units = u128::from(units);
        let ns = if self.ts_resolution & 0x80 != 0 {
            (units * 1_000_000_000) >> u32::from(self.ts_resolution & 0x7f).min(127)
        } else {
            let exp = u32::from(self.ts_resolution);
            if exp <= 9 {
                units * 10u128.pow(9 - exp)
            } else {
                units / 10u128.checked_pow(exp - 9).unwrap_or(u128::MAX)
            }
        };
        u64::try_from(ns)
            .unwrap_or(u64::MAX)
            .saturating_add(self.ts_offset_s.saturating_mul(1_000_000_000))
    }
}

enum Capture {
    Pcap {
        reader: PcapReader<File>,
        link: DataLink,
        snaplen: u32,
        ts: TsResolution,
        buf: Vec<u8>,
    },
    PcapNg {
        reader: PcapNgReader<File>,
        interfaces: Vec<Interface>,
        last_ts: u64,
        buf: Vec<u8>,
    },
}

impl Capture {
    fn open(path: &Path) -> Result<Self, ReplayError> {
        let open = || {
            File::open(path).map_err(|error| ReplayError::Open {
                path: path.to_owned(),
                error,
            })
        };
        let mut magic = [0u8; 4];
        let n = io::Read::read(&mut open()?, &mut magic).map_err(|error| ReplayError::Open {
            path: path.to_owned(),
            error,
        })?;
        let not_capture = |reason: String| ReplayError::NotACapture {
            path: path.to_owned(),
            reason,
        };
        if n < 4 {
            return Err(not_capture(format!("{n} bytes long")));
        }
        if magic == [0x0a, 0x0d, 0x0d, 0x0a] {
            let reader = PcapNgReader::new(open()?).map_err(|e| not_capture(e.to_string()))?;
            return Ok(Capture::PcapNg {
                reader,
                interfaces: Vec::new(),
                last_ts: 0,
                buf: Vec::new(),
            });
        }
        let reader = PcapReader::new(open()?).map_err(|e| not_capture(e.to_string()))?;
        let header = reader.header();
        Ok(Capture::Pcap {
            link: header.datalink,
            snaplen: header.snaplen,
            ts: header.ts_resolution,
            reader,
            buf: Vec::new(),
        })
    }

    fn next_frame(&mut self) -> Result<Option<Frame<'_>>, ReadFailure> {
        match self {
            Capture::Pcap {
                reader,
                link,
                snaplen,
                ts,
                buf,
            } => {
                let Some(packet) = reader.next_raw_packet() else {
                    return Ok(None);
                };
                let packet = packet.map_err(ReadFailure::from_pcap)?;
                if packet.incl_len > MAX_PACKET_BYTES.max(*snaplen) {
                    return Err(ReadFailure::Corrupt(format!(
                        "it claims {} bytes, more than the capture's snapshot length {snaplen}",
                        packet.incl_len
                    )));
                }
                let frac = match ts {
                    TsResolution::MicroSecond => u64::from(packet.ts_frac) * 1000,
                    TsResolution::NanoSecond => u64::from(packet.ts_frac),
                };
                let ts_ns = u64::from(packet.ts_sec) * 1_000_000_000 + frac;
                buf.clear();
                buf.extend_from_slice(&packet.data);
                Ok(Some(Frame {
                    ts_ns,
                    link: *link,
                    data: buf,
                }))
            }
            Capture::PcapNg {
                reader,
                interfaces,
                last_ts,
                buf,
            } => loop {
                let Some(block) = reader.next_block() else {
                    return Ok(None);
                };
                let (interface, ts_units, data) = match block.map_err(ReadFailure::from_pcap)? {
                    Block::SectionHeader(_) => {
                        interfaces.clear();
                        continue;
                    }
                    Block::InterfaceDescription(idb) => {
                        interfaces.push(Interface::of(&idb));
                        continue;
                    }
                    Block::EnhancedPacket(epb) => (
                        epb.interface_id,
                        Some(epb.timestamp.as_nanos() as u64),
                        epb.data,
                    ),
                    Block::Packet(pb) => (u32::from(pb.interface_id), Some(pb.timestamp), pb.data),
                    Block::SimplePacket(spb) => (0, None, spb.data),
                    _ => continue,
                };
                let Some(iface) = interfaces.get(interface as usize) else {
                    return Err(ReadFailure::Corrupt(format!(
                        "it names interface {interface}, which was not described"
                    )));
                };
                if let Some(units) = ts_units {
                    *last_ts = iface.ns(units);
                }
                buf.clear();
                buf.extend_from_slice(&data);
                break Ok(Some(Frame {
                    ts_ns: *last_ts,
                    link: iface.link,
                    data: buf,
                }));
            },
        }
    }
}

/// The IP packet inside a link-layer frame.
fn ip_of(link: DataLink, frame: &[u8]) -> Option<&[u8]> {
    fn by_ethertype(ethertype: u16, rest: &[u8]) -> Option<&[u8]> {
        matches!(ethertype, 0x0800 | 0x86dd).then_some(rest)
    }
    match link {
        DataLink::ETHERNET => {
            let mut at = 12;
            loop {
                let ethertype = u16::from_be_bytes(frame.get(at..at + 2)?.try_into().ok()?);
                // 802.1Q and 802.1ad tags
                if matches!(ethertype, 0x8100 | 0x88a8 | 0x9100) {
                    at += 4;
                    continue;
                }
                return by_ethertype(ethertype, frame.get(at + 2..)?);
            }
        }
        DataLink::LINUX_SLL => by_ethertype(
            u16::from_be_bytes(frame.get(14..16)?.try_into().ok()?),
            frame.get(16..)?,
        ),
        DataLink::LINUX_SLL2 => by_ethertype(
            u16::from_be_bytes(frame.get(0..2)?.try_into().ok()?),
            frame.get(20..)?,
        ),
        // The 4-byte address family is in the writer's byte order (NULL) or in network
        // order (LOOP), with values that differ between systems: the IP version says more.
        DataLink::NULL | DataLink::LOOP => frame.get(4..),
        DataLink::RAW | DataLink::IPV4 | DataLink::IPV6 => Some(frame),
        _ => None,
    }
}

/// One TCP segment, as far as it was captured.
#[derive(Debug)]
struct Segment<'a> {
    src: SocketAddr,
    dst: SocketAddr,
    seq: u32,
    /// The acknowledgment number, when the ACK flag is set.
    ack: Option<u32>,
    syn: bool,
    fin: bool,
    rst: bool,
    /// Payload bytes the segment carried on the wire.
    len: u64,
    /// The captured prefix of them.
    payload: &'a [u8],
}

fn tcp_segment(ip: &[u8]) -> Option<Segment<'_>> {
    let (src, dst, l4, l4_len) = match ip.first()? >> 4 {
        4 => {
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            if ip.len() < 20 || ihl < 20 || ip.len() < ihl || ip[9] != 6 {
                return None;
            }
            let fragment = u16::from_be_bytes([ip[6], ip[7]]);
            if fragment & 0x3fff != 0 {
                return None;
            }
            let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
            // 0 in packets the sender's segmentation offload had not split yet.
            let total = if total == 0 { ip.len() } else { total };
            let src = IpAddr::V4(Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]));
            let dst = IpAddr::V4(Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]));
            (
                src,
                dst,
                &ip[ihl..ip.len().min(total.max(ihl))],
                total.checked_sub(ihl)?,
            )
        }
        6 => {
            if ip.len() < 40 {
                return None;
            }
            let src = IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&ip[8..24]).ok()?));
            let dst = IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&ip[24..40]).ok()?));
            let payload = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
            let mut left = if payload == 0 { ip.len() - 40 } else { payload };
            let mut next = ip[6];
            let mut at = 40;
            loop {
                let header_len = match next {
                    6 => break,
                    0 | 43 | 60 => (usize::from(*ip.get(at + 1)?) + 1) * 8,
                    51 => (usize::from(*ip.get(at + 1)?) + 2) * 4,
                    // Fragments and anything else: not a whole TCP segment.
                    _ => return None,
                };
                next = *ip.get(at)?;
                at += header_len;
                left = left.checked_sub(header_len)?;
            }
            let l4 = ip.get(at..)?;
            (src, dst, &l4[..l4.len().min(left)], left)
        }
        _ => return None,
    };
    if l4.len() < 20 {
        return None;
    }
    let data_offset = usize::from(l4[12] >> 4) * 4;
    if data_offset < 20 || l4.len() < data_offset || l4_len < data_offset {
        return None;
    }
    let flags = l4[13];
    let ack = flags & 0x10 != 0;
    Some(Segment {
        src: SocketAddr::new(src, u16::from_be_bytes([l4[0], l4[1]])),
        dst: SocketAddr::new(dst, u16::from_be_bytes([l4[2], l4[3]])),
        seq: u32::from_be_bytes(l4[4..8].try_into().ok()?),
        ack: ack.then(|| u32::from_be_bytes(l4[8..12].try_into().expect("4 bytes"))),
        fin: flags & 0x01 != 0,
        syn: flags & 0x02 != 0,
        rst: flags & 0x04 != 0,
        len: (l4_len - data_offset) as u64,
        payload: &l4[data_offset..],
    })
}

/// Bytes to hand to the pipeline: `len` bytes at stream `offset`, of which `data` is the
/// captured prefix.
#[derive(Debug)]
struct Delivery<'a> {
    offset: u64,
    len: u64,
    data: Cow<'a, [u8]>,
}

/// An out-of-order segment waiting for the bytes before it.
struct Held {
    len: u64,
    data: Vec<u8>,
}

/// One direction of a connection being put back in order.
#[derive(Default)]
struct Flow {
    /// The sequence number of stream offset 0, once known.
    base: Option<u32>,
    /// The stream offset of the next byte to deliver.
    next: u64,
    held: BTreeMap<u64, Held>,
    held_bytes: u64,
    /// Capture time the current hole opened.
    hole_since: Option<u64>,
    /// The stream offset of the FIN, once seen.
    fin: Option<u64>,
    /// Bytes skipped as missing.
    missing: u64,
}

impl Flow {
    fn start_at(&mut self, seq: u32) {
        self.base.get_or_insert(seq);
    }

    /// Where sequence number `seq` falls in the stream (negative: before its start).
    /// Sequence numbers wrap; segments are within 2 GiB of the next byte expected.
    fn offset_of(&self, seq: u32) -> i128 {
        let base = self.base.expect("offset_of after start_at");
        let next_seq = base.wrapping_add(self.next as u32);
        i128::from(self.next) + i128::from(seq.wrapping_sub(next_seq) as i32)
    }

    fn finished(&self) -> bool {
        self.fin.is_some_and(|f| self.next >= f) && self.held.is_empty()
    }

    /// Takes a segment's payload; appends to `out` what can be delivered now.
    fn segment<'a>(
        &mut self,
        seq: u32,
        len: u64,
        payload: &'a [u8],
        now: u64,
        out: &mut Vec<Delivery<'a>>,
    ) {
        self.start_at(seq);
        let offset = self.offset_of(seq);
        let Some((offset, len, data)) = self.trim(offset, len, payload) else {
            return;
        };
        if offset == self.next {
            out.push(Delivery {
                offset,
                len,
                data: Cow::Borrowed(data),
            });
            self.next += len;
            self.release(now, out);
            return;
        }
        match self.held.get(&offset) {
            Some(h) if h.len >= len => {}
            previous => {
                let replaced = previous.map_or(0, |h| h.len);
                self.held_bytes = self.held_bytes - replaced + len;
                self.held.insert(
                    offset,
                    Held {
                        len,
                        data: data.to_vec(),
                    },
                );
            }
        }
        self.hole_since.get_or_insert(now);
        while self.held_bytes > MAX_HELD_BYTES || self.held.len() > MAX_HELD_SEGMENTS {
            self.skip_hole(now, out);
        }
        if self
            .hole_since
            .is_some_and(|t| now.saturating_sub(t) >= HOLE_TIMEOUT_NS)
        {
            self.skip_hole(now, out);
        }
    }

    /// The part of `len` bytes at `offset` not delivered yet, or None.
    fn trim<'a>(&self, offset: i128, len: u64, payload: &'a [u8]) -> Option<(u64, u64, &'a [u8])> {
        let end = offset + i128::from(len);
        if len == 0 || end <= i128::from(self.next) {
            return None;
        }
        if offset >= i128::from(self.next) {
            return Some((offset as u64, len, payload));
        }
        let seen = (i128::from(self.next) - offset) as u64;
        let cut = usize::try_from(seen)
            .unwrap_or(usize::MAX)
            .min(payload.len());
        Some((self.next, len - seen, &payload[cut..]))
    }

    /// Delivers held segments that the stream has reached.
    fn release<'a>(&mut self, now: u64, out: &mut Vec<Delivery<'a>>) {
        while let Some(entry) = self.held.first_entry() {
            if *entry.key() > self.next {
                break;
            }
            let offset = *entry.key();
            let held = entry.remove();
            self.held_bytes -= held.len;
            if let Some((offset, len, data)) = self.trim(i128::from(offset), held.len, &held.data) {
                out.push(Delivery {
                    offset,
                    len,
                    data: Cow::Owned(data.to_vec()),
                });
                self.next = offset + len;
            }
        }
        self.hole_since = if self.held.is_empty() {
            None
        } else {
            Some(now)
        };
    }

    /// Gives up on the hole before the first held segment.
    fn skip_hole<'a>(&mut self, now: u64, out: &mut Vec<Delivery<'a>>) {
        if let Some((&offset, _)) = self.held.first_key_value() {
            self.missing += offset.saturating_sub(self.next);
            self.next = self.next.max(offset);
            self.release(now, out);
        }
    }

    /// The receiver acknowledged the bytes before `ack`: those the capture does not have
    /// it will never send again.
    fn acknowledged<'a>(&mut self, ack: u32, now: u64, out: &mut Vec<Delivery<'a>>) {
        if self.base.is_none() {
            return;
        }
        let mut acked = self.offset_of(ack);
        // A FIN takes a sequence number of its own.
        if let Some(fin) = self.fin {
            acked = acked.min(i128::from(fin));
        }
        while acked > i128::from(self.next) {
            match self.held.first_key_value() {
                Some((&offset, _)) if i128::from(offset) <= acked => self.skip_hole(now, out),
                _ => {
                    let len = (acked - i128::from(self.next)) as u64;
                    out.push(Delivery {
                        offset: self.next,
                        len,
                        data: Cow::Borrowed(&[]),
                    });
                    self.missing += len;
                    self.next += len;
                }
            }
        }
    }

    /// Delivers everything held, skipping the holes (the connection is over).
    fn flush<'a>(&mut self, now: u64, out: &mut Vec<Delivery<'a>>) {
        while !self.held.is_empty() {
            self.skip_hole(now, out);
        }
    }
}

/// One end of a connection, as a traced process would be.
#[derive(Clone, Copy)]
struct End {
    addr: SocketAddr,
    pid: u32,
    fd: u32,
}

struct Conn {
    client: End,
    server: End,
    /// Roles known from the handshake (else guessed).
    from_handshake: bool,
    /// Client ISN, to tell a retransmitted SYN from a new connection on the same ports.
    client_isn: Option<u32>,
    to_server: Flow,
    to_client: Flow,
    client_opened: bool,
    server_opened: bool,
    last_ns: u64,
    /// Order of creation, for a deterministic end.
    id: u64,
}

impl Conn {
    fn tuple(from: &End, to: &End) -> SockTuple {
        let mut t = SockTuple {
            family: AF_INET,
            sport: from.addr.port(),
            dport: to.addr.port(),
            _pad: 0,
            saddr: [0; 16],
            daddr: [0; 16],
        };
        for (bytes, ip) in [(&mut t.saddr, from.addr.ip()), (&mut t.daddr, to.addr.ip())] {
            match ip {
                IpAddr::V4(v4) => bytes[..4].copy_from_slice(&v4.octets()),
                IpAddr::V6(v6) => {
                    t.family = AF_INET6;
                    *bytes = v6.octets();
                }
            }
        }
        if t.family == AF_INET6 {
            // Both addresses in one family: IPv4 ones as IPv4-mapped.
            for (bytes, ip) in [(&mut t.saddr, from.addr.ip()), (&mut t.daddr, to.addr.ip())] {
                if let IpAddr::V4(v4) = ip {
                    *bytes = v4.to_ipv6_mapped().octets();
                }
            }
        }
        t
    }

    fn role_of(&self, client_side: bool) -> u32 {
        match (self.from_handshake, client_side) {
            (false, _) => role::UNKNOWN,
            (true, true) => role::CLIENT,
            (true, false) => role::SERVER,
        }
    }
}

fn header(kind: EventKind, end: &End, ts_ns: u64) -> EventHeader {
    EventHeader {
        kind: kind as u32,
        tgid: end.pid,
        tid: end.pid,
        fd: end.fd,
        ts_ns,
    }
}

/// Tells the pipeline about one side's connect or accept.
fn open_side(pipeline: &mut Pipeline, conn: &mut Conn, client_side: bool, ts_ns: u64) {
    if client_side && !conn.client_opened {
        conn.client_opened = true;
        let tuple = Conn::tuple(&conn.client, &conn.server);
        pipeline.handle(Event::Connect {
            header: header(EventKind::Connect, &conn.client, ts_ns),
            tuple,
            ret: 0,
        });
    }
    if !client_side && !conn.server_opened {
        conn.server_opened = true;
        let tuple = Conn::tuple(&conn.server, &conn.client);
        pipeline.handle(Event::Accept {
            header: header(EventKind::Accept, &conn.server, ts_ns),
            tuple,
        });
    }
}

/// Hands bytes one end sent to the pipeline: a write of the sender, a read of the
/// receiver.
fn deliver(
    pipeline: &mut Pipeline,
    conn: &mut Conn,
    from_client: bool,
    deliveries: &[Delivery<'_>],
    ts_ns: u64,
) {
    if deliveries.is_empty() {
        return;
    }
    if conn.from_handshake {
        open_side(pipeline, conn, true, ts_ns);
        open_side(pipeline, conn, false, ts_ns);
    }
    let (sender, receiver) = if from_client {
        (conn.client, conn.server)
    } else {
        (conn.server, conn.client)
    };
    let sides = [
        (
            sender,
            receiver,
            Direction::Egress,
            SyscallId::Write,
            conn.role_of(from_client),
        ),
        (
            receiver,
            sender,
            Direction::Ingress,
            SyscallId::Read,
            conn.role_of(!from_client),
        ),
    ];
    for d in deliveries {
        for (me, peer, direction, syscall, role) in sides {
            let h = header(EventKind::Data, &me, ts_ns);
            let data = DataEvent {
                header: h,
                tuple: Conn::tuple(&me, &peer),
                offset: d.offset,
                len: d.len,
                captured: d.data.len() as u32,
                direction: direction as u32,
                syscall: syscall as u32,
                role,
            };
            pipeline.handle(Event::Data {
                header: h,
                data,
                payload: &d.data,
            });
        }
    }
}

fn close_both(pipeline: &mut Pipeline, conn: &Conn, ts_ns: u64) {
    for (me, peer) in [(conn.client, conn.server), (conn.server, conn.client)] {
        pipeline.handle(Event::Close {
            header: header(EventKind::Close, &me, ts_ns),
            tuple: Conn::tuple(&me, &peer),
        });
    }
}

/// Connections by their two addresses, smaller first.
type ConnKey = (SocketAddr, SocketAddr);

fn key_of(a: SocketAddr, b: SocketAddr) -> ConnKey {
    if a <= b { (a, b) } else { (b, a) }
}

struct Replayer {
    pipeline: Pipeline,
    conns: HashMap<ConnKey, Conn>,
    /// Addresses seen accepting connections.
    listeners: HashSet<SocketAddr>,
    /// Synthetic processes by service name.
    pids: HashMap<String, u32>,
    /// The last descriptor given out, per synthetic process.
    fds: HashMap<u32, u32>,
    next_conn_id: u64,
    last_ns: u64,
    last_tick_ns: u64,
    summary: Summary,
}

impl Replayer {
    fn new(pipeline: Pipeline) -> Self {
        Replayer {
            pipeline,
            conns: HashMap::new(),
            listeners: HashSet::new(),
            pids: HashMap::new(),
            fds: HashMap::new(),
            next_conn_id: 0,
            last_ns: 0,
            last_tick_ns: 0,
            summary: Summary::default(),
        }
    }

    fn frame(&mut self, frame: &Frame<'_>) {
        self.summary.packets += 1;
        // Capture clocks can step back a little (packets timestamped on several CPUs);
        // the pipeline's times only move forward.
        let now = self.last_ns.max(frame.ts_ns);
        self.last_ns = now;
        if now.saturating_sub(self.last_tick_ns) >= TICK_NS {
            self.last_tick_ns = now;
            self.pipeline.tick(now);
            self.conns
                .retain(|_, c| now.saturating_sub(c.last_ns) < IDLE_NS);
        }
        match ip_of(frame.link, frame.data).and_then(tcp_segment) {
            Some(segment) => self.segment(&segment, now),
            None => self.summary.skipped += 1,
        }
    }

    fn segment(&mut self, seg: &Segment<'_>, now: u64) {
        let key = key_of(seg.src, seg.dst);
        if seg.syn {
            self.handshake(key, seg, now);
        }
        if !self.conns.contains_key(&key) {
            if seg.len == 0 {
                // A bare ACK, FIN or RST of a connection with nothing to show.
                return;
            }
            let (client, server) = self.guess_roles(seg.src, seg.dst);
            self.new_conn(key, client, server, false, now);
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        conn.last_ns = now;
        let from_client = seg.src == conn.client.addr;
        let (flow, reverse) = if from_client {
            (&mut conn.to_server, &mut conn.to_client)
        } else {
            (&mut conn.to_client, &mut conn.to_server)
        };
        let mut out = Vec::new();
        let mut back = Vec::new();
        if !seg.syn {
            flow.segment(seg.seq, seg.len, seg.payload, now, &mut out);
        } else if seg.len > 0 {
            // Data on a SYN (TCP Fast Open) comes after the SYN's own sequence number.
            flow.segment(seg.seq.wrapping_add(1), seg.len, seg.payload, now, &mut out);
        }
        if seg.fin {
            flow.start_at(seg.seq);
            let fin = flow.offset_of(seg.seq) + i128::from(seg.len);
            flow.fin = Some(u64::try_from(fin).unwrap_or(0));
        }
        if let Some(ack) = seg.ack {
            reverse.acknowledged(ack, now, &mut back);
        }
        if seg.rst {
            flow.flush(now, &mut out);
            reverse.flush(now, &mut back);
        }
        let over = seg.rst || (conn.to_server.finished() && conn.to_client.finished());
        deliver(&mut self.pipeline, conn, from_client, &out, now);
        deliver(&mut self.pipeline, conn, !from_client, &back, now);
        if over {
            self.end_conn(key, true, now);
        }
    }

    /// A SYN or SYN-ACK: a new connection, or a retransmission of one known.
    fn handshake(&mut self, key: ConnKey, seg: &Segment<'_>, now: u64) {
        let syn_ack = seg.ack.is_some();
        let (client, server) = if syn_ack {
            (seg.dst, seg.src)
        } else {
            (seg.src, seg.dst)
        };
        if let Some(conn) = self.conns.get(&key) {
            let same = conn.client.addr == client
                && (syn_ack || conn.client_isn.is_none_or(|isn| isn == seg.seq))
                && conn.from_handshake;
            if same {
                if syn_ack {
                    let conn = self.conns.get_mut(&key).expect("checked");
                    conn.to_client.start_at(seg.seq.wrapping_add(1));
                    open_side(&mut self.pipeline, conn, false, now);
                }
                return;
            }
            // The ports are reused by a new connection.
            self.end_conn(key, true, now);
        }
        self.listeners.insert(server);
        self.new_conn(key, client, server, true, now);
        let conn = self.conns.get_mut(&key).expect("just made");
        if syn_ack {
            // The SYN was not captured; the ACK number tells where the client starts.
            conn.to_client.start_at(seg.seq.wrapping_add(1));
            if let Some(ack) = seg.ack {
                conn.to_server.start_at(ack);
            }
            open_side(&mut self.pipeline, conn, true, now);
            open_side(&mut self.pipeline, conn, false, now);
        } else {
            conn.client_isn = Some(seg.seq);
            conn.to_server.start_at(seg.seq.wrapping_add(1));
            open_side(&mut self.pipeline, conn, true, now);
        }
    }

    /// Which end of a connection first seen mid-stream is the client.
    fn guess_roles(&self, a: SocketAddr, b: SocketAddr) -> (SocketAddr, SocketAddr) {
        if self.listeners.contains(&a) && !self.listeners.contains(&b) {
            return (b, a);
        }
        if self.listeners.contains(&b) && !self.listeners.contains(&a) {
            return (a, b);
        }
        if (a.port(), a.ip()) > (b.port(), b.ip()) {
            (a, b)
        } else {
            (b, a)
        }
    }

    fn new_conn(
        &mut self,
        key: ConnKey,
        client: SocketAddr,
        server: SocketAddr,
        from_handshake: bool,
        now: u64,
    ) {
        if self.conns.len() >= MAX_CONNECTIONS {
            let oldest = self
                .conns
                .iter()
                .min_by_key(|(_, c)| c.last_ns)
                .map(|(k, _)| *k);
            if let Some(oldest) = oldest {
                self.end_conn(oldest, false, now);
            }
        }
        let client = End {
            addr: client,
            pid: self.process(client.ip().to_string(), client.ip()),
            fd: 0,
        };
        let server = End {
            addr: server,
            pid: self.process(endpoint_name(server), server.ip()),
            fd: 0,
        };
        let conn = Conn {
            client: End {
                fd: self.new_fd(client.pid),
                ..client
            },
            server: End {
                fd: self.new_fd(server.pid),
                ..server
            },
            from_handshake,
            client_isn: None,
            to_server: Flow::default(),
            to_client: Flow::default(),
            client_opened: false,
            server_opened: false,
            last_ns: now,
            id: self.next_conn_id,
        };
        self.next_conn_id += 1;
        self.summary.connections += 1;
        self.conns.insert(key, conn);
    }

    /// Delivers what a connection still holds and forgets it; `close` tells the
    /// pipeline both ends closed.
    fn end_conn(&mut self, key: ConnKey, close: bool, now: u64) {
        let Some(mut conn) = self.conns.remove(&key) else {
            return;
        };
        let (mut up, mut down) = (Vec::new(), Vec::new());
        conn.to_server.flush(now, &mut up);
        conn.to_client.flush(now, &mut down);
        deliver(&mut self.pipeline, &mut conn, true, &up, now);
        deliver(&mut self.pipeline, &mut conn, false, &down, now);
        self.summary.bytes_missing += conn.to_server.missing + conn.to_client.missing;
        if close {
            close_both(&mut self.pipeline, &conn, now);
        }
    }

    /// The end of the capture: connections a FIN or RST had begun to close are closed,
    /// the others are left open, as a live agent stopping would leave them.
    fn finish(&mut self) {
        let mut open: Vec<(u64, ConnKey, bool)> = self
            .conns
            .iter()
            .map(|(k, c)| {
                (
                    c.id,
                    *k,
                    c.to_server.fin.is_some() || c.to_client.fin.is_some(),
                )
            })
            .collect();
        open.sort_unstable();
        for (_, key, closing) in open {
            self.end_conn(key, closing, self.last_ns);
        }
        self.pipeline.finish_capture();
    }

    /// The pid of the synthetic process named `service`, registered on first use.
    fn process(&mut self, service: String, ip: IpAddr) -> u32 {
        if let Some(&pid) = self.pids.get(&service) {
            return pid;
        }
        let pid = self.pids.len() as u32 + 1;
        self.pipeline.register_process(
            pid,
            Resource {
                service_name: service.clone(),
                pid,
                executable_name: String::new(),
                host_name: ip.to_string(),
                attributes: Vec::new(),
            },
        );
        self.pids.insert(service, pid);
        pid
    }

    fn new_fd(&mut self, pid: u32) -> u32 {
        let fd = self.fds.entry(pid).or_insert(2);
        *fd += 1;
        *fd
    }
}

/// "10.0.0.5:8080", "[::1]:8080".
fn endpoint_name(addr: SocketAddr) -> String {
    addr.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(flow: &mut Flow, steps: &[(u32, &[u8])]) -> Vec<(u64, u64, Vec<u8>)> {
        let mut all = Vec::new();
        for (seq, data) in steps {
            let mut out = Vec::new();
            flow.segment(*seq, data.len() as u64, data, 0, &mut out);
            all.extend(
                out.into_iter()
                    .map(|d| (d.offset, d.len, d.data.into_owned())),
            );
        }
        all
    }

    #[test]
    fn in_order_retransmitted_and_overlapping_segments() {
        let mut f = Flow::default();
        f.start_at(100);
        let got = run(
            &mut f,
            &[(100, b"abc"), (100, b"abc"), (102, b"cdef"), (101, b"b")],
        );
        assert_eq!(got, vec![(0, 3, b"abc".to_vec()), (3, 3, b"def".to_vec())]);
    }

    #[test]
    fn out_of_order_segments_wait_for_the_hole() {
        let mut f = Flow::default();
        f.start_at(0);
        let got = run(&mut f, &[(3, b"def"), (6, b"g"), (0, b"abc")]);
        assert_eq!(
            got,
            vec![
                (0, 3, b"abc".to_vec()),
                (3, 3, b"def".to_vec()),
                (6, 1, b"g".to_vec())
            ]
        );
    }

    #[test]
    fn sequence_numbers_wrap() {
        let mut f = Flow::default();
        f.start_at(u32::MAX - 1);
        let got = run(&mut f, &[(0, b"cd"), (u32::MAX - 1, b"ab"), (2, b"e")]);
        assert_eq!(
            got,
            vec![
                (0, 2, b"ab".to_vec()),
                (2, 2, b"cd".to_vec()),
                (4, 1, b"e".to_vec())
            ]
        );
    }

    #[test]
    fn an_acknowledged_hole_is_skipped() {
        let mut f = Flow::default();
        f.start_at(0);
        assert!(run(&mut f, &[(0, b"ab"), (4, b"ef")]).len() == 1);
        let mut out = Vec::new();
        f.acknowledged(6, 0, &mut out);
        let got: Vec<_> = out
            .into_iter()
            .map(|d| (d.offset, d.len, d.data.into_owned()))
            .collect();
        assert_eq!(got, vec![(4, 2, b"ef".to_vec())]);
        assert_eq!(f.missing, 2);
        // A hole at the end, acknowledged, is a delivery without bytes.
        let mut out = Vec::new();
        f.acknowledged(9, 0, &mut out);
        assert_eq!((out[0].offset, out[0].len, out[0].data.len()), (6, 3, 0));
    }

    #[test]
    fn a_hole_is_given_up_after_the_timeout() {
        let mut f = Flow::default();
        f.start_at(0);
        let mut out = Vec::new();
        f.segment(0, 2, b"ab", 0, &mut out);
        f.segment(4, 2, b"ef", 1_000, &mut out);
        f.segment(6, 2, b"gh", HOLE_TIMEOUT_NS / 2, &mut out);
        assert_eq!(out.len(), 1, "still waiting for bytes 2..4");
        f.segment(8, 2, b"ij", HOLE_TIMEOUT_NS + 1_000, &mut out);
        let offsets: Vec<u64> = out.iter().map(|d| d.offset).collect();
        assert_eq!(offsets, [0, 4, 6, 8]);
        assert_eq!(f.missing, 2);
    }

    #[test]
    fn held_bytes_are_bounded() {
        let mut f = Flow::default();
        f.start_at(0);
        let big = vec![b'x'; 600_000];
        let got = run(&mut f, &[(10, &big), (700_000, &big)]);
        assert_eq!(
            got.len(),
            1,
            "the first held segment goes once the bound is passed"
        );
        assert_eq!(got[0].0, 10);
        assert!(f.held_bytes <= MAX_HELD_BYTES);
    }

    #[test]
    fn pcapng_timestamp_resolutions() {
        let i = |r| Interface {
            link: DataLink::ETHERNET,
            ts_resolution: r,
            ts_offset_s: 0,
        };
        assert_eq!(i(6).ns(1_500_000), 1_500_000_000);
        assert_eq!(i(9).ns(7), 7);
        assert_eq!(i(0x80 | 10).ns(1024), 1_000_000_000);
    }
}
