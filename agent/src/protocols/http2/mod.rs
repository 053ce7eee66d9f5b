//! Incremental HTTP/2 parser (RFC 9113) for one connection, both directions.
//!
//! Each stream becomes the same [`HttpExchange`] the HTTP/1.x parser produces, so that
//! spans, context linking, order ids and stalls are the HTTP path's: the request's
//! pseudo-headers give its method (`:method`) and target (`:path`), the other fields
//! (`:authority` included) are its headers, and the response's trailers are appended
//! to the response's headers (that is where gRPC's `grpc-status` is). The stream id is
//! the exchange's `seq`; `version` is 2.
//!
//! - Detection: the client connection preface makes a connection HTTP/2, in the
//!   direction that carries it the requests. The server's SETTINGS may come first.
//!   A connection that predates the agent (the pipeline calls `resync` on both
//!   directions first) has no preface: a piece of bytes that is made of plausible
//!   frames from its first byte (a write or read of whole frames, as HTTP/2 stacks
//!   make them) is taken as aligned, and a header block with `:method` or `:status`
//!   decides which direction carries requests. Its HPACK tables are unknown
//!   ([`hpack`]): what the static table and literals give is kept, fields that refer
//!   to unknown entries are left out (never a made-up method or path) and the
//!   request head says so (`header_table_unknown`), counted.
//! - Frames: HEADERS and CONTINUATION (one header block, padding and priority
//!   removed), DATA (body sizes and a captured prefix; padding removed), RST_STREAM
//!   (the stream ends; without a whole response it is incomplete), PUSH_PROMISE (its
//!   block is decoded to keep the table right, then dropped); SETTINGS, PING, GOAWAY,
//!   WINDOW_UPDATE, PRIORITY and unknown types are skipped.
//! - Losses: a gap inside a DATA payload is body. Anywhere else, or a frame that
//!   cannot be, loses the direction: its HPACK table becomes unknown and the parser
//!   waits for a piece that starts with plausible frames, as on a connection that
//!   predates the agent.
//! - Memory is bounded: at most [`MAX_STREAMS`] open streams (more are not followed),
//!   header blocks of at most [`MAX_HEADER_BLOCK`] bytes (a larger one is skipped and
//!   the table becomes unknown), [`hpack::MAX_TABLE_SIZE`] per table, the HTTP/1.x
//!   limits for bodies and finished exchanges. What is dropped is counted in
//!   [`COUNTERS`].

pub mod hpack;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};

use agent_common::Direction;

use self::hpack::{Block, Decoder};
use super::http::{
    HttpExchange, MAX_BODY_CAPTURE, MAX_FINISHED, MAX_HEADER_VALUE, MAX_KEPT_HEADERS, RequestHead,
    ResponseHead,
};
use super::{Parsed, ProtocolParser, Started};
use crate::conn::{EndReason, Role};

/// The client connection preface (RFC 9113 section 3.4).
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Most streams followed at once on one connection.
pub const MAX_STREAMS: usize = 100;
/// Largest header block (HEADERS and its CONTINUATIONs) decoded.
pub const MAX_HEADER_BLOCK: usize = 64 * 1024;
/// Bytes looked at for a first frame on a connection that started with a gap, before
/// it is declared not HTTP/2.
const MAX_UNDECIDED_SCAN: u64 = 64 * 1024;
/// Largest frame payload taken as plausible when looking for frames after a loss
/// (the largest SETTINGS_MAX_FRAME_SIZE stacks use by default is 16 KiB; some raise it).
const MAX_PLAUSIBLE_FRAME: u32 = 1 << 20;

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const PRIORITY: u8 = 0x2;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PUSH_PROMISE: u8 = 0x5;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;
const CONTINUATION: u8 = 0x9;

const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY_FLAG: u8 = 0x20;

/// What the HTTP/2 parsers dropped or could only partly read, for /metrics.
#[derive(Debug, Default)]
pub struct Counters {
    /// Streams not followed because [`MAX_STREAMS`] were open.
    pub streams_dropped: AtomicU64,
    /// Header blocks larger than [`MAX_HEADER_BLOCK`].
    pub blocks_too_large: AtomicU64,
    /// Header blocks HPACK could not decode.
    pub blocks_undecodable: AtomicU64,
    /// Directions that lost their frame boundaries (a gap, or bytes that are no frame).
    pub sync_lost: AtomicU64,
    /// Requests whose header block referred to table entries that are unknown.
    pub table_unknown: AtomicU64,
}

/// The counters of every HTTP/2 parser in the process.
pub static COUNTERS: Counters = Counters {
    streams_dropped: AtomicU64::new(0),
    blocks_too_large: AtomicU64::new(0),
    blocks_undecodable: AtomicU64::new(0),
    sync_lost: AtomicU64::new(0),
    table_unknown: AtomicU64::new(0),
};

fn count(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// A frame's header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FrameHead {
    len: u32,
    ty: u8,
    flags: u8,
    stream: u32,
}

impl FrameHead {
    fn parse(b: &[u8; 9]) -> Self {
        FrameHead {
            len: u32::from_be_bytes([0, b[0], b[1], b[2]]),
            ty: b[3],
            flags: b[4],
            stream: u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & 0x7fff_ffff,
        }
    }

    /// Whether a frame like this one can be (RFC 9113 section 6): the types that
    /// belong to a stream have one, the others none, and fixed sizes are right.
    /// Unknown types are valid (and skipped).
    fn valid(&self) -> bool {
        self.ty > CONTINUATION || self.known_and_valid()
    }

    /// As [`FrameHead::valid`], for a known type of a size stacks send: what a piece's
    /// first bytes must be to be taken as frames after a loss.
    fn plausible(&self) -> bool {
        self.len <= MAX_PLAUSIBLE_FRAME && self.known_and_valid()
    }

    fn known_and_valid(&self) -> bool {
        let on_stream = self.stream != 0;
        match self.ty {
            DATA | HEADERS | CONTINUATION | PUSH_PROMISE => on_stream,
            PRIORITY => on_stream && self.len == 5,
            RST_STREAM => on_stream && self.len == 4,
            SETTINGS => !on_stream && self.len.is_multiple_of(6) && self.flags & !1 == 0,
            PING => !on_stream && self.len == 8,
            GOAWAY => !on_stream && self.len >= 8,
            WINDOW_UPDATE => self.len == 4,
            _ => false,
        }
    }
}

/// Whether `data` starts with whole plausible frames (the last one may run past its
/// end), at least one of them a HEADERS frame, or is exactly plausible frames.
fn starts_with_frames(data: &[u8]) -> bool {
    let mut at = 0usize;
    let mut frames = 0;
    while at + 9 <= data.len() {
        let head = FrameHead::parse(data[at..at + 9].try_into().expect("9 bytes"));
        if !head.plausible() {
            return false;
        }
        frames += 1;
        at += 9 + head.len as usize;
    }
    frames > 0 && at >= data.len()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// This many bytes of the preface were read (the request direction, from the start).
    Preface(usize),
    /// In a frame header (its bytes so far are in `head`).
    Head,
    /// In a frame's payload.
    Payload { frame: FrameHead, left: u32 },
    /// Frame boundaries lost (or never known): waiting for a piece that starts with
    /// frames.
    Lost,
}

/// One direction of the connection.
#[derive(Debug)]
struct Half {
    phase: Phase,
    head: [u8; 9],
    head_len: usize,
    /// The payload of the current frame, for frames whose payload is read whole.
    payload: Vec<u8>,
    /// The current DATA frame's padding: `None` until its pad length byte is read.
    data_pad: Option<u32>,
    /// The header block being put together, its stream, and its END_STREAM flag.
    block: Vec<u8>,
    block_stream: u32,
    block_end_stream: bool,
    block_push: bool,
    block_too_large: bool,
    /// A CONTINUATION must come next.
    in_block: bool,
    /// When the current frame's first byte moved.
    frame_start_ns: u64,
    hpack: Decoder,
    /// Bytes looked at while undecided and lost.
    scanned: u64,
    /// Bytes seen at all.
    seen: u64,
    /// Header blocks decoded.
    blocks: u64,
}

impl Half {
    fn new() -> Self {
        Half {
            phase: Phase::Head,
            head: [0; 9],
            head_len: 0,
            payload: Vec::new(),
            data_pad: None,
            block: Vec::new(),
            block_stream: 0,
            block_end_stream: false,
            block_push: false,
            block_too_large: false,
            in_block: false,
            frame_start_ns: 0,
            hpack: Decoder::new(),
            scanned: 0,
            seen: 0,
            blocks: 0,
        }
    }

    fn lose(&mut self) {
        self.phase = Phase::Lost;
        self.head_len = 0;
        self.payload = Vec::new();
        self.block = Vec::new();
        self.in_block = false;
        self.hpack.lose();
    }
}

/// One stream: its exchange as it stands.
#[derive(Debug)]
struct Stream {
    exchange: HttpExchange,
    request_done: bool,
    started_sent: bool,
    /// The final response head arrived.
    responded: bool,
}

/// Parser state of one connection. See the module documentation.
#[derive(Debug)]
pub struct Http2Parser {
    halves: [Half; 2],
    decided: Option<bool>,
    request_dir: Option<Direction>,
    streams: BTreeMap<u32, Stream>,
    finished: VecDeque<HttpExchange>,
    started: Vec<Started>,
    /// Added to stream ids to make exchange numbers: above the HTTP/1.1 exchanges'
    /// on a connection upgraded from HTTP/1.1, 0 otherwise.
    seq_base: u64,
}

impl Default for Http2Parser {
    fn default() -> Self {
        Self::new()
    }
}

impl Http2Parser {
    pub fn new() -> Self {
        Http2Parser {
            halves: [Half::new(), Half::new()],
            decided: None,
            request_dir: None,
            streams: BTreeMap::new(),
            finished: VecDeque::new(),
            started: Vec::new(),
            seq_base: 0,
        }
    }

    /// The parser of a connection that switched from HTTP/1.1 with a 101 to `h2c`
    /// (RFC 7540 section 3.2): `upgrading`, the HTTP/1.1 request (already announced),
    /// is stream 1 and waits for its response there; the client's preface comes next
    /// in `request_dir`; exchanges of later streams are numbered from `seq_base` on.
    pub fn after_upgrade(upgrading: HttpExchange, request_dir: Direction, seq_base: u64) -> Self {
        let mut p = Self::new();
        p.decided = Some(true);
        p.request_dir = Some(request_dir);
        p.seq_base = seq_base;
        p.halves[request_dir.index()].phase = Phase::Preface(0);
        p.streams.insert(
            1,
            Stream {
                exchange: upgrading,
                request_done: true,
                started_sent: true,
                responded: false,
            },
        );
        p
    }

    fn role(&self) -> Role {
        match self.request_dir {
            Some(Direction::Egress) => Role::Client,
            _ => Role::Server,
        }
    }

    fn decide(&mut self, request_dir: Direction) {
        if self.decided.is_none() {
            self.decided = Some(true);
            self.request_dir = Some(request_dir);
        }
    }

    fn refuse(&mut self) {
        if self.decided.is_none() {
            self.decided = Some(false);
            self.streams.clear();
        }
    }

    fn feed_bytes(&mut self, dir: Direction, mut data: &[u8], ts_ns: u64) {
        if self.decided == Some(false) {
            return;
        }
        let first = self.halves[dir.index()].seen == 0;
        let h = &mut self.halves[dir.index()];
        h.seen = h.seen.saturating_add(data.len() as u64);
        if first && self.decided.is_none() && self.halves[dir.index()].phase == Phase::Head {
            if PREFACE.starts_with(&data[..data.len().min(PREFACE.len())]) {
                self.halves[dir.index()].phase = Phase::Preface(0);
            } else if !(data.len() >= 9
                && FrameHead::parse(data[..9].try_into().expect("9 bytes")).ty == SETTINGS
                && starts_with_frames(data))
            {
                // Neither the preface nor the server's first SETTINGS.
                self.refuse();
                return;
            }
        }
        while !data.is_empty() {
            let h = &mut self.halves[dir.index()];
            match h.phase {
                Phase::Preface(n) => {
                    let take = (PREFACE.len() - n).min(data.len());
                    if data[..take] != PREFACE[n..n + take] {
                        self.refuse();
                        self.lose_sync(dir);
                        return;
                    }
                    data = &data[take..];
                    if n + take == PREFACE.len() {
                        h.phase = Phase::Head;
                        self.decide(dir);
                    } else {
                        h.phase = Phase::Preface(n + take);
                    }
                }
                Phase::Head => {
                    if h.head_len == 0 {
                        h.frame_start_ns = ts_ns;
                    }
                    let take = (9 - h.head_len).min(data.len());
                    h.head[h.head_len..h.head_len + take].copy_from_slice(&data[..take]);
                    h.head_len += take;
                    data = &data[take..];
                    if h.head_len == 9 {
                        h.head_len = 0;
                        let frame = FrameHead::parse(&h.head);
                        self.start_frame(dir, frame, ts_ns);
                    }
                }
                Phase::Payload { frame, left } => {
                    let take = (left as usize).min(data.len());
                    self.payload_bytes(dir, frame, &data[..take]);
                    data = &data[take..];
                    self.advance(dir, frame, left - take as u32, ts_ns);
                }
                Phase::Lost => {
                    // The connection's start after all (a connect the agent did not see
                    // complete): both tables are new, unless the other side already sent
                    // header blocks, which it cannot have before the preface.
                    if data.starts_with(&PREFACE[..4])
                        && PREFACE.starts_with(&data[..data.len().min(24)])
                    {
                        h.phase = Phase::Preface(0);
                        h.hpack = Decoder::new();
                        let other = &mut self.halves[dir.opposite().index()];
                        if other.blocks == 0 {
                            other.hpack = Decoder::new();
                        }
                        continue;
                    }
                    // Only a piece's first byte may start frames.
                    if starts_with_frames(data) {
                        h.phase = Phase::Head;
                        continue;
                    }
                    if self.decided.is_none() {
                        h.scanned += data.len() as u64;
                        if h.scanned > MAX_UNDECIDED_SCAN {
                            self.refuse();
                        }
                    }
                    return;
                }
            }
        }
    }

    /// A frame's header was read whole.
    fn start_frame(&mut self, dir: Direction, frame: FrameHead, ts_ns: u64) {
        let h = &mut self.halves[dir.index()];
        let bad = (h.in_block && (frame.ty != CONTINUATION || frame.stream != h.block_stream))
            || (!h.in_block && frame.ty == CONTINUATION)
            || !frame.valid();
        if bad {
            self.lose_sync(dir);
            return;
        }
        h.payload.clear();
        h.data_pad = None;
        h.phase = Phase::Payload {
            frame,
            left: frame.len,
        };
        if frame.len == 0 {
            self.advance(dir, frame, 0, ts_ns);
        }
    }

    /// Payload bytes of the current frame.
    fn payload_bytes(&mut self, dir: Direction, frame: FrameHead, mut bytes: &[u8]) {
        let is_request = self.request_dir == Some(dir);
        let h = &mut self.halves[dir.index()];
        match frame.ty {
            DATA => {
                let Phase::Payload { mut left, .. } = h.phase else {
                    return;
                };
                if frame.flags & PADDED != 0 && h.data_pad.is_none() {
                    let Some((&pad, rest)) = bytes.split_first() else {
                        return;
                    };
                    h.data_pad = Some(u32::from(pad));
                    bytes = rest;
                    left -= 1;
                }
                // Padding is at the end of the frame.
                let content_left = left.saturating_sub(h.data_pad.unwrap_or(0)) as usize;
                let bytes = &bytes[..bytes.len().min(content_left)];
                if let Some(s) = self.streams.get_mut(&frame.stream) {
                    add_body(&mut s.exchange, is_request, bytes.len() as u64, Some(bytes));
                }
            }
            HEADERS | CONTINUATION | PUSH_PROMISE | RST_STREAM => {
                let room = MAX_HEADER_BLOCK.saturating_sub(h.payload.len() + h.block.len());
                if bytes.len() > room {
                    h.block_too_large = true;
                } else if !h.block_too_large {
                    h.payload.extend_from_slice(bytes);
                }
            }
            _ => {}
        }
    }

    /// `left` payload bytes of `frame` remain; at 0 the frame is done.
    fn advance(&mut self, dir: Direction, frame: FrameHead, left: u32, ts_ns: u64) {
        let h = &mut self.halves[dir.index()];
        if left > 0 {
            h.phase = Phase::Payload { frame, left };
            return;
        }
        h.phase = Phase::Head;
        self.end_frame(dir, frame, ts_ns);
    }

    fn end_frame(&mut self, dir: Direction, frame: FrameHead, ts_ns: u64) {
        let is_request = self.request_dir == Some(dir);
        let h = &mut self.halves[dir.index()];
        match frame.ty {
            HEADERS | PUSH_PROMISE => {
                let payload = std::mem::take(&mut h.payload);
                let mut p = &payload[..];
                if frame.flags & PADDED != 0 {
                    let pad = p.first().copied().unwrap_or(0) as usize;
                    p = p.get(1..p.len().saturating_sub(pad)).unwrap_or_default();
                }
                if frame.ty == HEADERS && frame.flags & PRIORITY_FLAG != 0 {
                    p = p.get(5..).unwrap_or_default();
                }
                if frame.ty == PUSH_PROMISE {
                    p = p.get(4..).unwrap_or_default();
                }
                h.block.clear();
                h.block.extend_from_slice(p);
                h.block_stream = frame.stream;
                h.block_end_stream = frame.ty == HEADERS && frame.flags & END_STREAM != 0;
                h.block_push = frame.ty == PUSH_PROMISE;
                if frame.flags & END_HEADERS != 0 {
                    self.end_block(dir, ts_ns);
                } else {
                    h.in_block = true;
                }
            }
            CONTINUATION => {
                let payload = std::mem::take(&mut h.payload);
                h.block.extend_from_slice(&payload);
                if frame.flags & END_HEADERS != 0 {
                    self.end_block(dir, ts_ns);
                }
            }
            DATA => {
                if frame.flags & END_STREAM != 0 {
                    self.end_side(frame.stream, is_request, ts_ns);
                } else if let Some(s) = self.streams.get_mut(&frame.stream) {
                    set_end(&mut s.exchange, is_request, ts_ns);
                }
            }
            RST_STREAM => {
                h.payload.clear();
                if let Some(s) = self.streams.remove(&frame.stream) {
                    self.finish(s, Some(EndReason::StreamReset), ts_ns);
                }
            }
            _ => {}
        }
    }

    /// A header block is complete.
    fn end_block(&mut self, dir: Direction, ts_ns: u64) {
        let h = &mut self.halves[dir.index()];
        h.in_block = false;
        let (stream, end_stream, push) = (h.block_stream, h.block_end_stream, h.block_push);
        let start_ns = h.frame_start_ns;
        if std::mem::take(&mut h.block_too_large) {
            count(&COUNTERS.blocks_too_large);
            h.hpack.lose();
            h.block = Vec::new();
            return;
        }
        let decoded = h.hpack.decode(&h.block);
        h.blocks += 1;
        h.block.clear();
        h.block.shrink_to(4096);
        let block = match decoded {
            Ok(b) => b,
            Err(_) => {
                count(&COUNTERS.blocks_undecodable);
                return;
            }
        };
        if push {
            return;
        }
        let has = |name: &str| block.fields.iter().any(|(n, _)| n == name);
        if self.decided.is_none() {
            // A connection that predates the agent: the first block that says what it
            // is decides.
            if has(":method") {
                self.decide(dir);
            } else if has(":status") {
                self.decide(dir.opposite());
            } else {
                return;
            }
        }
        if self.request_dir == Some(dir) {
            self.request_headers(stream, block, end_stream, start_ns, ts_ns);
        } else {
            self.response_headers(stream, block, end_stream, start_ns, ts_ns);
        }
    }

    fn request_headers(
        &mut self,
        stream: u32,
        block: Block,
        end_stream: bool,
        start_ns: u64,
        ts_ns: u64,
    ) {
        if !self.streams.contains_key(&stream) {
            if self.streams.len() >= MAX_STREAMS {
                count(&COUNTERS.streams_dropped);
                return;
            }
            let unknown = block.unknown;
            let request = request_head(block);
            if unknown {
                count(&COUNTERS.table_unknown);
            }
            let mut exchange = HttpExchange::started(
                self.role(),
                self.seq_base + u64::from(stream),
                request.into(),
                start_ns,
            );
            exchange.request_end_ns = ts_ns;
            self.streams.insert(
                stream,
                Stream {
                    exchange,
                    request_done: false,
                    started_sent: false,
                    responded: false,
                },
            );
        }
        // A second block on the request side is its trailers: nothing kept from them.
        if end_stream {
            self.end_side(stream, true, ts_ns);
        }
    }

    fn response_headers(
        &mut self,
        stream: u32,
        block: Block,
        end_stream: bool,
        start_ns: u64,
        ts_ns: u64,
    ) {
        let Some(s) = self.streams.get_mut(&stream) else {
            // A stream that began before the agent watched, or one not followed.
            return;
        };
        if !s.responded {
            let status = block
                .fields
                .iter()
                .find(|(n, _)| n == ":status")
                .and_then(|(_, v)| v.parse::<u16>().ok());
            match status {
                Some(st) if (100..200).contains(&st) => return,
                Some(st) => {
                    s.responded = true;
                    s.exchange.response_start_ns = start_ns;
                    s.exchange.response_end_ns = ts_ns;
                    s.exchange.response = Some(ResponseHead {
                        status: st,
                        reason: String::new(),
                        version: 2,
                        headers: kept(block.fields),
                    });
                }
                // No status: unknown in the table, or not a response at all.
                None => {
                    if block.unknown {
                        count(&COUNTERS.table_unknown);
                    }
                    return;
                }
            }
            if !s.started_sent {
                s.started_sent = true;
                let started = started_of(&s.exchange);
                self.started.push(started);
            }
        } else if let Some(resp) = s.exchange.response.as_mut() {
            // Trailers.
            for f in kept(block.fields) {
                if resp.headers.len() < MAX_KEPT_HEADERS {
                    resp.headers.push(f);
                }
            }
            s.exchange.response_end_ns = ts_ns;
        }
        if end_stream {
            self.end_side(stream, false, ts_ns);
        }
    }

    /// One side of a stream ended (END_STREAM).
    fn end_side(&mut self, stream: u32, request: bool, ts_ns: u64) {
        let Some(s) = self.streams.get_mut(&stream) else {
            return;
        };
        set_end(&mut s.exchange, request, ts_ns);
        if request {
            s.request_done = true;
            if !s.started_sent {
                s.started_sent = true;
                let started = started_of(&s.exchange);
                self.started.push(started);
            }
            return;
        }
        if s.responded {
            let s = self.streams.remove(&stream).expect("present");
            self.finish(s, None, ts_ns);
        }
    }

    fn finish(&mut self, mut s: Stream, reason: Option<EndReason>, _ts_ns: u64) {
        if !s.started_sent {
            self.started.push(started_of(&s.exchange));
        }
        if reason.is_some() && !(s.responded && s.request_done) {
            s.exchange.incomplete = reason;
        }
        if self.finished.len() >= MAX_FINISHED {
            self.finished.pop_front();
        }
        self.finished.push_back(s.exchange);
    }

    fn lose_sync(&mut self, dir: Direction) {
        if self.decided == Some(true) {
            count(&COUNTERS.sync_lost);
        }
        self.halves[dir.index()].lose();
    }
}

fn set_end(ex: &mut HttpExchange, request: bool, ts_ns: u64) {
    if request {
        ex.request_end_ns = ts_ns;
    } else {
        ex.response_end_ns = ts_ns;
    }
}

fn add_body(ex: &mut HttpExchange, request: bool, len: u64, bytes: Option<&[u8]>) {
    let (size, body) = if request {
        (&mut ex.request_body_size, &mut ex.request_body)
    } else {
        (&mut ex.response_body_size, &mut ex.response_body)
    };
    // The prefix stays contiguous: after uncaptured bytes nothing more is kept.
    let contiguous = *size == body.len() as u64;
    *size += len;
    if let Some(b) = bytes
        && contiguous
    {
        let room = MAX_BODY_CAPTURE.saturating_sub(body.len());
        body.extend_from_slice(&b[..b.len().min(room)]);
    }
}

fn started_of(ex: &HttpExchange) -> Started {
    Started::Http {
        seq: ex.seq,
        role: ex.role,
        request: ex.request.clone(),
        body: ex.request_body.clone(),
        start_ns: ex.request_start_ns,
    }
}

/// Fields as HTTP/1.x heads keep them: at most [`MAX_KEPT_HEADERS`], values cut at
/// [`MAX_HEADER_VALUE`] on a character boundary.
fn kept(fields: Vec<(String, String)>) -> Vec<(String, String)> {
    fields
        .into_iter()
        .take(MAX_KEPT_HEADERS)
        .map(|(n, mut v)| {
            if v.len() > MAX_HEADER_VALUE {
                let mut cut = MAX_HEADER_VALUE;
                while !v.is_char_boundary(cut) {
                    cut -= 1;
                }
                v.truncate(cut);
            }
            (n, v)
        })
        .collect()
}

/// The request head of a stream: `:method` and `:path` when they were decoded (empty
/// when not: never guessed).
fn request_head(block: Block) -> RequestHead {
    let unknown = block.unknown;
    let pseudo = |name: &str| {
        block
            .fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    RequestHead {
        method: pseudo(":method"),
        target: pseudo(":path"),
        version: 2,
        header_table_unknown: unknown,
        headers: kept(block.fields),
    }
}

impl ProtocolParser for Http2Parser {
    fn detect(&self) -> Option<bool> {
        self.decided
    }

    fn feed(&mut self, dir: Direction, data: &[u8], ts_ns: u64) {
        self.feed_bytes(dir, data, ts_ns);
    }

    fn skip(&mut self, dir: Direction, len: u64, _ts_ns: u64) {
        if self.decided == Some(false) {
            return;
        }
        let is_request = self.request_dir == Some(dir);
        let h = &mut self.halves[dir.index()];
        h.seen = h.seen.saturating_add(len);
        match h.phase {
            Phase::Payload { frame, left }
                if frame.ty == DATA
                    && u64::from(left) >= len
                    && (h.data_pad.is_some() || frame.flags & PADDED == 0) =>
            {
                let pad = u64::from(h.data_pad.unwrap_or(0));
                let content = len.min(u64::from(left).saturating_sub(pad));
                h.phase = Phase::Payload {
                    frame,
                    left: left - len as u32,
                };
                if let Some(s) = self.streams.get_mut(&frame.stream) {
                    add_body(&mut s.exchange, is_request, content, None);
                }
                if left as u64 == len {
                    let ts = self.halves[dir.index()].frame_start_ns;
                    self.advance(dir, frame, 0, ts);
                }
            }
            Phase::Lost => {}
            _ => self.lose_sync(dir),
        }
    }

    fn resync(&mut self, dir: Direction) {
        if self.decided == Some(false) {
            return;
        }
        self.lose_sync(dir);
    }

    fn close(&mut self, ts_ns: u64, reason: EndReason) {
        if self.decided != Some(true) {
            return;
        }
        for (_, s) in std::mem::take(&mut self.streams) {
            self.finish(s, Some(reason), ts_ns);
        }
    }

    fn tick(&mut self, _now_ns: u64) {}

    fn take(&mut self, out: &mut Vec<Parsed>) {
        out.extend(self.started.drain(..).map(Parsed::Started));
        out.extend(self.finished.drain(..).map(Parsed::Http));
    }

    fn next_message_in(&self, dir: Direction) -> Option<u64> {
        match self.halves[dir.index()].phase {
            Phase::Payload { left, .. } => Some(u64::from(left)),
            Phase::Head if self.halves[dir.index()].head_len == 0 => Some(0),
            _ => None,
        }
    }

    fn in_sync(&self, dir: Direction) -> bool {
        self.halves[dir.index()].phase != Phase::Lost
    }
}
