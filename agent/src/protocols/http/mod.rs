//! Incremental HTTP/1.x parser for one connection, both directions.
//!
//! The parser reads each direction's byte stream as [`crate::reassembly`] hands it over:
//! bytes, gaps of known length ([`HttpParser::skip`]) and gaps of unknown length
//! ([`HttpParser::resync`]). It turns it into [`HttpExchange`]s: a request head paired
//! with the response head that answers it, times, body sizes and a body prefix.
//!
//! - Detection: the first bytes of a connection decide. A request line or a status line
//!   makes it HTTP once its head parses; anything else (TLS records, the AMQP or HTTP/2
//!   prefaces, binary) makes it not HTTP for good and never yields an exchange. A
//!   connection that predates the agent starts mid-stream: call `resync` on both
//!   directions first and the parser looks for the first message boundary instead.
//! - Heads are parsed with httparse once their empty line has arrived; a head longer
//!   than [`MAX_HEAD`] is not HTTP (or, once decided, a loss of sync).
//! - Bodies: Content-Length, chunked (trailers included), until close; none for HEAD,
//!   1xx, 204 and 304. 1xx responses other than 101 are skipped. After 101 or a
//!   successful CONNECT the connection carries another protocol and is not parsed,
//!   except a 101 to `h2c`: the HTTP/2 parser takes over ([`ProtocolParser::upgrade`]),
//!   and the upgrading request's response is the one it reads on stream 1.
//! - Pairing is first in, first out, which covers keep-alive and pipelining. A response
//!   never pairs with a request that started after it.
//! - Losses: a gap inside a Content-Length, chunk-data or until-close body just counts
//!   as body. A gap anywhere else, or bytes that do not parse, lose the direction's
//!   sync: the message in flight is dropped (its exchange is never emitted) and the
//!   direction scans for the next line that looks like a request line or a status
//!   line. A request lost that way leaves a placeholder so that its response is
//!   dropped too. After the response direction resynchronises, the first response found
//!   pairs with the newest request that started before it and the older unanswered
//!   ones are dropped: right for clients that wait for each response, a guess when
//!   requests were pipelined into the gap.
//! - Ends: when the connection ends ([`HttpParser::end`], with the reason the connection
//!   table gives), every exchange still open is emitted as it stands and marked
//!   incomplete with that reason: a request without a response, a response cut short,
//!   a request whose body was still arriving. A body delimited by the close ends
//!   normally when the socket really closed.
//! - Message windows: [`HttpParser::next_message_in`] tells, inside a body whose length
//!   is known, how many bytes are left before the next head (or chunk line), so that
//!   the kernel can copy bytes from there even when one read holds the end of a large
//!   body and the start of the next message.
//! - Memory is bounded whatever the input: one head or line buffer per direction, at
//!   most [`MAX_IN_FLIGHT`] unanswered exchanges and [`MAX_FINISHED`] untaken ones, a
//!   body prefix of [`MAX_BODY_CAPTURE`] bytes each.
//!
//! Where things are: `head` recognises start lines and parses heads (httparse), `body`
//! reads bodies, `exchanges` pairs requests with responses and emits them; this module
//! holds the state, the entry points, head reading and the scan after a loss of sync.

mod body;
mod exchanges;
mod head;

use std::collections::VecDeque;

use agent_common::Direction;

pub use self::head::{MAX_HEADER_VALUE, MAX_KEPT_HEADERS, RequestHead, ResponseHead};
use self::{
    exchanges::InFlight,
    head::{Fit, Framing, FramingHeaders, Kind},
};
use super::{Parsed, ProtocolParser};
use crate::conn::{EndReason, Role};

/// Longest head (start line and headers) accepted.
pub const MAX_HEAD: usize = 64 * 1024;
/// Body bytes kept per message, after chunked framing is removed.
pub const MAX_BODY_CAPTURE: usize = 16 * 1024;
/// Longest chunk-size line (with extensions) or trailer line.
const MAX_LINE: usize = 4 * 1024;
/// Most trailer bytes after a chunked body.
const MAX_TRAILERS: usize = 64 * 1024;
/// Most exchanges waiting for their response; beyond that the oldest is dropped.
pub const MAX_IN_FLIGHT: usize = 64;
/// Most finished exchanges kept until [`HttpParser::take_exchanges`]; beyond that the
/// oldest are dropped.
pub const MAX_FINISHED: usize = 1024;
/// Bytes scanned for a first message on a connection that started with a gap, before
/// it is declared not HTTP.
const MAX_UNDECIDED_SCAN: u64 = 64 * 1024;

/// One request and the response that answered it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpExchange {
    pub role: Role,
    /// The exchange's number on its connection, as in [`super::Started::Http`].
    pub seq: u64,
    /// Shared with the [`super::Started::Http`] that announced it.
    pub request: std::sync::Arc<RequestHead>,
    /// `None` when the connection closed before a response arrived.
    pub response: Option<ResponseHead>,
    /// Monotonic ns of the syscall that carried the request's first byte.
    pub request_start_ns: u64,
    /// Monotonic ns of the syscall that carried the request's last byte.
    pub request_end_ns: u64,
    /// As for the request; 0 without a response.
    pub response_start_ns: u64,
    pub response_end_ns: u64,
    /// Body bytes (after chunked decoding), captured or not.
    pub request_body_size: u64,
    pub response_body_size: u64,
    /// The body's first bytes, at most [`MAX_BODY_CAPTURE`]; shorter than the body
    /// when bytes were not captured.
    pub request_body: Vec<u8>,
    pub response_body: Vec<u8>,
    /// The connection ended, for this reason, before the exchange did: no response, a
    /// response cut short, or a request still arriving. Its end times are those of the
    /// last byte seen.
    pub incomplete: Option<EndReason>,
}

/// Where in a chunked body a direction is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Chunk {
    /// In a chunk-size line (the line so far is in the buffer).
    Size,
    /// This many bytes of chunk data are left.
    Data(u64),
    /// After chunk data, before its line end.
    DataEnd,
    /// In the trailer section (the current line is in the buffer).
    Trailer,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Body {
    Length(u64),
    Chunked(Chunk),
    UntilClose,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Expecting or inside a head (its bytes so far are in the buffer).
    Head,
    Body(Body),
    /// Sync lost: scanning for a start line. `at_line_start` when the next byte may
    /// begin one.
    Lost {
        at_line_start: bool,
    },
    /// Nothing more to parse in this direction.
    Stopped,
}

/// One direction of the connection.
#[derive(Debug)]
struct Half {
    /// What this direction carries, once known.
    kind: Option<Kind>,
    phase: Phase,
    /// The head so far, a chunk-size or trailer line, or a candidate start line.
    buf: Vec<u8>,
    /// The start line in `buf` has been recognised.
    line_ok: bool,
    /// Progress towards the empty line that ends a head: 1 after LF, 2 after LF CR.
    eoh: u8,
    /// Time of the first byte of the current message.
    start_ns: u64,
    /// Time of the last byte consumed.
    last_ns: u64,
    /// Sequence number of the exchange the current message belongs to.
    target: Option<u64>,
    /// The current body's captured prefix is still contiguous.
    capturing: bool,
    trailer_bytes: usize,
    /// This direction lost bytes at some point.
    gapped: bool,
    /// Response direction: the next response follows a loss of sync.
    resynced: bool,
    /// Bytes scanned while the connection is undecided.
    scanned: u64,
}

impl Half {
    fn new() -> Self {
        Half {
            kind: None,
            phase: Phase::Head,
            buf: Vec::new(),
            line_ok: false,
            eoh: 0,
            start_ns: 0,
            last_ns: 0,
            target: None,
            capturing: true,
            trailer_bytes: 0,
            gapped: false,
            resynced: false,
            scanned: 0,
        }
    }

    fn reset_buffer(&mut self) {
        self.buf.clear();
        self.buf.shrink_to(MAX_LINE);
        self.line_ok = false;
        self.eoh = 0;
    }
}

/// Parser state of one connection. See the module documentation.
#[derive(Debug)]
pub struct HttpParser {
    halves: [Half; 2],
    decided: Option<bool>,
    request_dir: Option<Direction>,
    in_flight: VecDeque<InFlight>,
    next_seq: u64,
    /// Sequence number of the next exchange to receive a response.
    next_response_seq: u64,
    /// Responses still to come for exchanges dropped from a full queue.
    responses_to_drop: u64,
    /// Start of the latest response that answered no request seen.
    last_orphan_response_ns: Option<u64>,
    finished: VecDeque<HttpExchange>,
    /// Requests that began since the last take, at most [`MAX_FINISHED`].
    started: Vec<super::Started>,
    closed: bool,
    /// The connection switched to HTTP/2 (`Upgrade: h2c`): what the HTTP/2 parser
    /// that takes over needs.
    upgrade: Option<Box<H2cUpgrade>>,
}

/// An HTTP/1.1 connection that a 101 switched to HTTP/2: the upgrading exchange
/// (request whole and announced, no response yet) and the bytes after the 101.
#[derive(Debug)]
pub(crate) struct H2cUpgrade {
    exchange: HttpExchange,
    request_dir: Direction,
    /// Above every sequence number used on the connection so far.
    next_seq: u64,
    /// Bytes of the 101's direction that followed its head in the same piece.
    after: Vec<u8>,
    after_ns: u64,
}

impl Default for HttpParser {
    fn default() -> Self {
        Self::new()
    }
}

/// Progress towards the end of a head after the bytes in `buf`.
fn eoh_after(buf: &[u8]) -> u8 {
    match buf {
        [.., b'\n', b'\r'] => 2,
        [.., b'\n'] => 1,
        _ => 0,
    }
}

impl HttpParser {
    pub fn new() -> Self {
        HttpParser {
            halves: [Half::new(), Half::new()],
            decided: None,
            request_dir: None,
            in_flight: VecDeque::new(),
            next_seq: 0,
            next_response_seq: 0,
            responses_to_drop: 0,
            last_orphan_response_ns: None,
            finished: VecDeque::new(),
            started: Vec::new(),
            closed: false,
            upgrade: None,
        }
    }

    /// `None` until the first head has parsed; `Some(false)` when the connection is not
    /// HTTP/1.x (stop feeding it).
    pub fn is_http(&self) -> Option<bool> {
        self.decided
    }

    /// `Server` when requests arrive on Ingress, `Client` when they leave on Egress.
    pub fn role(&self) -> Option<Role> {
        self.request_dir.map(|d| match d {
            Direction::Ingress => Role::Server,
            Direction::Egress => Role::Client,
        })
    }

    /// Finished exchanges, oldest first.
    pub fn take_exchanges(&mut self) -> Vec<HttpExchange> {
        self.finished.drain(..).collect()
    }

    fn active(&self) -> bool {
        !self.closed && self.decided != Some(false)
    }

    /// The next bytes of direction `dir`, carried by a syscall at monotonic `ts_ns`.
    pub fn feed(&mut self, dir: Direction, data: &[u8], ts_ns: u64) {
        let d = dir.index();
        let mut rest = data;
        while !rest.is_empty() && self.active() {
            let phase = self.halves[d].phase;
            let used = match phase {
                Phase::Stopped => return,
                Phase::Head => self.feed_head(dir, rest, ts_ns),
                Phase::Body(body) => self.feed_body(dir, body, rest, ts_ns),
                Phase::Lost { at_line_start } => self.feed_lost(dir, at_line_start, rest, ts_ns),
            };
            // Every step consumes bytes or changes phase; a step that does neither would
            // loop forever, so stop rather than trust it.
            if used == 0 && self.halves[d].phase == phase {
                debug_assert!(false, "HTTP parser made no progress in {phase:?}");
                return;
            }
            rest = &rest[used..];
            if self.halves[d].phase == Phase::Stopped {
                if let Some(u) = self.upgrade.as_mut() {
                    u.after.extend_from_slice(rest);
                    u.after_ns = ts_ns;
                }
                return;
            }
        }
    }

    /// `len` bytes of direction `dir` passed without being captured.
    pub fn skip(&mut self, dir: Direction, len: u64, ts_ns: u64) {
        if len == 0 || !self.active() {
            return;
        }
        let d = dir.index();
        let h = &mut self.halves[d];
        h.gapped = true;
        match h.phase {
            Phase::Stopped => {}
            Phase::Lost { .. } => {
                h.reset_buffer();
                h.phase = Phase::Lost {
                    at_line_start: true,
                };
                self.count_undecided_scan(d, len);
            }
            Phase::Head => self.lose_sync(dir, true, true),
            Phase::Body(Body::UntilClose) => self.body_bytes(dir, None, len, ts_ns),
            Phase::Body(Body::Length(left)) => {
                let used = left.min(len);
                self.body_bytes(dir, None, used, ts_ns);
                if used == left {
                    self.finish_message(dir, ts_ns);
                    if len > used {
                        self.lose_sync(dir, true, true);
                    }
                } else {
                    self.halves[d].phase = Phase::Body(Body::Length(left - used));
                }
            }
            Phase::Body(Body::Chunked(Chunk::Data(left))) if len <= left => {
                self.body_bytes(dir, None, len, ts_ns);
                let next = if len == left {
                    Chunk::DataEnd
                } else {
                    Chunk::Data(left - len)
                };
                self.halves[d].phase = Phase::Body(Body::Chunked(next));
            }
            Phase::Body(Body::Chunked(_)) => self.lose_sync(dir, true, false),
        }
    }

    /// An unknown number of bytes of direction `dir` is missing.
    pub fn resync(&mut self, dir: Direction) {
        if !self.active() {
            return;
        }
        let h = &mut self.halves[dir.index()];
        h.gapped = true;
        match h.phase {
            Phase::Stopped => {}
            Phase::Lost { .. } => {
                h.reset_buffer();
                h.phase = Phase::Lost {
                    at_line_start: true,
                };
            }
            Phase::Head => {
                let partial = !h.buf.is_empty();
                self.lose_sync(dir, true, partial);
            }
            Phase::Body(_) => self.lose_sync(dir, true, false),
        }
    }

    /// The connection closed at `ts_ns`: see [`HttpParser::end`].
    pub fn close(&mut self, ts_ns: u64) {
        self.end(ts_ns, EndReason::ConnectionClosed);
    }

    /// The connection ended for `reason`: a body delimited by the close ends when the
    /// socket really closed, and every exchange still open is finished as it stands,
    /// marked incomplete with `reason` (without a response if none came).
    pub fn end(&mut self, _ts_ns: u64, reason: EndReason) {
        if self.closed {
            return;
        }
        if self.decided == Some(true) {
            for dir in [Direction::Ingress, Direction::Egress] {
                let h = &self.halves[dir.index()];
                if h.phase == Phase::Body(Body::UntilClose) && reason.socket_closed() {
                    let last = h.last_ns;
                    self.finish_message(dir, last);
                }
            }
            let request_last = self
                .request_dir
                .map_or(0, |d| self.halves[d.index()].last_ns);
            let response_last = self
                .request_dir
                .map_or(0, |d| self.halves[d.opposite().index()].last_ns);
            while let Some(mut f) = self.in_flight.pop_front() {
                if f.dropped {
                    continue;
                }
                let complete = f.request_done && f.response_done && f.exchange.response.is_some();
                if !complete {
                    f.exchange.incomplete = Some(reason);
                }
                if !f.request_done {
                    f.exchange.request_end_ns = request_last.max(f.exchange.request_start_ns);
                }
                if f.exchange.response.is_some() && !f.response_done {
                    f.exchange.response_end_ns = response_last.max(f.exchange.response_start_ns);
                }
                self.push_finished(f.exchange);
            }
        }
        self.closed = true;
        self.in_flight.clear();
        for h in &mut self.halves {
            h.buf = Vec::new();
            h.phase = Phase::Stopped;
        }
    }

    /// See [`ProtocolParser::next_message_in`].
    pub fn next_message_in(&self, dir: Direction) -> Option<u64> {
        if !self.active() {
            return None;
        }
        let h = &self.halves[dir.index()];
        match h.phase {
            Phase::Body(Body::Length(left) | Body::Chunked(Chunk::Data(left))) => Some(left),
            Phase::Head | Phase::Body(Body::Chunked(_)) if h.buf.is_empty() => Some(0),
            _ => None,
        }
    }

    fn is_request_dir(&self, dir: Direction) -> bool {
        self.request_dir == Some(dir)
    }

    fn not_http(&mut self) {
        self.decided = Some(false);
        self.in_flight.clear();
        for h in &mut self.halves {
            h.buf = Vec::new();
            h.phase = Phase::Stopped;
        }
    }

    fn count_undecided_scan(&mut self, d: usize, bytes: u64) {
        if self.decided.is_none() {
            let h = &mut self.halves[d];
            h.scanned = h.scanned.saturating_add(bytes);
            if h.scanned > MAX_UNDECIDED_SCAN {
                self.not_http();
            }
        }
    }

    /// A head could not be parsed: not HTTP if these were the connection's first bytes.
    fn head_failed(&mut self, dir: Direction) {
        if self.decided.is_none() && !self.halves[dir.index()].gapped {
            self.not_http();
        } else {
            self.lose_sync(dir, true, true);
        }
    }

    fn decide(&mut self, request_dir: Direction) {
        if self.decided.is_none() {
            self.decided = Some(true);
            self.request_dir = Some(request_dir);
            self.halves[request_dir.index()].kind = Some(Kind::Request);
            self.halves[request_dir.opposite().index()].kind = Some(Kind::Response);
        }
    }

    fn feed_head(&mut self, dir: Direction, data: &[u8], ts_ns: u64) -> usize {
        let h = &mut self.halves[dir.index()];
        let mut used = 0;
        if h.buf.is_empty() {
            // Empty lines before a message are allowed (RFC 9112 section 2.2).
            used = data
                .iter()
                .take_while(|&&c| c == b'\r' || c == b'\n')
                .count();
            if used == data.len() {
                return used;
            }
            h.start_ns = ts_ns;
            h.eoh = 0;
            h.line_ok = false;
        }
        let room = MAX_HEAD - h.buf.len();
        let avail = &data[used..];
        let mut end = None;
        for (i, &c) in avail.iter().enumerate().take(room) {
            h.eoh = match (h.eoh, c) {
                (1 | 2, b'\n') => {
                    end = Some(i + 1);
                    break;
                }
                (_, b'\n') => 1,
                (1, b'\r') => 2,
                _ => 0,
            };
        }
        let take = end.unwrap_or(avail.len().min(room));
        let new_line = avail[..take].contains(&b'\n');
        h.buf.extend_from_slice(&avail[..take]);
        h.last_ns = ts_ns;
        used += take;
        // Recognising the start line early rejects other protocols after a few bytes;
        // a long start line is looked at again only when its line ends.
        if !h.line_ok && (h.buf.len() <= 64 || new_line || end.is_some() || h.buf.len() >= MAX_HEAD)
        {
            match head::classify(&h.buf, h.kind) {
                Fit::Yes(kind) => {
                    h.line_ok = true;
                    h.kind = Some(kind);
                }
                Fit::Maybe => {}
                Fit::No => {
                    self.head_failed(dir);
                    return used;
                }
            }
        }
        if end.is_none() {
            if h.buf.len() >= MAX_HEAD {
                self.head_failed(dir);
            }
            return used;
        }
        let buf = std::mem::take(&mut h.buf);
        let kind = h.kind;
        h.reset_buffer();
        match kind {
            Some(Kind::Request) => match head::parse_request(&buf) {
                Some((head, framing)) => self.on_request_head(dir, head, &framing, ts_ns),
                None => self.head_failed(dir),
            },
            Some(Kind::Response) => match head::parse_response(&buf) {
                Some((head, framing)) => self.on_response_head(dir, head, &framing, ts_ns),
                None => self.head_failed(dir),
            },
            None => self.head_failed(dir),
        }
        self.halves[dir.index()].buf = reuse(buf);
        used
    }

    fn feed_lost(
        &mut self,
        dir: Direction,
        mut at_line_start: bool,
        data: &[u8],
        ts_ns: u64,
    ) -> usize {
        let d = dir.index();
        let h = &mut self.halves[d];
        let mut i = 0;
        let mut found = false;
        while i < data.len() {
            if h.buf.is_empty() && !at_line_start {
                match data[i..].iter().position(|&c| c == b'\n') {
                    Some(p) => {
                        i += p + 1;
                        at_line_start = true;
                        continue;
                    }
                    None => {
                        i = data.len();
                        break;
                    }
                }
            }
            if h.buf.is_empty() {
                h.start_ns = ts_ns;
            }
            let end = data[i..]
                .iter()
                .position(|&c| c == b'\n')
                .map_or(data.len(), |p| i + p + 1);
            let take = (end - i).min(MAX_HEAD - h.buf.len());
            h.buf.extend_from_slice(&data[i..i + take]);
            i += take;
            match head::classify(&h.buf, h.kind) {
                Fit::Yes(kind) => {
                    h.kind = Some(kind);
                    h.line_ok = true;
                    h.eoh = eoh_after(&h.buf);
                    h.phase = Phase::Head;
                    h.last_ns = ts_ns;
                    found = true;
                    break;
                }
                Fit::Maybe if h.buf.len() < MAX_HEAD => at_line_start = false,
                _ => {
                    at_line_start = h.buf.last() == Some(&b'\n');
                    h.buf.clear();
                }
            }
        }
        if !found {
            h.phase = Phase::Lost { at_line_start };
        }
        self.count_undecided_scan(d, i as u64);
        i
    }
}

impl ProtocolParser for HttpParser {
    fn detect(&self) -> Option<bool> {
        self.is_http()
    }

    fn feed(&mut self, dir: Direction, data: &[u8], ts_ns: u64) {
        HttpParser::feed(self, dir, data, ts_ns);
    }

    fn skip(&mut self, dir: Direction, len: u64, ts_ns: u64) {
        HttpParser::skip(self, dir, len, ts_ns);
    }

    fn resync(&mut self, dir: Direction) {
        HttpParser::resync(self, dir);
    }

    fn close(&mut self, ts_ns: u64, reason: EndReason) {
        self.end(ts_ns, reason);
    }

    /// HTTP/1.x waits for nothing but bytes.
    fn tick(&mut self, _now_ns: u64) {}

    fn take(&mut self, out: &mut Vec<Parsed>) {
        out.extend(self.started.drain(..).map(Parsed::Started));
        out.extend(self.finished.drain(..).map(Parsed::Http));
    }

    fn next_message_in(&self, dir: Direction) -> Option<u64> {
        HttpParser::next_message_in(self, dir)
    }

    fn in_sync(&self, dir: Direction) -> bool {
        !matches!(self.halves[dir.index()].phase, Phase::Lost { .. })
    }

    fn upgrade(&mut self) -> Option<Box<dyn ProtocolParser>> {
        let u = self.upgrade.take()?;
        let response_dir = u.request_dir.opposite();
        let mut next =
            super::http2::Http2Parser::after_upgrade(u.exchange, u.request_dir, u.next_seq);
        if !u.after.is_empty() {
            next.feed(response_dir, &u.after, u.after_ns);
        }
        Some(Box::new(next))
    }
}

/// Keeps a buffer's allocation for the next message unless it grew large.
fn reuse(mut buf: Vec<u8>) -> Vec<u8> {
    buf.clear();
    buf.shrink_to(MAX_LINE);
    buf
}

#[cfg(test)]
mod tests;
