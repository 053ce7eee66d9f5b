//! Incremental AMQP 0-9-1 parser for one connection, both directions.
//!
//! The parser reads each direction's byte stream as [`crate::reassembly`] hands it over:
//! bytes, gaps of known length ([`AmqpParser::skip`]) and gaps of unknown length
//! ([`AmqpParser::resync`]), and turns it into [`AmqpOperation`]s: publishes, deliveries
//! and gets with their outcome, errors that closed a channel or the connection, and the
//! topology the client declared.
//!
//! - Framing is read by hand (7-octet frame header, payload, frame-end octet 0xCE)
//!   because body payloads are streamed, never buffered, and may be partly uncaptured.
//!   Method and content-header payloads are buffered (at most [`MAX_BUFFERED_PAYLOAD`])
//!   and decoded with amq-protocol (see `decode`).
//! - Detection: a direction that starts with the protocol header `AMQP\0\0\9\1` is the
//!   client's. Any other start, and any loss of sync, makes the direction scan for frame
//!   boundaries: a candidate frame needs a known type, a sane channel and size
//!   ([`MAX_RESYNC_FRAME`]), a frame-end octet where its size says, a decodable payload
//!   for methods and content headers, and a second such frame right after it. Only the
//!   server's `connection.start` at the very start of a direction is accepted alone.
//!   A direction whose first bytes cannot begin a frame or the protocol header is not
//!   AMQP, and neither is one that scans [`MAX_UNDECIDED_SCAN`] bytes without a match.
//! - Roles: the direction that sends the protocol header or client-only methods
//!   (basic.publish, basic.consume, connection.start-ok...) is the client's. Until one
//!   is seen (a connection picked up mid-stream), methods that both sides send
//!   (basic.ack, channel.close...) are ignored.
//! - Content: a content-bearing method (basic.publish, basic.deliver, basic.get-ok,
//!   basic.return), then its content header and body frames, per channel and per
//!   direction, so channels may interleave. At most [`MAX_BODY_CAPTURE`] body bytes are
//!   kept, and only while the captured bytes are contiguous.
//! - Uncaptured bytes inside a body frame count as body. Bodies bigger than the capture
//!   usually also hide the ends of their frames; the parser then lays the rest of the
//!   content out in frames of the negotiated `frame_max` (or the size of the first,
//!   full, body frame), which is how clients and RabbitMQ split bodies, and checks the
//!   next frame-end octet it reads. Any other gap loses the direction's sync.
//! - Losing sync drops the contents in flight in that direction; deliveries waiting
//!   for an ack (client direction lost) or publishes waiting for a confirm (broker
//!   direction lost) are finished without an outcome, since theirs may be in the gap.
//! - When an operation completes: see [`AmqpOperation`].
//! - A delivery to a consumer whose basic.consume the parser never saw (it registered
//!   before the agent started) has an unknown ack mode: it waits at most
//!   [`ACK_MODE_WAIT_NS`] for an ack (settled by it as usual), and then finishes with
//!   the outcome [`Outcome::AckModeUnknown`], ending when it was delivered, rather than
//!   waiting for an ack that may never come. An ack on that channel for such a
//!   delivery shows the consumers there ack: their later deliveries wait for their
//!   acks as any known consumer's do.
//! - Frame windows: [`AmqpParser::next_message_in`] tells how many bytes are left in
//!   the current frame, so that the kernel can copy from the next frame header on.
//! - Memory is bounded whatever the input: one frame buffer and one scan window per
//!   direction, at most [`MAX_CHANNELS`] channels, [`MAX_CONSUMERS`] consumers,
//!   [`MAX_OPEN_OPERATIONS`] operations waiting for a confirm, a return or an ack (past
//!   that the oldest is finished without an outcome), [`MAX_FINISHED`] untaken ones.

//!
//! Where things are: [`operations`] what the parser emits, `frames` the framing and
//! resynchronisation, `methods` what each method does, `channels` the per-channel
//! state (contents, consumers, operations waiting for a confirm, return or ack),
//! `decode` the payloads amq-protocol decodes. This module holds the parser's state and
//! its entry points.

mod channels;
mod decode;
mod frames;
mod methods;
pub mod operations;

use crate::FastMap;
use std::collections::VecDeque;

use agent_common::Direction;

pub use self::operations::{
    AmqpOperation, CloseReason, Delivery, DeliveryKind, Message, Outcome, Properties, Publish,
    Topology, method_name,
};
use self::{
    channels::{Channel, Consumer, Content, ContentOf, slot},
    frames::{FrameHead, Half, Phase},
};
use super::{Parsed, ProtocolParser};
use crate::conn::{EndReason, Role};

/// Body bytes kept per message.
pub const MAX_BODY_CAPTURE: usize = 16 * 1024;
/// Largest method or content-header payload buffered and decoded; bigger ones are
/// skipped (the framing stays in sync, the frame is not understood).
pub const MAX_BUFFERED_PAYLOAD: u32 = 128 * 1024;
/// Largest frame payload accepted while looking for frame boundaries.
pub const MAX_RESYNC_FRAME: u32 = 32 * 1024;
/// Largest frame accepted in sync before `connection.tune-ok` told the real limit.
pub const DEFAULT_FRAME_LIMIT: u32 = 1024 * 1024;
/// Bytes scanned on a connection not yet known to be AMQP before deciding it is not.
pub const MAX_UNDECIDED_SCAN: u64 = 64 * 1024;
/// Channels tracked per connection; frames on further channels are ignored.
pub const MAX_CHANNELS: usize = 256;
/// Consumers (consumer tag -> queue) tracked per connection.
pub const MAX_CONSUMERS: usize = 256;
/// Consumers of unknown ack mode remembered per channel, to learn that they ack.
const MAX_UNKNOWN_CONSUMERS: usize = 16;
/// Publishes waiting for a confirm or a return, and deliveries waiting for an ack.
pub const MAX_OPEN_OPERATIONS: usize = 1024;
/// Finished operations kept until [`AmqpParser::take_operations`].
pub const MAX_FINISHED: usize = 1024;
/// Requests (basic.consume, basic.get) waiting for their answer, per channel.
const MAX_PENDING_REQUESTS: usize = 64;
/// How long a mandatory publish without confirms waits for a possible basic.return.
pub const RETURN_WAIT_NS: u64 = 1_000_000_000;
/// How long a delivery to a consumer of unknown ack mode waits for an ack before it is
/// finished with the outcome unknown.
pub const ACK_MODE_WAIT_NS: u64 = 5_000_000_000;

const FRAME_METHOD: u8 = 1;
const FRAME_HEADER: u8 = 2;
const FRAME_BODY: u8 = 3;
const FRAME_HEARTBEAT: u8 = 8;
const FRAME_END: u8 = 0xCE;
const PROTOCOL_HEADER: &[u8; 8] = b"AMQP\x00\x00\x09\x01";
/// Reply codes from here up are errors (311 content-too-large is the first).
const FIRST_ERROR_CODE: u16 = 300;

/// Parser state of one connection. See the module documentation.
#[derive(Debug)]
pub struct AmqpParser {
    halves: [Half; 2],
    decided: Option<bool>,
    client_dir: Option<Direction>,
    vhost: Option<String>,
    user: Option<String>,
    /// `frame_max` from connection.tune-ok (0: no limit).
    frame_max: Option<u32>,
    channels: FastMap<u16, Channel>,
    consumers: FastMap<(u16, String), Consumer>,
    open_operations: usize,
    /// basic.publish methods the client sent so far.
    publishes: u64,
    finished: VecDeque<AmqpOperation>,
    /// Deliveries a consumer began since the last take, at most [`MAX_FINISHED`].
    started: Vec<super::Started>,
    closed: bool,
}

impl Default for AmqpParser {
    fn default() -> Self {
        Self::new()
    }
}

impl AmqpParser {
    pub fn new() -> Self {
        AmqpParser {
            halves: [Half::new(), Half::new()],
            decided: None,
            client_dir: None,
            vhost: None,
            user: None,
            frame_max: None,
            channels: FastMap::default(),
            consumers: FastMap::default(),
            open_operations: 0,
            publishes: 0,
            finished: VecDeque::new(),
            started: Vec::new(),
            closed: false,
        }
    }

    /// `None` until the first frames are recognised; `Some(false)` when the connection is
    /// not AMQP 0-9-1 (stop feeding it).
    pub fn is_amqp(&self) -> Option<bool> {
        self.decided
    }

    /// `Client` when the traced process sends the client's frames (it egresses the
    /// protocol header, basic.publish...), `Server` when it is the broker.
    pub fn role(&self) -> Option<Role> {
        self.client_dir.map(|d| match d {
            Direction::Egress => Role::Client,
            Direction::Ingress => Role::Server,
        })
    }

    /// Completed operations, oldest first.
    pub fn take_operations(&mut self) -> Vec<AmqpOperation> {
        self.finished.drain(..).collect()
    }

    fn active(&self) -> bool {
        !self.closed && self.decided != Some(false)
    }

    /// The next bytes of direction `dir`, carried by a syscall at monotonic `ts_ns`.
    pub fn feed(&mut self, dir: Direction, data: &[u8], ts_ns: u64) {
        if !data.is_empty() {
            self.release_returns(ts_ns);
        }
        self.feed_bytes(dir, data, ts_ns);
        while let Some(replay) = self.halves[dir.index()].replay.take() {
            self.feed_bytes(dir, &replay, ts_ns);
        }
    }

    fn feed_bytes(&mut self, dir: Direction, data: &[u8], ts_ns: u64) {
        let d = dir.index();
        let mut rest = data;
        while !rest.is_empty() && self.active() {
            let phase = self.halves[d].phase;
            let used = match phase {
                Phase::Stopped => return,
                Phase::Fresh => {
                    self.start(dir, rest[0]);
                    0
                }
                Phase::ProtocolHeader => self.feed_protocol_header(dir, rest),
                Phase::FrameHeader => self.feed_frame_header(dir, rest, ts_ns),
                Phase::Payload => self.feed_payload(dir, rest),
                Phase::FrameEnd => {
                    self.frame_end(dir, rest[0], ts_ns);
                    1
                }
                Phase::Lost => {
                    self.feed_lost(dir, rest);
                    rest.len()
                }
            };
            if used == 0 && self.halves[d].phase == phase {
                debug_assert!(false, "AMQP parser made no progress in {phase:?}");
                return;
            }
            rest = &rest[used..];
        }
    }

    /// `len` bytes of direction `dir` passed without being captured.
    pub fn skip(&mut self, dir: Direction, len: u64, ts_ns: u64) {
        if len == 0 || !self.active() {
            return;
        }
        self.release_returns(ts_ns);
        let d = dir.index();
        self.halves[d].at_start = false;
        let phase = self.halves[d].phase;
        match phase {
            Phase::Stopped => {}
            Phase::Fresh => self.halves[d].phase = Phase::Lost,
            Phase::Lost => {
                self.halves[d].scan.clear();
                self.count_undecided_scan(d, len);
            }
            Phase::Payload if len < self.halves[d].left => {
                let h = &mut self.halves[d];
                h.left -= len;
                if h.frame.kind == FRAME_BODY {
                    self.body_bytes(dir, None, len);
                } else {
                    h.damaged = true;
                    h.payload = Vec::new();
                }
            }
            Phase::Payload | Phase::FrameEnd | Phase::FrameHeader if self.can_lay_out(dir) => {
                self.skip_laid_out(dir, len, ts_ns)
            }
            _ => self.lose_sync(dir),
        }
    }

    /// An unknown number of bytes of direction `dir` is missing.
    pub fn resync(&mut self, dir: Direction) {
        if !self.active() {
            return;
        }
        let h = &mut self.halves[dir.index()];
        h.at_start = false;
        match h.phase {
            Phase::Stopped => {}
            Phase::Fresh => h.phase = Phase::Lost,
            Phase::Lost => h.scan.clear(),
            _ => self.lose_sync(dir),
        }
    }

    /// See [`ProtocolParser::next_message_in`]: inside a frame, its payload still to come
    /// and its end octet; between frames, 0.
    pub fn next_message_in(&self, dir: Direction) -> Option<u64> {
        if !self.active() {
            return None;
        }
        let h = &self.halves[dir.index()];
        match h.phase {
            Phase::Payload => Some(h.left + 1),
            Phase::FrameEnd => Some(1),
            Phase::FrameHeader if h.head.is_empty() => Some(0),
            _ => None,
        }
    }

    /// Finishes mandatory publishes without confirms whose return did not come within
    /// [`RETURN_WAIT_NS`], and deliveries of unknown ack mode that waited
    /// [`ACK_MODE_WAIT_NS`] for an ack; call it now and then (once a second is plenty).
    pub fn tick(&mut self, now_ns: u64) {
        self.release_returns(now_ns);
        self.release_unknown_ack_modes(now_ns);
    }

    /// The connection closed at `ts_ns`: see [`AmqpParser::end`].
    pub fn close(&mut self, ts_ns: u64) {
        self.end(ts_ns, EndReason::ConnectionClosed);
    }

    /// The connection ended for `reason` (at `ts_ns`, if the socket closed): every
    /// publish or delivery still open is finished without confirm or outcome and marked
    /// incomplete with `reason`; contents still arriving are dropped.
    pub fn end(&mut self, ts_ns: u64, reason: EndReason) {
        if self.closed {
            return;
        }
        if self.decided == Some(true) {
            let mut ids: Vec<u16> = self.channels.keys().copied().collect();
            ids.sort_unstable();
            for id in ids {
                self.finish_channel(id, None, ts_ns, false, Some(reason));
            }
        }
        self.closed = true;
        self.channels.clear();
        self.consumers.clear();
        for h in &mut self.halves {
            h.phase = Phase::Stopped;
            h.payload = Vec::new();
            h.scan = Vec::new();
            h.replay = None;
        }
    }

    fn not_amqp(&mut self) {
        self.decided = Some(false);
        self.channels.clear();
        self.consumers.clear();
        self.open_operations = 0;
        for h in &mut self.halves {
            h.phase = Phase::Stopped;
            h.payload = Vec::new();
            h.scan = Vec::new();
            h.replay = None;
        }
    }

    fn count_undecided_scan(&mut self, d: usize, bytes: u64) {
        if self.decided.is_none() {
            let h = &mut self.halves[d];
            h.scanned = h.scanned.saturating_add(bytes);
            if h.scanned > MAX_UNDECIDED_SCAN {
                self.not_amqp();
            }
        }
    }
}

impl ProtocolParser for AmqpParser {
    fn kernel_follows_frames(&self) -> bool {
        true
    }

    fn detect(&self) -> Option<bool> {
        self.is_amqp()
    }

    fn feed(&mut self, dir: Direction, data: &[u8], ts_ns: u64) {
        AmqpParser::feed(self, dir, data, ts_ns);
    }

    fn skip(&mut self, dir: Direction, len: u64, ts_ns: u64) {
        AmqpParser::skip(self, dir, len, ts_ns);
    }

    fn resync(&mut self, dir: Direction) {
        AmqpParser::resync(self, dir);
    }

    fn close(&mut self, ts_ns: u64, reason: EndReason) {
        self.end(ts_ns, reason);
    }

    fn tick(&mut self, now_ns: u64) {
        AmqpParser::tick(self, now_ns);
    }

    fn take(&mut self, out: &mut Vec<Parsed>) {
        out.extend(self.started.drain(..).map(Parsed::Started));
        out.extend(self.finished.drain(..).map(Parsed::Amqp));
    }

    fn next_message_in(&self, dir: Direction) -> Option<u64> {
        AmqpParser::next_message_in(self, dir)
    }

    fn in_sync(&self, dir: Direction) -> bool {
        self.halves[dir.index()].phase != Phase::Lost
    }
}

#[cfg(test)]
mod tests;
