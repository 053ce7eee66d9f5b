//! Protocol parsers: one module per protocol, each incremental (it answers "need more
//! bytes" rather than guessing) and tolerant of gaps in the captured stream, behind one
//! trait, [`ProtocolParser`]. [`detect`] runs them side by side on a new connection
//! until one recognises it.

pub mod amqp;
pub mod detect;
pub mod http;
pub mod http2;

use agent_common::Direction;

use self::{
    amqp::AmqpOperation,
    http::{HttpExchange, RequestHead},
};
use crate::conn::{EndReason, Role};

/// What a connection's parser produced. Short-lived (built and consumed in one call),
/// so the size difference of the variants costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Parsed {
    Http(HttpExchange),
    Amqp(AmqpOperation),
    /// An exchange began; what it began is finished later as `Http` or `Amqp`, and
    /// the two carry the same identity (the HTTP exchange's `seq`, the delivery's
    /// channel and tag). Taken before what finished in the same call.
    Started(Started),
}

/// The start of an exchange, so that the context stage can give it its span id, its
/// trace and the calls its service makes while it lasts before it is finished.
#[derive(Debug)]
pub enum Started {
    /// A whole request was read (server) or written (client).
    Http {
        seq: u64,
        role: Role,
        /// The exchange's own, shared: not copied.
        request: std::sync::Arc<RequestHead>,
        /// The request body's captured prefix.
        body: Vec<u8>,
        /// When its first byte moved.
        start_ns: u64,
    },
    /// A consumer received a delivery (basic.deliver or basic.get-ok with content):
    /// its processing lasts until the ack, or, with no ack to wait for, is unknown.
    Delivery {
        /// The delivery as it stands when its content is complete.
        delivery: Box<amqp::Delivery>,
        /// No ack will come (no-ack consumer or get).
        settled: bool,
    },
}

/// One protocol's parser for one connection, both directions. The pipeline hands each
/// direction's stream over as [`crate::reassembly`] rebuilds it: bytes, gaps of known
/// length and gaps of unknown length.
pub trait ProtocolParser: Send + std::fmt::Debug {
    /// `None` until the first messages are recognised, `Some(false)` when the
    /// connection does not speak this protocol (stop feeding it), `Some(true)` once it
    /// does.
    fn detect(&self) -> Option<bool>;
    /// The next bytes of direction `dir`, carried by a syscall at monotonic `ts_ns`.
    fn feed(&mut self, dir: Direction, data: &[u8], ts_ns: u64);
    /// `len` bytes of direction `dir` passed without being captured.
    fn skip(&mut self, dir: Direction, len: u64, ts_ns: u64);
    /// An unknown number of bytes of direction `dir` is missing.
    fn resync(&mut self, dir: Direction);
    /// The connection ended at `ts_ns` for `reason`: what is still open is finished
    /// (an exchange cut short says so, with the reason).
    fn close(&mut self, ts_ns: u64, reason: EndReason);
    /// Time passes on a connection that may be idle (`now_ns` monotonic).
    fn tick(&mut self, now_ns: u64);
    /// What finished since the last call, oldest first, appended to `out`.
    fn take(&mut self, out: &mut Vec<Parsed>);
    /// When direction `dir` is inside a message whose remaining length the parser
    /// knows (HTTP: a body with Content-Length, the data of a known chunk; AMQP: a
    /// frame whose size it has read), the number of bytes still to come, counted from
    /// the end of what was fed, before the parser must read framing again: the next
    /// message's head, the line after a chunk's data, the next frame's header. `Some(0)`
    /// when the next byte starts a message or frame; `None` when it is not known.
    fn next_message_in(&self, dir: Direction) -> Option<u64>;
    /// Whether direction `dir` is in sync (not scanning for a message boundary after a
    /// loss).
    fn in_sync(&self, dir: Direction) -> bool;
    /// Whether the stream is made of frames the kernel can follow by itself from one
    /// frame start on (each frame's header says where the next one starts): AMQP.
    fn kernel_follows_frames(&self) -> bool {
        false
    }
    /// The parser that takes over when the connection switched protocols (HTTP/1.1's
    /// `Upgrade: h2c`), once; take this parser's output first.
    fn upgrade(&mut self) -> Option<Box<dyn ProtocolParser>> {
        None
    }
}
