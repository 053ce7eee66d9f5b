//! What the AMQP parser emits: operations (publishes, deliveries, errors, topology)
//! with the messages they carried, and their one-line text form for logs and golden
//! files.

use super::FIRST_ERROR_CODE;
use crate::conn::{EndReason, Role};

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
    /// The body's first bytes, at most [`MAX_BODY_CAPTURE`](super::MAX_BODY_CAPTURE); shorter than the body when
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
    /// acks is unknown, and no ack came within [`ACK_MODE_WAIT_NS`](super::ACK_MODE_WAIT_NS):
    /// finished as delivered rather than waiting for an ack that may never come. (While
    /// such a delivery waits, this is its outcome too.)
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
    /// The basic.publish's number on its connection, from 0 (every one the client
    /// sent, whatever its channel): the injector numbers them the same way.
    pub number: u64,
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
    /// The connection ended, for this reason, while the publish waited for its confirm.
    pub incomplete: Option<EndReason>,
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
    /// The connection ended, for this reason, while the delivery waited for its ack.
    pub incomplete: Option<EndReason>,
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
///   waits up to [`RETURN_WAIT_NS`](super::RETURN_WAIT_NS) for a basic.return; or when the channel or the
///   connection closes.
/// - `Delivery`: when acked, nacked or rejected (the `multiple` flag settles every
///   earlier tag of the channel), at once for auto-ack consumers and gets, or when the
///   channel or connection closes (`outcome` `None`).
/// - `ChannelError`, `ConnectionError`: a close with an error reply code (300 and up).
/// - `Topology`: when declared (bound), or when the queue declaration was answered.
/// - `Dispatch`: the broker's side only (the traced process is the broker): as soon as
///   the content of a basic.deliver or basic.get-ok it sent is complete, without its
///   outcome; the same delivery follows as a `Delivery` when settled. The broker's view
///   of a message (`crate::context::amqp`) needs the time a message left the broker, not
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
                if let Some(r) = p.incomplete {
                    write!(f, " incomplete={}", r.as_str())?;
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
                if let Some(r) = d.incomplete {
                    write!(f, " incomplete={}", r.as_str())?;
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
