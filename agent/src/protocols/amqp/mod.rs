//! Incremental AMQP 0-9-1 parser for one connection, both directions.
//!
//! The parser reads each direction's byte stream as [`crate::reassembly`] hands it over:
//! bytes, gaps of known length ([`AmqpParser::skip`]) and gaps of unknown length
//! ([`AmqpParser::resync`]), and turns it into [`AmqpOperation`]s: publishes, deliveries
//! and gets with their outcome, errors that closed a channel or the connection, and the
//! topology the client declared.
//!
//! - Framing is read here (7-octet frame header, payload, frame-end octet 0xCE) because
//!   body payloads are streamed, never buffered, and may be partly uncaptured.
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
//!   before the agent started) has an unknown ack mode: it finishes when delivered,
//!   with the outcome [`Outcome::AckModeUnknown`], rather than waiting for an ack that
//!   may never come. An ack on that channel for a delivery the parser does not hold
//!   shows the consumers there ack: their later deliveries wait for their acks.
//! - Frame windows: [`AmqpParser::next_message_in`] tells how many bytes are left in
//!   the current frame, so that the kernel can copy from the next frame header on.
//! - Memory is bounded whatever the input: one frame buffer and one scan window per
//!   direction, at most [`MAX_CHANNELS`] channels, [`MAX_CONSUMERS`] consumers,
//!   [`MAX_OPEN_OPERATIONS`] operations waiting for a confirm, a return or an ack (past
//!   that the oldest is finished without an outcome), [`MAX_FINISHED`] untaken ones.

mod decode;

use std::collections::{HashMap, VecDeque};

use agent_common::Direction;
use amq_protocol::protocol::{AMQPClass, basic, channel, confirm, connection, exchange, queue};

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

const FRAME_METHOD: u8 = 1;
const FRAME_HEADER: u8 = 2;
const FRAME_BODY: u8 = 3;
const FRAME_HEARTBEAT: u8 = 8;
const FRAME_END: u8 = 0xCE;
const PROTOCOL_HEADER: &[u8; 8] = b"AMQP\x00\x00\x09\x01";
/// Reply codes from here up are errors (311 content-too-large is the first).
const FIRST_ERROR_CODE: u16 = 300;

/// Content properties of a message (the `basic` class), as text.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Properties {
    pub content_type: Option<String>,
    pub content_encoding: Option<String>,
    /// The headers table, in name order, values written as text (nested tables as
    /// `{k: v}`, arrays as `[a, b]`), at most 64 entries of at most 1 KiB.
    pub headers: Vec<(String, String)>,
    pub delivery_mode: Option<u8>,
    pub priority: Option<u8>,
    pub correlation_id: Option<String>,
    pub reply_to: Option<String>,
    pub expiration: Option<String>,
    pub message_id: Option<String>,
    /// Seconds since the Unix epoch, as the publisher set it.
    pub timestamp: Option<u64>,
    /// The `type` property.
    pub kind: Option<String>,
    pub user_id: Option<String>,
    pub app_id: Option<String>,
}

impl Properties {
    /// The value of header `name`, if the message carries it.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A message as it travelled: where it was sent, its properties and body.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Message {
    pub exchange: String,
    pub routing_key: String,
    pub properties: Properties,
    /// The body size the content header declared (the bytes counted when the header
    /// was not understood).
    pub body_size: u64,
    /// The body's first bytes, at most [`MAX_BODY_CAPTURE`]; shorter than the body when
    /// bytes were not captured.
    pub body: Vec<u8>,
}

/// Why a channel or the connection was closed (channel.close, connection.close).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CloseReason {
    pub reply_code: u16,
    pub reply_text: String,
    /// The method that caused the close, 0 and 0 when none did.
    pub class_id: u16,
    pub method_id: u16,
    /// Who sent the close: `Server` for the broker.
    pub by: Role,
}

impl CloseReason {
    /// A close with an error reply code (300 and up: soft and hard errors). Clients
    /// close normally with 200 (reply-success), pika with 0.
    pub fn is_error(&self) -> bool {
        self.reply_code >= FIRST_ERROR_CODE
    }

    /// The name of the method that caused the close, as `class.method`.
    pub fn method_name(&self) -> Option<&'static str> {
        method_name(self.class_id, self.method_id)
    }
}

/// How a consumer settled a delivery.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Ack,
    Nack {
        requeue: bool,
    },
    Reject {
        requeue: bool,
    },
    /// The consumer or the get asked for no acks: settled when delivered.
    AutoAck,
    /// The consumer registered before the agent saw its connection, so whether it
    /// acks is unknown: finished when delivered, without waiting for an ack that may
    /// never come.
    AckModeUnknown,
}

/// How the message reached the consumer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliveryKind {
    /// Pushed to a consumer (basic.deliver).
    Deliver,
    /// Pulled (basic.get answered by basic.get-ok).
    Get,
}

/// A message the client published.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Publish {
    /// The traced process's side of the connection.
    pub role: Role,
    pub channel: u16,
    pub message: Message,
    pub mandatory: bool,
    /// Monotonic ns of the read or write that carried basic.publish.
    pub start_ns: u64,
    /// End of the content, or the broker's confirm when confirms are on.
    pub end_ns: u64,
    /// Publisher confirm: `Some(true)` for basic.ack, `Some(false)` for basic.nack,
    /// `None` without confirms or when none came.
    pub confirmed: Option<bool>,
    /// basic.return: the broker could not route a mandatory message (code, text).
    pub returned: Option<(u16, String)>,
    /// The channel or connection closed with an error before the publish completed.
    pub error: Option<CloseReason>,
    pub vhost: Option<String>,
    /// The user the client logged in as (PLAIN or AMQPLAIN).
    pub user: Option<String>,
}

/// A message the broker handed to the client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    pub role: Role,
    pub kind: DeliveryKind,
    pub channel: u16,
    /// basic.deliver's consumer tag.
    pub consumer_tag: Option<String>,
    /// The queue: from basic.consume for the tag, or from basic.get. `None` when the
    /// connection was picked up after the consumer started.
    pub queue: Option<String>,
    pub delivery_tag: u64,
    pub redelivered: bool,
    /// Exchange and routing key are the ones the message was published with.
    pub message: Message,
    /// Monotonic ns of the read that carried basic.deliver or basic.get-ok.
    pub start_ns: u64,
    /// When it was settled (or delivered, for auto-ack; or the channel closed).
    pub end_ns: u64,
    /// `None` when the channel or connection closed first, or the ack was lost.
    pub outcome: Option<Outcome>,
    pub error: Option<CloseReason>,
    pub vhost: Option<String>,
    pub user: Option<String>,
}

/// Exchanges, queues and bindings the client declared.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Topology {
    ExchangeDeclare {
        exchange: String,
        kind: String,
    },
    /// From queue.declare-ok, so server-named queues have their name.
    QueueDeclare {
        queue: String,
    },
    QueueBind {
        queue: String,
        exchange: String,
        routing_key: String,
    },
}

/// What the parser emits. Completion rules:
/// - `Publish`: when its content is complete and, on a channel in confirm mode, the
///   broker's basic.ack or basic.nack arrived; a mandatory publish without confirms
///   waits up to [`RETURN_WAIT_NS`] for a basic.return; or when the channel or the
///   connection closes.
/// - `Delivery`: when acked, nacked or rejected (the `multiple` flag settles every
///   earlier tag of the channel), at once for auto-ack consumers and gets, or when the
///   channel or connection closes (`outcome` `None`).
/// - `ChannelError`, `ConnectionError`: a close with an error reply code (300 and up).
/// - `Topology`: when declared (bound), or when the queue declaration was answered.
/// - `Dispatch`: the broker's side only (the traced process is the broker): as soon as
///   the content of a basic.deliver or basic.get-ok it sent is complete, without its
///   outcome; the same delivery follows as a `Delivery` when settled. The broker's view
///   of a message (`crate::context_amqp`) needs the time a message left the broker, not
///   the time its consumer got round to acking it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AmqpOperation {
    Publish(Publish),
    Delivery(Delivery),
    Dispatch(Delivery),
    ChannelError {
        role: Role,
        channel: u16,
        reason: CloseReason,
        ts_ns: u64,
        vhost: Option<String>,
    },
    ConnectionError {
        role: Role,
        reason: CloseReason,
        ts_ns: u64,
        vhost: Option<String>,
    },
    Topology {
        role: Role,
        channel: u16,
        change: Topology,
        ts_ns: u64,
    },
}

impl std::fmt::Display for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exchange={:?} rk={:?} body={}/{}",
            self.exchange,
            self.routing_key,
            self.body.len(),
            self.body_size
        )?;
        let p = &self.properties;
        let fields = [
            ("content_type", &p.content_type),
            ("content_encoding", &p.content_encoding),
            ("correlation_id", &p.correlation_id),
            ("reply_to", &p.reply_to),
            ("expiration", &p.expiration),
            ("message_id", &p.message_id),
            ("type", &p.kind),
            ("user_id", &p.user_id),
            ("app_id", &p.app_id),
        ];
        for (name, value) in fields {
            if let Some(v) = value {
                write!(f, " {name}={v:?}")?;
            }
        }
        for (name, value) in [("delivery_mode", p.delivery_mode), ("priority", p.priority)] {
            if let Some(v) = value {
                write!(f, " {name}={v}")?;
            }
        }
        if let Some(t) = p.timestamp {
            write!(f, " timestamp={t}")?;
        }
        for (k, v) in &p.headers {
            write!(f, " h:{k}={v:?}")?;
        }
        Ok(())
    }
}

impl std::fmt::Display for CloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {:?} by {:?}",
            self.reply_code, self.reply_text, self.by
        )?;
        if let Some(m) = self.method_name() {
            write!(f, " on {m}")?;
        }
        Ok(())
    }
}

/// One line per operation, for logs and golden files.
impl std::fmt::Display for AmqpOperation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AmqpOperation::Publish(p) => {
                write!(
                    f,
                    "{:?} publish ch={} {} t={}..{}",
                    p.role, p.channel, p.message, p.start_ns, p.end_ns
                )?;
                if p.mandatory {
                    write!(f, " mandatory")?;
                }
                if let Some(c) = p.confirmed {
                    write!(f, " confirmed={}", if c { "ack" } else { "nack" })?;
                }
                if let Some((code, text)) = &p.returned {
                    write!(f, " returned={code} {text:?}")?;
                }
                if let Some(e) = &p.error {
                    write!(f, " error={e}")?;
                }
            }
            AmqpOperation::Delivery(d) | AmqpOperation::Dispatch(d) => {
                let kind = match d.kind {
                    DeliveryKind::Deliver => "deliver",
                    DeliveryKind::Get => "get",
                };
                let sent = if matches!(self, AmqpOperation::Dispatch(_)) {
                    "sent "
                } else {
                    ""
                };
                write!(
                    f,
                    "{:?} {sent}{kind} ch={} tag={}",
                    d.role, d.channel, d.delivery_tag
                )?;
                if let Some(c) = &d.consumer_tag {
                    write!(f, " consumer={c:?}")?;
                }
                if let Some(q) = &d.queue {
                    write!(f, " queue={q:?}")?;
                }
                if d.redelivered {
                    write!(f, " redelivered")?;
                }
                write!(f, " {} t={}..{}", d.message, d.start_ns, d.end_ns)?;
                if sent.is_empty() {
                    write!(f, " outcome={:?}", d.outcome)?;
                }
                if let Some(e) = &d.error {
                    write!(f, " error={e}")?;
                }
            }
            AmqpOperation::ChannelError {
                role,
                channel,
                reason,
                ts_ns,
                ..
            } => {
                write!(f, "{role:?} channel error ch={channel} {reason} t={ts_ns}")?;
            }
            AmqpOperation::ConnectionError {
                role,
                reason,
                ts_ns,
                ..
            } => {
                write!(f, "{role:?} connection error {reason} t={ts_ns}")?;
            }
            AmqpOperation::Topology {
                role,
                channel,
                change,
                ts_ns,
            } => {
                write!(f, "{role:?} topology ch={channel} {change:?} t={ts_ns}")?;
            }
        }
        Ok(())
    }
}

/// `class.method` for a method id pair, for the methods a close may name.
pub fn method_name(class_id: u16, method_id: u16) -> Option<&'static str> {
    Some(match (class_id, method_id) {
        (10, 10) => "connection.start",
        (10, 11) => "connection.start-ok",
        (10, 20) => "connection.secure",
        (10, 21) => "connection.secure-ok",
        (10, 30) => "connection.tune",
        (10, 31) => "connection.tune-ok",
        (10, 40) => "connection.open",
        (20, 10) => "channel.open",
        (20, 20) => "channel.flow",
        (40, 10) => "exchange.declare",
        (40, 20) => "exchange.delete",
        (40, 30) => "exchange.bind",
        (40, 40) => "exchange.unbind",
        (50, 10) => "queue.declare",
        (50, 20) => "queue.bind",
        (50, 30) => "queue.purge",
        (50, 40) => "queue.delete",
        (50, 50) => "queue.unbind",
        (60, 10) => "basic.qos",
        (60, 20) => "basic.consume",
        (60, 30) => "basic.cancel",
        (60, 40) => "basic.publish",
        (60, 70) => "basic.get",
        (60, 80) => "basic.ack",
        (60, 90) => "basic.reject",
        (60, 110) => "basic.recover",
        (60, 120) => "basic.nack",
        (85, 10) => "confirm.select",
        (90, 10) => "tx.select",
        (90, 20) => "tx.commit",
        (90, 30) => "tx.rollback",
        _ => return None,
    })
}

/// Where a direction is in its stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Nothing read yet.
    Fresh,
    /// Reading the 8-octet protocol header (octets so far in `head`).
    ProtocolHeader,
    /// Reading a 7-octet frame header (octets so far in `head`).
    FrameHeader,
    /// Inside a frame's payload.
    Payload,
    /// Expecting the frame-end octet.
    FrameEnd,
    /// Sync lost: scanning for frame boundaries.
    Lost,
    /// Nothing more to parse in this direction.
    Stopped,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FrameHead {
    kind: u8,
    channel: u16,
    size: u32,
}

impl FrameHead {
    fn parse(b: &[u8]) -> Self {
        FrameHead {
            kind: b[0],
            channel: u16::from_be_bytes([b[1], b[2]]),
            size: u32::from_be_bytes([b[3], b[4], b[5], b[6]]),
        }
    }

    fn bytes(&self) -> [u8; 7] {
        let c = self.channel.to_be_bytes();
        let s = self.size.to_be_bytes();
        [self.kind, c[0], c[1], s[0], s[1], s[2], s[3]]
    }

    /// Plausible on its own: a known type, heartbeats empty on channel 0, content on a
    /// channel other than 0, room for a method's class and method ids.
    fn is_sane(&self, max_size: u32) -> bool {
        self.size <= max_size
            && match self.kind {
                FRAME_METHOD => self.size >= 4,
                FRAME_HEADER => self.size >= 14 && self.channel != 0,
                FRAME_BODY => self.channel != 0,
                FRAME_HEARTBEAT => self.size == 0 && self.channel == 0,
                _ => false,
            }
    }
}

/// One direction of the connection.
#[derive(Debug)]
struct Half {
    phase: Phase,
    /// Protocol-header or frame-header octets so far.
    head: Vec<u8>,
    /// The frame header the parser expects next, after laying out a skipped body.
    expected_head: Option<[u8; 7]>,
    frame: FrameHead,
    /// Payload octets still to come in the current frame.
    left: u64,
    /// Method or content-header payload so far.
    payload: Vec<u8>,
    /// Part of the payload was not captured (or it is too big): don't decode it.
    damaged: bool,
    /// Time of the current frame's first octet.
    frame_ns: u64,
    /// Scan window while sync is lost.
    scan: Vec<u8>,
    /// The direction is at its very beginning (no gap, nothing parsed).
    at_start: bool,
    /// Bytes scanned while the connection is undecided.
    scanned: u64,
    /// Bytes to parse again after sync was found in the scan window.
    replay: Option<Vec<u8>>,
}

impl Half {
    fn new() -> Self {
        Half {
            phase: Phase::Fresh,
            head: Vec::with_capacity(8),
            expected_head: None,
            frame: FrameHead {
                kind: 0,
                channel: 0,
                size: 0,
            },
            left: 0,
            payload: Vec::new(),
            damaged: false,
            frame_ns: 0,
            scan: Vec::new(),
            at_start: true,
            scanned: 0,
            replay: None,
        }
    }
}

/// What a content belongs to.
#[derive(Clone, Debug)]
enum ContentOf {
    Publish {
        mandatory: bool,
        seq: Option<u64>,
    },
    Deliver {
        consumer_tag: String,
        delivery_tag: u64,
        redelivered: bool,
    },
    GetOk {
        delivery_tag: u64,
        redelivered: bool,
        queue: Option<String>,
        no_ack: bool,
    },
    Return,
}

/// A message whose content header or body is still arriving.
#[derive(Clone, Debug)]
struct Content {
    of: ContentOf,
    message: Message,
    start_ns: u64,
    /// The declared body size, once the content header was understood.
    expected: Option<u64>,
    header_seen: bool,
    received: u64,
    /// Captured bytes are still contiguous.
    capturing: bool,
    /// Payload size of the first body frame when it was not the last: the size
    /// the sender splits bodies into.
    chunk_hint: Option<u32>,
}

#[derive(Debug, Default)]
struct Channel {
    /// Confirm mode (confirm.select sent) and the next publish sequence number.
    confirms: bool,
    next_seq: u64,
    /// Publish sequence numbers are unreliable (client bytes were lost).
    seq_lost: bool,
    /// Publishes waiting for their confirm, in sequence order.
    awaiting_confirm: VecDeque<(u64, Publish)>,
    /// Mandatory publishes without confirms, waiting for a possible return.
    awaiting_return: VecDeque<Publish>,
    /// Deliveries waiting for an ack, in delivery-tag order.
    unacked: VecDeque<Delivery>,
    /// Content from the client (index 0) and from the broker (index 1).
    content: [Option<Content>; 2],
    /// basic.consume sent, consume-ok awaited: (queue, consumer tag, no-ack).
    pending_consumes: VecDeque<(String, String, bool)>,
    /// basic.get sent, get-ok or get-empty awaited: (queue, no-ack).
    pending_gets: VecDeque<(String, bool)>,
    /// The last queue declared: what an empty queue name means on this channel.
    last_queue: Option<String>,
    /// Consumer tags seen in deliveries whose basic.consume the parser never saw (at
    /// most [`MAX_UNKNOWN_CONSUMERS`]): an ack on the channel for a delivery it does not
    /// hold shows they ack, and their later deliveries wait for it.
    unknown_consumers: Vec<String>,
}

impl Channel {
    fn open_operations(&self) -> usize {
        self.awaiting_confirm.len() + self.awaiting_return.len() + self.unacked.len()
    }
}

#[derive(Debug)]
struct Consumer {
    /// `None` for a consumer learnt from its acks rather than from basic.consume.
    queue: Option<String>,
    no_ack: bool,
}

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
    channels: HashMap<u16, Channel>,
    consumers: HashMap<(u16, String), Consumer>,
    open_operations: usize,
    finished: VecDeque<AmqpOperation>,
    closed: bool,
}

impl Default for AmqpParser {
    fn default() -> Self {
        Self::new()
    }
}

/// Content slot of a channel for frames sent by the client (0) or the broker (1).
fn slot(from_client: bool) -> usize {
    if from_client { 0 } else { 1 }
}

/// Which side sends a method, when only one side does.
fn sender(class: &AMQPClass) -> Option<Role> {
    use Role::{Client, Server};
    Some(match class {
        AMQPClass::Connection(m) => match m {
            connection::AMQPMethod::Start(_)
            | connection::AMQPMethod::Secure(_)
            | connection::AMQPMethod::Tune(_)
            | connection::AMQPMethod::OpenOk(_)
            | connection::AMQPMethod::Blocked(_)
            | connection::AMQPMethod::Unblocked(_)
            | connection::AMQPMethod::UpdateSecretOk(_) => Server,
            connection::AMQPMethod::StartOk(_)
            | connection::AMQPMethod::SecureOk(_)
            | connection::AMQPMethod::TuneOk(_)
            | connection::AMQPMethod::Open(_)
            | connection::AMQPMethod::UpdateSecret(_) => Client,
            connection::AMQPMethod::Close(_) | connection::AMQPMethod::CloseOk(_) => return None,
        },
        AMQPClass::Channel(m) => match m {
            channel::AMQPMethod::Open(_) => Client,
            channel::AMQPMethod::OpenOk(_) => Server,
            _ => return None,
        },
        AMQPClass::Exchange(m) => match m {
            exchange::AMQPMethod::Declare(_)
            | exchange::AMQPMethod::Delete(_)
            | exchange::AMQPMethod::Bind(_)
            | exchange::AMQPMethod::Unbind(_) => Client,
            _ => Server,
        },
        AMQPClass::Queue(m) => match m {
            queue::AMQPMethod::Declare(_)
            | queue::AMQPMethod::Bind(_)
            | queue::AMQPMethod::Purge(_)
            | queue::AMQPMethod::Delete(_)
            | queue::AMQPMethod::Unbind(_) => Client,
            _ => Server,
        },
        AMQPClass::Basic(m) => match m {
            basic::AMQPMethod::Qos(_)
            | basic::AMQPMethod::Consume(_)
            | basic::AMQPMethod::Publish(_)
            | basic::AMQPMethod::Get(_)
            | basic::AMQPMethod::Reject(_)
            | basic::AMQPMethod::RecoverAsync(_)
            | basic::AMQPMethod::Recover(_) => Client,
            basic::AMQPMethod::QosOk(_)
            | basic::AMQPMethod::ConsumeOk(_)
            | basic::AMQPMethod::Return(_)
            | basic::AMQPMethod::Deliver(_)
            | basic::AMQPMethod::GetOk(_)
            | basic::AMQPMethod::GetEmpty(_)
            | basic::AMQPMethod::RecoverOk(_) => Server,
            basic::AMQPMethod::Cancel(_)
            | basic::AMQPMethod::CancelOk(_)
            | basic::AMQPMethod::Ack(_)
            | basic::AMQPMethod::Nack(_) => return None,
        },
        AMQPClass::Confirm(m) => match m {
            confirm::AMQPMethod::Select(_) => Client,
            confirm::AMQPMethod::SelectOk(_) => Server,
        },
        AMQPClass::Tx(m) => match m {
            amq_protocol::protocol::tx::AMQPMethod::Select(_)
            | amq_protocol::protocol::tx::AMQPMethod::Commit(_)
            | amq_protocol::protocol::tx::AMQPMethod::Rollback(_) => Client,
            _ => Server,
        },
        AMQPClass::Access(m) => match m {
            amq_protocol::protocol::access::AMQPMethod::Request(_) => Client,
            amq_protocol::protocol::access::AMQPMethod::RequestOk(_) => Server,
        },
    })
}

/// The user name in a connection.start-ok response.
fn login(mechanism: &str, response: &[u8]) -> Option<String> {
    match mechanism {
        // authzid NUL authcid NUL password
        "PLAIN" => {
            let mut parts = response.split(|b| *b == 0);
            let _authzid = parts.next()?;
            let user = parts.next()?;
            Some(String::from_utf8_lossy(user).into_owned())
        }
        // A field table without its length prefix, holding LOGIN and PASSWORD.
        "AMQPLAIN" => {
            let mut table = Vec::with_capacity(response.len() + 4);
            table.extend_from_slice(&u32::try_from(response.len()).ok()?.to_be_bytes());
            table.extend_from_slice(response);
            if !decode::nesting_is_bounded(&table) {
                return None;
            }
            let (_, t) = amq_protocol::types::parsing::parse_field_table(table.as_slice()).ok()?;
            decode::headers(&t)
                .into_iter()
                .find(|(k, _)| k == "LOGIN")
                .map(|(_, v)| v)
        }
        _ => None,
    }
}

/// Outcome of looking for a frame at the start of a scan window.
enum Candidate {
    No,
    NeedMore,
    /// Frames start here.
    Yes,
}

/// A well-formed frame at the start of a scan window.
struct Checked {
    /// Offset of the octet after it.
    next: usize,
    /// It is connection.start on channel 0.
    is_start: bool,
    /// Its payload decoded as a method or a content header.
    decoded: bool,
}

/// Whether `b` starts with a well-formed frame.
fn check_frame(b: &[u8]) -> Result<Checked, Candidate> {
    if b.len() < 7 {
        return Err(Candidate::NeedMore);
    }
    let head = FrameHead::parse(b);
    if !head.is_sane(MAX_RESYNC_FRAME) {
        return Err(Candidate::No);
    }
    let end = 7 + head.size as usize;
    if b.len() <= end {
        return Err(Candidate::NeedMore);
    }
    if b[end] != FRAME_END {
        return Err(Candidate::No);
    }
    let payload = &b[7..end];
    let mut is_start = false;
    match head.kind {
        FRAME_METHOD => match decode::method(payload) {
            Some(AMQPClass::Connection(connection::AMQPMethod::Start(_))) => {
                is_start = head.channel == 0
            }
            Some(_) => {}
            None => return Err(Candidate::No),
        },
        FRAME_HEADER => match decode::content_header(payload) {
            Some(h) if h.class_id == 60 => {}
            _ => return Err(Candidate::No),
        },
        _ => {}
    }
    let decoded = matches!(head.kind, FRAME_METHOD | FRAME_HEADER);
    Ok(Checked {
        next: end + 1,
        is_start,
        decoded,
    })
}

/// Whether frames start at the beginning of `b`: two well-formed frames in a row, or a
/// lone connection.start at the very start of a direction. On a connection not yet
/// known to be AMQP, one of the two must be a method or content header that decoded:
/// heartbeats and bodies alone prove little.
fn candidate(b: &[u8], at_start: bool, need_decoded: bool) -> Candidate {
    match check_frame(b) {
        Err(c) => c,
        Ok(first) if first.is_start && at_start => Candidate::Yes,
        Ok(first) => match check_frame(&b[first.next..]) {
            Err(c) => c,
            Ok(second) if need_decoded && !first.decoded && !second.decoded => Candidate::No,
            Ok(_) => Candidate::Yes,
        },
    }
}

/// Where a skip lands when the rest of a content is laid out in frames.
enum Landing {
    /// At a frame boundary, in sync.
    Boundary,
    /// `seen` octets into the predicted frame header.
    Header { predicted: [u8; 7], seen: usize },
    /// Inside a body frame of `size`, `left` payload octets to come.
    Payload { size: u32, left: u64 },
    /// Just before a body frame's end octet.
    End { size: u32 },
    /// Past the content's end, `rest` octets into what followed.
    Beyond,
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
            channels: HashMap::new(),
            consumers: HashMap::new(),
            open_operations: 0,
            finished: VecDeque::new(),
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
    /// [`RETURN_WAIT_NS`]; call it now and then on an idle connection.
    pub fn tick(&mut self, now_ns: u64) {
        self.release_returns(now_ns);
    }

    /// The connection closed at `ts_ns`: every operation still open is finished (without
    /// confirm or outcome), contents still arriving are dropped.
    pub fn close(&mut self, ts_ns: u64) {
        if self.closed {
            return;
        }
        if self.decided == Some(true) {
            let mut ids: Vec<u16> = self.channels.keys().copied().collect();
            ids.sort_unstable();
            for id in ids {
                self.finish_channel(id, None, ts_ns, false);
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

    /// The first byte of a direction decides how it is read.
    fn start(&mut self, dir: Direction, first: u8) {
        let h = &mut self.halves[dir.index()];
        match first {
            b'A' => h.phase = Phase::ProtocolHeader,
            FRAME_METHOD | FRAME_HEADER | FRAME_BODY | FRAME_HEARTBEAT => h.phase = Phase::Lost,
            _ if self.decided.is_none() => self.not_amqp(),
            _ => {
                h.at_start = false;
                h.phase = Phase::Lost;
            }
        }
    }

    fn feed_protocol_header(&mut self, dir: Direction, data: &[u8]) -> usize {
        let h = &mut self.halves[dir.index()];
        let want = PROTOCOL_HEADER.len() - h.head.len();
        let n = want.min(data.len());
        h.head.extend_from_slice(&data[..n]);
        if !PROTOCOL_HEADER.starts_with(&h.head) {
            h.head.clear();
            if self.decided.is_none() {
                self.not_amqp();
            } else {
                self.lose_sync(dir);
            }
            return n;
        }
        if h.head.len() == PROTOCOL_HEADER.len() {
            h.head.clear();
            h.at_start = false;
            h.phase = Phase::FrameHeader;
            self.decided = Some(true);
            if self.client_dir.is_none() {
                self.client_dir = Some(dir);
            } else if self.client_dir != Some(dir) {
                // A broker answers with its own header to refuse the version, then closes.
                self.halves[dir.index()].phase = Phase::Stopped;
            }
        }
        n
    }

    /// Largest frame accepted in sync.
    fn frame_limit(&self) -> u32 {
        match self.frame_max {
            Some(0) => u32::MAX,
            Some(n) => n.max(4096),
            None => DEFAULT_FRAME_LIMIT,
        }
    }

    fn feed_frame_header(&mut self, dir: Direction, data: &[u8], ts_ns: u64) -> usize {
        let limit = self.frame_limit();
        let d = dir.index();
        let h = &mut self.halves[d];
        if h.head.is_empty() {
            h.frame_ns = ts_ns;
        }
        let n = (7 - h.head.len()).min(data.len());
        h.head.extend_from_slice(&data[..n]);
        if h.head.len() < 7 {
            return n;
        }
        let head = FrameHead::parse(&h.head);
        h.head.clear();
        let expected = h.expected_head.take();
        if expected.is_some_and(|e| e != head.bytes())
            || !head.is_sane(limit.saturating_sub(8).max(MAX_RESYNC_FRAME))
        {
            self.lose_sync(dir);
            return n;
        }
        h.frame = head;
        h.left = u64::from(head.size);
        h.payload.clear();
        h.damaged = head.size > MAX_BUFFERED_PAYLOAD;
        h.phase = if head.size == 0 {
            Phase::FrameEnd
        } else {
            Phase::Payload
        };
        if head.kind == FRAME_BODY {
            self.body_frame_starts(dir, head);
        }
        n
    }

    fn feed_payload(&mut self, dir: Direction, data: &[u8]) -> usize {
        let h = &mut self.halves[dir.index()];
        let n = usize::try_from(h.left).map_or(data.len(), |l| l.min(data.len()));
        h.left -= n as u64;
        if h.left == 0 {
            h.phase = Phase::FrameEnd;
        }
        if h.frame.kind == FRAME_BODY {
            self.body_bytes(dir, Some(&data[..n]), n as u64);
        } else if !h.damaged {
            h.payload.extend_from_slice(&data[..n]);
        }
        n
    }

    fn frame_end(&mut self, dir: Direction, octet: u8, ts_ns: u64) {
        let d = dir.index();
        if octet != FRAME_END {
            self.lose_sync(dir);
            return;
        }
        let h = &mut self.halves[d];
        h.phase = Phase::FrameHeader;
        let frame = h.frame;
        let damaged = h.damaged;
        let payload = std::mem::take(&mut h.payload);
        let frame_ns = h.frame_ns;
        match frame.kind {
            FRAME_METHOD if !damaged => match decode::method(&payload) {
                Some(class) => self.method(dir, frame.channel, class, frame_ns),
                None => self.content_broken(dir, frame.channel),
            },
            FRAME_HEADER if !damaged => match decode::content_header(&payload) {
                Some(header) if header.class_id == 60 => self.content_header(
                    dir,
                    frame.channel,
                    header.body_size,
                    header.properties,
                    ts_ns,
                ),
                _ => self.content_header_unknown(dir, frame.channel),
            },
            FRAME_HEADER => self.content_header_unknown(dir, frame.channel),
            FRAME_BODY => self.body_frame_ends(dir, frame.channel, ts_ns),
            _ => {
                if damaged && frame.kind == FRAME_METHOD {
                    self.content_broken(dir, frame.channel);
                }
            }
        }
        let h = &mut self.halves[d];
        h.payload = payload;
        h.payload.clear();
        h.payload.shrink_to(4096);
    }

    fn feed_lost(&mut self, dir: Direction, data: &[u8]) {
        let d = dir.index();
        self.count_undecided_scan(d, data.len() as u64);
        if !self.active() {
            return;
        }
        let h = &mut self.halves[d];
        h.scan.extend_from_slice(data);
        let mut pos = 0;
        let found = loop {
            if pos >= h.scan.len() {
                break false;
            }
            match candidate(
                &h.scan[pos..],
                h.at_start && pos == 0,
                self.decided.is_none(),
            ) {
                Candidate::No => {
                    if h.at_start && pos == 0 && self.decided.is_none() {
                        // The first bytes of a direction are not a frame.
                        self.not_amqp();
                        return;
                    }
                    pos += 1;
                }
                Candidate::NeedMore => break false,
                Candidate::Yes => break true,
            }
        };
        let h = &mut self.halves[d];
        if pos > 0 {
            h.at_start = false;
        }
        if found {
            let bytes = h.scan.split_off(pos);
            h.scan = Vec::new();
            h.phase = Phase::FrameHeader;
            h.head.clear();
            h.expected_head = None;
            h.replay = Some(bytes);
            self.decided = Some(true);
        } else {
            h.scan.drain(..pos);
        }
    }

    /// Sync is lost in direction `dir`: what was in flight there is dropped.
    fn lose_sync(&mut self, dir: Direction) {
        let d = dir.index();
        let h = &mut self.halves[d];
        h.phase = Phase::Lost;
        h.at_start = false;
        h.head.clear();
        h.expected_head = None;
        h.payload = Vec::new();
        h.scan.clear();
        let Some(client_dir) = self.client_dir else {
            return;
        };
        let from_client = dir == client_dir;
        let mut ids: Vec<u16> = self.channels.keys().copied().collect();
        ids.sort_unstable();
        for id in ids {
            let ch = self.channels.get_mut(&id).expect("listed above");
            ch.content[slot(from_client)] = None;
            let mut done = Vec::new();
            if from_client {
                // Acks may be in the gap, and publishes too (sequence numbers drift).
                done.extend(ch.unacked.drain(..).map(AmqpOperation::Delivery));
                if ch.confirms {
                    ch.seq_lost = true;
                }
            } else {
                done.extend(
                    ch.awaiting_confirm
                        .drain(..)
                        .map(|(_, p)| AmqpOperation::Publish(p)),
                );
            }
            self.open_operations -= done.len();
            for op in done {
                self.push_finished(op);
            }
        }
    }

    fn push_finished(&mut self, op: AmqpOperation) {
        if self.finished.len() >= MAX_FINISHED {
            self.finished.pop_front();
        }
        self.finished.push_back(op);
    }

    /// The channel state for frames on `id`, created on first use while under the bound.
    fn channel(&mut self, id: u16) -> Option<&mut Channel> {
        if !self.channels.contains_key(&id) && self.channels.len() >= MAX_CHANNELS {
            return None;
        }
        Some(self.channels.entry(id).or_default())
    }

    /// Makes room for one more open operation by finishing the oldest one.
    fn reserve_open_operation(&mut self) {
        if self.open_operations < MAX_OPEN_OPERATIONS {
            self.open_operations += 1;
            return;
        }
        let oldest = self
            .channels
            .iter()
            .flat_map(|(id, ch)| {
                let p = ch.awaiting_confirm.front().map(|(_, p)| p.start_ns);
                let r = ch.awaiting_return.front().map(|p| p.start_ns);
                let u = ch.unacked.front().map(|d| d.start_ns);
                [(p, 0), (r, 1), (u, 2)]
                    .into_iter()
                    .filter_map(move |(t, k)| t.map(|t| (t, *id, k)))
            })
            .min();
        let Some((_, id, which)) = oldest else {
            self.open_operations += 1;
            return;
        };
        let ch = self.channels.get_mut(&id).expect("found above");
        let op = match which {
            0 => ch
                .awaiting_confirm
                .pop_front()
                .map(|(_, p)| AmqpOperation::Publish(p)),
            1 => ch.awaiting_return.pop_front().map(AmqpOperation::Publish),
            _ => ch.unacked.pop_front().map(AmqpOperation::Delivery),
        };
        if let Some(op) = op {
            self.push_finished(op);
        }
    }

    /// Finishes mandatory publishes whose return had time to come.
    fn release_returns(&mut self, now_ns: u64) {
        if self.open_operations == 0 {
            return;
        }
        let mut done = Vec::new();
        for ch in self.channels.values_mut() {
            while ch
                .awaiting_return
                .front()
                .is_some_and(|p| p.end_ns.saturating_add(RETURN_WAIT_NS) <= now_ns)
            {
                done.push(ch.awaiting_return.pop_front().expect("checked"));
            }
        }
        done.sort_by_key(|p| p.start_ns);
        self.open_operations -= done.len();
        for p in done {
            self.push_finished(AmqpOperation::Publish(p));
        }
    }

    fn role_of(&self) -> Role {
        self.role().unwrap_or(Role::Client)
    }

    /// A method frame, decoded.
    fn method(&mut self, dir: Direction, channel_id: u16, class: AMQPClass, ts_ns: u64) {
        if let Some(role) = sender(&class) {
            let sent_by_client = role == Role::Client;
            match self.client_dir {
                None => self.client_dir = Some(if sent_by_client { dir } else { dir.opposite() }),
                Some(c) if (c == dir) != sent_by_client => return,
                Some(_) => {}
            }
        }
        let Some(client_dir) = self.client_dir else {
            return;
        };
        let from_client = dir == client_dir;
        // A method ends any content of this direction on the channel whose header did
        // not say its size (it was not understood).
        self.end_unsized_content(channel_id, from_client, ts_ns);
        match class {
            AMQPClass::Connection(m) => self.connection_method(m, from_client, ts_ns),
            AMQPClass::Channel(channel::AMQPMethod::Close(c)) => {
                let reason = CloseReason {
                    reply_code: c.reply_code,
                    reply_text: c.reply_text.as_str().to_owned(),
                    class_id: c.class_id,
                    method_id: c.method_id,
                    by: if from_client {
                        Role::Client
                    } else {
                        Role::Server
                    },
                };
                self.finish_channel(channel_id, Some(reason), ts_ns, true);
            }
            AMQPClass::Channel(_) => {}
            AMQPClass::Confirm(confirm::AMQPMethod::Select(_)) => {
                if let Some(ch) = self.channel(channel_id)
                    && !ch.confirms
                {
                    ch.confirms = true;
                    ch.next_seq = 1;
                }
            }
            AMQPClass::Exchange(exchange::AMQPMethod::Declare(m)) => {
                let change = Topology::ExchangeDeclare {
                    exchange: m.exchange.as_str().to_owned(),
                    kind: m.kind.as_str().to_owned(),
                };
                self.topology(channel_id, change, ts_ns);
            }
            AMQPClass::Queue(queue::AMQPMethod::DeclareOk(m)) => {
                let name = m.queue.as_str().to_owned();
                if let Some(ch) = self.channel(channel_id) {
                    ch.last_queue = Some(name.clone());
                }
                self.topology(channel_id, Topology::QueueDeclare { queue: name }, ts_ns);
            }
            AMQPClass::Queue(queue::AMQPMethod::Bind(m)) => {
                let queue = self.queue_name(channel_id, m.queue.as_str());
                let change = Topology::QueueBind {
                    queue,
                    exchange: m.exchange.as_str().to_owned(),
                    routing_key: m.routing_key.as_str().to_owned(),
                };
                self.topology(channel_id, change, ts_ns);
            }
            AMQPClass::Basic(m) => self.basic_method(channel_id, m, from_client, ts_ns),
            _ => {}
        }
        if !from_client {
            self.broker_answered(channel_id);
        }
    }

    fn topology(&mut self, channel: u16, change: Topology, ts_ns: u64) {
        let role = self.role_of();
        self.push_finished(AmqpOperation::Topology {
            role,
            channel,
            change,
            ts_ns,
        });
    }

    /// What a queue name means on a channel: empty is the last queue declared there.
    fn queue_name(&self, channel: u16, name: &str) -> String {
        if name.is_empty()
            && let Some(q) = self
                .channels
                .get(&channel)
                .and_then(|c| c.last_queue.as_ref())
        {
            return q.clone();
        }
        name.to_owned()
    }

    fn connection_method(&mut self, m: connection::AMQPMethod, from_client: bool, ts_ns: u64) {
        match m {
            connection::AMQPMethod::StartOk(s) => {
                self.user = login(s.mechanism.as_str(), s.response.as_bytes());
            }
            connection::AMQPMethod::TuneOk(t) => self.frame_max = Some(t.frame_max),
            connection::AMQPMethod::Open(o) => {
                self.vhost = Some(o.virtual_host.as_str().to_owned())
            }
            connection::AMQPMethod::Close(c) => {
                let reason = CloseReason {
                    reply_code: c.reply_code,
                    reply_text: c.reply_text.as_str().to_owned(),
                    class_id: c.class_id,
                    method_id: c.method_id,
                    by: if from_client {
                        Role::Client
                    } else {
                        Role::Server
                    },
                };
                let mut ids: Vec<u16> = self.channels.keys().copied().collect();
                ids.sort_unstable();
                let error = reason.is_error().then_some(&reason);
                for id in ids {
                    self.finish_channel(id, error.cloned(), ts_ns, false);
                }
                self.channels.clear();
                self.consumers.clear();
                if reason.is_error() {
                    let (role, vhost) = (self.role_of(), self.vhost.clone());
                    self.push_finished(AmqpOperation::ConnectionError {
                        role,
                        reason,
                        ts_ns,
                        vhost,
                    });
                }
            }
            _ => {}
        }
    }

    /// Closes channel `id`: its open operations finish (with the error, if the close
    /// was one), contents in flight are dropped. `report`: an error close of this
    /// channel alone is reported as a `ChannelError`.
    fn finish_channel(&mut self, id: u16, reason: Option<CloseReason>, ts_ns: u64, report: bool) {
        let Some(mut ch) = self.channels.remove(&id) else {
            if let Some(r) = reason.filter(|r| report && r.is_error()) {
                self.push_channel_error(id, r, ts_ns);
            }
            return;
        };
        self.consumers.retain(|(c, _), _| *c != id);
        self.open_operations -= ch.open_operations();
        let error = reason.clone().filter(CloseReason::is_error);
        let mut done: Vec<AmqpOperation> = Vec::new();
        for (_, mut p) in ch.awaiting_confirm.drain(..) {
            p.error.clone_from(&error);
            p.end_ns = p.end_ns.max(ts_ns);
            done.push(AmqpOperation::Publish(p));
        }
        for mut p in ch.awaiting_return.drain(..) {
            p.error.clone_from(&error);
            done.push(AmqpOperation::Publish(p));
        }
        for mut dl in ch.unacked.drain(..) {
            dl.error.clone_from(&error);
            dl.end_ns = dl.end_ns.max(ts_ns);
            done.push(AmqpOperation::Delivery(dl));
        }
        for op in done {
            self.push_finished(op);
        }
        if let Some(r) = error.filter(|_| report) {
            self.push_channel_error(id, r, ts_ns);
        }
    }

    fn push_channel_error(&mut self, channel: u16, reason: CloseReason, ts_ns: u64) {
        let (role, vhost) = (self.role_of(), self.vhost.clone());
        self.push_finished(AmqpOperation::ChannelError {
            role,
            channel,
            reason,
            ts_ns,
            vhost,
        });
    }

    fn basic_method(
        &mut self,
        channel_id: u16,
        m: basic::AMQPMethod,
        from_client: bool,
        ts_ns: u64,
    ) {
        let queue_of =
            |s: &Self, q: &amq_protocol::types::ShortString| s.queue_name(channel_id, q.as_str());
        match m {
            basic::AMQPMethod::Publish(p) if from_client => {
                let Some(ch) = self.channel(channel_id) else {
                    return;
                };
                let seq = (ch.confirms && !ch.seq_lost).then(|| {
                    ch.next_seq += 1;
                    ch.next_seq - 1
                });
                if ch.confirms && ch.seq_lost {
                    ch.next_seq += 1;
                }
                let message = Message {
                    exchange: p.exchange.as_str().to_owned(),
                    routing_key: p.routing_key.as_str().to_owned(),
                    ..Message::default()
                };
                self.begin_content(
                    channel_id,
                    true,
                    ContentOf::Publish {
                        mandatory: p.mandatory,
                        seq,
                    },
                    message,
                    ts_ns,
                );
            }
            basic::AMQPMethod::Deliver(dl) if !from_client => {
                let message = Message {
                    exchange: dl.exchange.as_str().to_owned(),
                    routing_key: dl.routing_key.as_str().to_owned(),
                    ..Message::default()
                };
                let of = ContentOf::Deliver {
                    consumer_tag: dl.consumer_tag.as_str().to_owned(),
                    delivery_tag: dl.delivery_tag,
                    redelivered: dl.redelivered,
                };
                self.begin_content(channel_id, false, of, message, ts_ns);
            }
            basic::AMQPMethod::GetOk(g) if !from_client => {
                let request = self
                    .channel(channel_id)
                    .and_then(|ch| ch.pending_gets.pop_front());
                let message = Message {
                    exchange: g.exchange.as_str().to_owned(),
                    routing_key: g.routing_key.as_str().to_owned(),
                    ..Message::default()
                };
                let of = ContentOf::GetOk {
                    delivery_tag: g.delivery_tag,
                    redelivered: g.redelivered,
                    no_ack: request.as_ref().is_some_and(|r| r.1),
                    queue: request.map(|r| r.0),
                };
                self.begin_content(channel_id, false, of, message, ts_ns);
            }
            basic::AMQPMethod::GetEmpty(_) if !from_client => {
                if let Some(ch) = self.channel(channel_id) {
                    ch.pending_gets.pop_front();
                }
            }
            basic::AMQPMethod::Return(r) if !from_client => {
                self.returned(channel_id, &r, ts_ns);
                let message = Message {
                    exchange: r.exchange.as_str().to_owned(),
                    routing_key: r.routing_key.as_str().to_owned(),
                    ..Message::default()
                };
                self.begin_content(channel_id, false, ContentOf::Return, message, ts_ns);
            }
            basic::AMQPMethod::Get(g) if from_client => {
                let queue = queue_of(self, &g.queue);
                if let Some(ch) = self.channel(channel_id)
                    && ch.pending_gets.len() < MAX_PENDING_REQUESTS
                {
                    ch.pending_gets.push_back((queue, g.no_ack));
                }
            }
            basic::AMQPMethod::Consume(c) if from_client => {
                let queue = queue_of(self, &c.queue);
                let tag = c.consumer_tag.as_str().to_owned();
                if !tag.is_empty() {
                    self.add_consumer(channel_id, tag.clone(), Some(queue.clone()), c.no_ack);
                }
                if !c.nowait
                    && let Some(ch) = self.channel(channel_id)
                    && ch.pending_consumes.len() < MAX_PENDING_REQUESTS
                {
                    ch.pending_consumes.push_back((queue, tag, c.no_ack));
                }
            }
            basic::AMQPMethod::ConsumeOk(ok) if !from_client => {
                let request = self
                    .channel(channel_id)
                    .and_then(|ch| ch.pending_consumes.pop_front());
                if let Some((queue, _, no_ack)) = request {
                    self.add_consumer(
                        channel_id,
                        ok.consumer_tag.as_str().to_owned(),
                        Some(queue),
                        no_ack,
                    );
                }
            }
            basic::AMQPMethod::CancelOk(c) => {
                self.consumers
                    .remove(&(channel_id, c.consumer_tag.as_str().to_owned()));
            }
            basic::AMQPMethod::Ack(a) if from_client => {
                self.settle(channel_id, a.delivery_tag, a.multiple, Outcome::Ack, ts_ns)
            }
            basic::AMQPMethod::Nack(n) if from_client => {
                let outcome = Outcome::Nack { requeue: n.requeue };
                self.settle(channel_id, n.delivery_tag, n.multiple, outcome, ts_ns);
            }
            basic::AMQPMethod::Reject(r) if from_client => self.settle(
                channel_id,
                r.delivery_tag,
                false,
                Outcome::Reject { requeue: r.requeue },
                ts_ns,
            ),
            basic::AMQPMethod::Ack(a) => {
                self.confirm(channel_id, a.delivery_tag, a.multiple, true, ts_ns)
            }
            basic::AMQPMethod::Nack(n) => {
                self.confirm(channel_id, n.delivery_tag, n.multiple, false, ts_ns)
            }
            _ => {}
        }
    }

    fn add_consumer(&mut self, channel: u16, tag: String, queue: Option<String>, no_ack: bool) {
        let key = (channel, tag);
        if self.consumers.contains_key(&key) || self.consumers.len() < MAX_CONSUMERS {
            self.consumers.insert(key, Consumer { queue, no_ack });
        }
    }

    /// basic.return: the broker gives back a mandatory message it could not route.
    fn returned(&mut self, channel_id: u16, r: &basic::Return, ts_ns: u64) {
        let Some(ch) = self.channels.get_mut(&channel_id) else {
            return;
        };
        let matches = |p: &Publish| {
            p.mandatory
                && p.returned.is_none()
                && p.message.exchange == r.exchange.as_str()
                && p.message.routing_key == r.routing_key.as_str()
        };
        let returned = Some((r.reply_code, r.reply_text.as_str().to_owned()));
        if let Some((_, p)) = ch.awaiting_confirm.iter_mut().find(|(_, p)| matches(p)) {
            p.returned = returned;
        } else if let Some(i) = ch.awaiting_return.iter().position(matches) {
            let mut p = ch.awaiting_return.remove(i).expect("index from position");
            p.returned = returned;
            p.end_ns = ts_ns;
            self.open_operations -= 1;
            self.push_finished(AmqpOperation::Publish(p));
        }
    }

    /// The broker sent a method on the channel: a return for the mandatory publishes
    /// before it would have come first.
    fn broker_answered(&mut self, channel_id: u16) {
        let Some(ch) = self.channels.get_mut(&channel_id) else {
            return;
        };
        if ch.awaiting_return.is_empty() {
            return;
        }
        let done: Vec<Publish> = ch.awaiting_return.drain(..).collect();
        self.open_operations -= done.len();
        for p in done {
            self.push_finished(AmqpOperation::Publish(p));
        }
    }

    /// Publisher confirm from the broker for sequence number `tag` (and all before it
    /// with `multiple`; tag 0 with `multiple` means all).
    fn confirm(&mut self, channel_id: u16, tag: u64, multiple: bool, ack: bool, ts_ns: u64) {
        let Some(ch) = self.channels.get_mut(&channel_id) else {
            return;
        };
        let done = take_settled(&mut ch.awaiting_confirm, tag, multiple, |(seq, _)| *seq);
        self.open_operations -= done.len();
        for (_, mut p) in done {
            p.confirmed = Some(ack);
            p.end_ns = ts_ns.max(p.end_ns);
            self.push_finished(AmqpOperation::Publish(p));
        }
    }

    /// The consumer settled delivery `tag` (and all before it with `multiple`; tag 0
    /// with `multiple` means all).
    fn settle(&mut self, channel_id: u16, tag: u64, multiple: bool, outcome: Outcome, ts_ns: u64) {
        let Some(ch) = self.channels.get_mut(&channel_id) else {
            return;
        };
        let done = take_settled(&mut ch.unacked, tag, multiple, |d| d.delivery_tag);
        if done.is_empty() && !ch.unknown_consumers.is_empty() {
            // An ack for a delivery finished with an unknown ack mode: the consumers of
            // the channel ack, and their next deliveries wait for theirs.
            for tag in std::mem::take(&mut ch.unknown_consumers) {
                self.add_consumer(channel_id, tag, None, false);
            }
            return;
        }
        self.open_operations -= done.len();
        for mut d in done {
            d.outcome = Some(outcome);
            d.end_ns = ts_ns.max(d.end_ns);
            self.push_finished(AmqpOperation::Delivery(d));
        }
    }

    fn begin_content(
        &mut self,
        channel_id: u16,
        from_client: bool,
        of: ContentOf,
        message: Message,
        ts_ns: u64,
    ) {
        let Some(ch) = self.channel(channel_id) else {
            return;
        };
        ch.content[slot(from_client)] = Some(Content {
            of,
            message,
            start_ns: ts_ns,
            expected: None,
            header_seen: false,
            received: 0,
            capturing: true,
            chunk_hint: None,
        });
    }

    fn content_mut(&mut self, dir: Direction, channel_id: u16) -> Option<&mut Content> {
        let from_client = self.client_dir? == dir;
        self.channels.get_mut(&channel_id)?.content[slot(from_client)].as_mut()
    }

    fn take_content(&mut self, dir: Direction, channel_id: u16) -> Option<Content> {
        let from_client = self.client_dir? == dir;
        self.channels.get_mut(&channel_id)?.content[slot(from_client)].take()
    }

    /// A method frame that could not be understood: a content it starts would be
    /// misattributed, so the one in flight on the channel ends.
    fn content_broken(&mut self, dir: Direction, channel_id: u16) {
        self.take_content(dir, channel_id);
    }

    fn content_header(
        &mut self,
        dir: Direction,
        channel_id: u16,
        body_size: u64,
        properties: Properties,
        ts_ns: u64,
    ) {
        let Some(c) = self.content_mut(dir, channel_id) else {
            return;
        };
        if c.header_seen {
            self.take_content(dir, channel_id);
            return;
        }
        c.header_seen = true;
        c.expected = Some(body_size);
        c.message.body_size = body_size;
        c.message.properties = properties;
        if body_size == 0 {
            self.complete_content(dir, channel_id, ts_ns);
        }
    }

    fn content_header_unknown(&mut self, dir: Direction, channel_id: u16) {
        let Some(c) = self.content_mut(dir, channel_id) else {
            return;
        };
        if c.header_seen {
            self.take_content(dir, channel_id);
            return;
        }
        c.header_seen = true;
    }

    /// A body frame's header: it must continue a content whose header came.
    fn body_frame_starts(&mut self, dir: Direction, head: FrameHead) {
        let Some(c) = self.content_mut(dir, head.channel) else {
            return;
        };
        if !c.header_seen
            || c.expected
                .is_some_and(|e| c.received + u64::from(head.size) > e)
        {
            self.take_content(dir, head.channel);
            return;
        }
        if c.chunk_hint.is_none()
            && c.received == 0
            && c.expected.is_some_and(|e| e > u64::from(head.size))
        {
            c.chunk_hint = Some(head.size);
        }
    }

    /// Body octets of the current frame: `data` when captured, else `len` uncaptured.
    fn body_bytes(&mut self, dir: Direction, data: Option<&[u8]>, len: u64) {
        let channel_id = self.halves[dir.index()].frame.channel;
        let Some(c) = self.content_mut(dir, channel_id) else {
            return;
        };
        match data {
            Some(d) if c.capturing => {
                let room = MAX_BODY_CAPTURE - c.message.body.len();
                c.message.body.extend_from_slice(&d[..room.min(d.len())]);
            }
            Some(_) => {}
            None => c.capturing = false,
        }
        c.received = c.received.saturating_add(len);
    }

    fn body_frame_ends(&mut self, dir: Direction, channel_id: u16, ts_ns: u64) {
        let Some(c) = self.content_mut(dir, channel_id) else {
            return;
        };
        if c.expected.is_some_and(|e| c.received >= e) {
            self.complete_content(dir, channel_id, ts_ns);
        }
    }

    /// A method on a channel ends a content whose size was not understood.
    fn end_unsized_content(&mut self, channel_id: u16, from_client: bool, ts_ns: u64) {
        let Some(ch) = self.channels.get_mut(&channel_id) else {
            return;
        };
        if let Some(c) = &mut ch.content[slot(from_client)]
            && c.header_seen
            && c.expected.is_none()
        {
            c.message.body_size = c.received;
            c.expected = Some(c.received);
            let dir = if from_client {
                self.client_dir
            } else {
                self.client_dir.map(Direction::opposite)
            };
            if let Some(dir) = dir {
                self.complete_content(dir, channel_id, ts_ns);
            }
        }
    }

    /// The content on `channel_id` in direction `dir` is complete.
    fn complete_content(&mut self, dir: Direction, channel_id: u16, ts_ns: u64) {
        let Some(c) = self.take_content(dir, channel_id) else {
            return;
        };
        let role = self.role_of();
        let (vhost, user) = (self.vhost.clone(), self.user.clone());
        match c.of {
            ContentOf::Return => {}
            ContentOf::Publish { mandatory, seq } => {
                let publish = Publish {
                    role,
                    channel: channel_id,
                    message: c.message,
                    mandatory,
                    start_ns: c.start_ns,
                    end_ns: ts_ns,
                    confirmed: None,
                    returned: None,
                    error: None,
                    vhost,
                    user,
                };
                if let Some(seq) = seq {
                    self.reserve_open_operation();
                    if let Some(ch) = self.channels.get_mut(&channel_id) {
                        ch.awaiting_confirm.push_back((seq, publish));
                    }
                } else if mandatory {
                    self.reserve_open_operation();
                    if let Some(ch) = self.channels.get_mut(&channel_id) {
                        ch.awaiting_return.push_back(publish);
                    }
                } else {
                    self.push_finished(AmqpOperation::Publish(publish));
                }
            }
            ContentOf::Deliver {
                consumer_tag,
                delivery_tag,
                redelivered,
            } => {
                let consumer = self.consumers.get(&(channel_id, consumer_tag.clone()));
                let (queue, no_ack) = match consumer {
                    Some(cn) => (cn.queue.clone(), Some(cn.no_ack)),
                    None => (None, None),
                };
                if no_ack.is_none()
                    && let Some(ch) = self.channels.get_mut(&channel_id)
                    && ch.unknown_consumers.len() < MAX_UNKNOWN_CONSUMERS
                    && !ch.unknown_consumers.contains(&consumer_tag)
                {
                    ch.unknown_consumers.push(consumer_tag.clone());
                }
                let delivery = Delivery {
                    role,
                    kind: DeliveryKind::Deliver,
                    channel: channel_id,
                    consumer_tag: Some(consumer_tag),
                    queue,
                    delivery_tag,
                    redelivered,
                    message: c.message,
                    start_ns: c.start_ns,
                    end_ns: ts_ns,
                    outcome: match no_ack {
                        Some(true) => Some(Outcome::AutoAck),
                        Some(false) => None,
                        None => Some(Outcome::AckModeUnknown),
                    },
                    error: None,
                    vhost,
                    user,
                };
                self.delivered(channel_id, delivery, no_ack != Some(false));
            }
            ContentOf::GetOk {
                delivery_tag,
                redelivered,
                queue,
                no_ack,
            } => {
                let delivery = Delivery {
                    role,
                    kind: DeliveryKind::Get,
                    channel: channel_id,
                    consumer_tag: None,
                    queue,
                    delivery_tag,
                    redelivered,
                    message: c.message,
                    start_ns: c.start_ns,
                    end_ns: ts_ns,
                    outcome: no_ack.then_some(Outcome::AutoAck),
                    error: None,
                    vhost,
                    user,
                };
                self.delivered(channel_id, delivery, no_ack);
            }
        }
    }

    /// A delivery's content is complete; `settled` when no ack will be waited for (the
    /// consumer or get asked for none, or whether it acks is unknown).
    fn delivered(&mut self, channel_id: u16, delivery: Delivery, settled: bool) {
        if self.role() == Some(Role::Server) {
            self.push_finished(AmqpOperation::Dispatch(delivery.clone()));
        }
        if settled {
            self.push_finished(AmqpOperation::Delivery(delivery));
            return;
        }
        self.reserve_open_operation();
        match self.channels.get_mut(&channel_id) {
            Some(ch) => ch.unacked.push_back(delivery),
            None => {
                self.open_operations -= 1;
                self.push_finished(AmqpOperation::Delivery(delivery));
            }
        }
    }

    /// Whether the rest of the current content can be laid out in frames: in or right
    /// after a body frame, or between frames with one content of this direction
    /// waiting for body.
    fn can_lay_out(&self, dir: Direction) -> bool {
        self.layout_content(dir).is_some()
    }

    /// The channel and content a skip in direction `dir` belongs to, if it can be
    /// laid out.
    fn layout_content(&self, dir: Direction) -> Option<(u16, &Content)> {
        let h = &self.halves[dir.index()];
        let from_client = self.client_dir? == dir;
        let channel_id = match h.phase {
            Phase::Payload | Phase::FrameEnd if h.frame.kind == FRAME_BODY => h.frame.channel,
            Phase::FrameHeader => {
                // Only one content of this direction may be waiting for body.
                let mut waiting = self.channels.iter().filter(|(_, ch)| {
                    ch.content[slot(from_client)]
                        .as_ref()
                        .is_some_and(|c| c.header_seen && c.expected.is_some())
                });
                let (id, _) = waiting.next()?;
                if waiting.next().is_some() {
                    return None;
                }
                *id
            }
            _ => return None,
        };
        let c = self.channels.get(&channel_id)?.content[slot(from_client)].as_ref()?;
        c.expected?;
        Some((channel_id, c))
    }

    /// `len` uncaptured bytes at a point where the rest of a content can be laid out.
    fn skip_laid_out(&mut self, dir: Direction, len: u64, ts_ns: u64) {
        let d = dir.index();
        let Some((channel_id, c)) = self.layout_content(dir) else {
            self.lose_sync(dir);
            return;
        };
        let expected = c.expected.unwrap_or(0);
        let chunk = match self.frame_max {
            Some(n) if n > 8 => Some(u64::from(n - 8)),
            _ => c.chunk_hint.map(u64::from),
        };
        let h = &self.halves[d];
        let head_seen = h.head.len() as u64;
        // Octets of the content's frames still to come from here, simulated.
        let mut rem = len;
        let mut remaining_body = expected - c.received;
        let mut body = 0u64;
        let landing = 'sim: {
            match h.phase {
                Phase::Payload => {
                    // Current body frame: `left` payload octets then its end octet.
                    let left = h.left;
                    remaining_body -= left;
                    body += left;
                    rem -= left;
                    if rem == 0 {
                        break 'sim Landing::End { size: h.frame.size };
                    }
                    rem -= 1;
                }
                Phase::FrameEnd => rem -= 1,
                _ => {}
            }
            let mut first_head_seen = if h.phase == Phase::FrameHeader {
                head_seen
            } else {
                0
            };
            loop {
                if rem == 0 {
                    break 'sim Landing::Boundary;
                }
                if remaining_body == 0 {
                    break 'sim Landing::Beyond;
                }
                let Some(chunk) = chunk else {
                    break 'sim Landing::Beyond;
                };
                let size = chunk.min(remaining_body);
                let head = FrameHead {
                    kind: FRAME_BODY,
                    channel: channel_id,
                    size: size as u32,
                }
                .bytes();
                if first_head_seen > 0 && h.head[..] != head[..first_head_seen as usize] {
                    break 'sim Landing::Beyond;
                }
                let head_left = 7 - first_head_seen;
                first_head_seen = 0;
                if rem < head_left {
                    break 'sim Landing::Header {
                        predicted: head,
                        seen: (7 - head_left + rem) as usize,
                    };
                }
                rem -= head_left;
                if rem < size {
                    body += rem;
                    break 'sim Landing::Payload {
                        size: size as u32,
                        left: size - rem,
                    };
                }
                rem -= size;
                body += size;
                remaining_body -= size;
                if rem == 0 {
                    break 'sim Landing::End { size: size as u32 };
                }
                rem -= 1;
            }
        };
        // Account for the body octets passed, frame by frame collapsed into one count.
        if let Some(c) = self.content_mut(dir, channel_id) {
            c.capturing = false;
            c.received = c.received.saturating_add(body);
        }
        let complete = self
            .content_mut(dir, channel_id)
            .is_some_and(|c| c.received >= expected);
        if complete && !matches!(landing, Landing::Payload { .. } | Landing::End { .. }) {
            self.complete_content(dir, channel_id, ts_ns);
        } else if complete && matches!(landing, Landing::End { .. }) {
            // The end octet of the last frame is still to come; complete when it does.
        }
        let h = &mut self.halves[d];
        h.head.clear();
        h.expected_head = None;
        match landing {
            Landing::Boundary => h.phase = Phase::FrameHeader,
            Landing::Header { predicted, seen } => {
                h.phase = Phase::FrameHeader;
                h.head.extend_from_slice(&predicted[..seen]);
                h.expected_head = Some(predicted);
            }
            Landing::Payload { size, left } => {
                h.phase = Phase::Payload;
                h.frame = FrameHead {
                    kind: FRAME_BODY,
                    channel: channel_id,
                    size,
                };
                h.left = left;
            }
            Landing::End { size } => {
                h.phase = Phase::FrameEnd;
                h.frame = FrameHead {
                    kind: FRAME_BODY,
                    channel: channel_id,
                    size,
                };
                h.left = 0;
            }
            Landing::Beyond => self.lose_sync(dir),
        }
    }
}

impl ProtocolParser for AmqpParser {
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

    /// Whatever the reason, what is open finishes without confirm or outcome.
    fn close(&mut self, ts_ns: u64, _reason: EndReason) {
        AmqpParser::close(self, ts_ns);
    }

    fn tick(&mut self, now_ns: u64) {
        AmqpParser::tick(self, now_ns);
    }

    fn take(&mut self, out: &mut Vec<Parsed>) {
        out.extend(self.finished.drain(..).map(Parsed::Amqp));
    }

    fn next_message_in(&self, dir: Direction) -> Option<u64> {
        AmqpParser::next_message_in(self, dir)
    }

    fn in_sync(&self, dir: Direction) -> bool {
        self.halves[dir.index()].phase != Phase::Lost
    }
}

/// Takes from `queue` (oldest first, tags ascending) the entry with tag `tag`, or with
/// `multiple` every entry up to `tag` (all of them for tag 0): the rule basic.ack,
/// basic.nack and the broker's confirms share.
fn take_settled<T>(
    queue: &mut VecDeque<T>,
    tag: u64,
    multiple: bool,
    tag_of: impl Fn(&T) -> u64,
) -> Vec<T> {
    let mut done = Vec::new();
    if multiple {
        while queue.front().is_some_and(|e| tag == 0 || tag_of(e) <= tag) {
            done.extend(queue.pop_front());
        }
    } else if let Some(i) = queue.iter().position(|e| tag_of(e) == tag) {
        done.extend(queue.remove(i));
    }
    done
}

#[cfg(test)]
mod tests;
