//! RabbitMQ producer and consumer spans from parsed AMQP 0-9-1 operations, with the
//! attributes of the OpenTelemetry messaging and RabbitMQ semantic conventions.
//!
//! Choices the conventions leave open or that sonde adds:
//! - `messaging.destination.name` follows the current RabbitMQ conventions:
//!   `{exchange}:{routing key}` for a publish (`amq.default` for the default exchange
//!   without a routing key), `{exchange}:{routing key}:{queue}` for a delivery, empty
//!   parts left out, a routing key equal to the queue written once.
//! - The queue a delivery came from is also `messaging.destination.subscription.name`:
//!   the conventions have no queue attribute, and a queue is what a RabbitMQ consumer
//!   subscribes to.
//! - Span names are `{messaging.operation.name} {destination}`: `publish`, `deliver`
//!   (pushed to a consumer, operation type `process`) or `get` (pulled, operation type
//!   `receive`); a server-named queue (`amq.gen-...`) is anonymous and left out of the
//!   name.
//! - sonde's own attributes: [`OUTCOME`], [`REDELIVERED`] and, set by the message
//!   linker, [`BROKER_WAIT_MS`].
//! - Errors: a publish the broker returned (unroutable mandatory message) or did not
//!   confirm (basic.nack), and anything a channel or connection close with a reply code
//!   other than 200 cut short. A consumer's nack or reject is an outcome, not an error.
//! - A valid `traceparent` in the message headers gives the span its trace id and parent
//!   (DESIGN.md rule 1).
//! - The broker's view: when the traced process is the broker (RabbitMQ's `beam.smp`),
//!   each publish it received is a **broker span** on the broker's service, kind
//!   `SERVER`, named `route {destination}` (operation name `route`). `SERVER` because the
//!   span covers the broker's handling of a request that came from a remote peer (the
//!   publisher's basic.publish), and its parent is that peer's span: the conventions
//!   reserve `INTERNAL` for operations without a remote parent or children, and
//!   `PRODUCER`/`CONSUMER` for the clients of a messaging system (a `CONSUMER` broker
//!   span would count as one more delivery in tools that count consumers).
//!   `messaging.operation.type` is left out: none of its values (create, send, receive,
//!   process, settle) is what a broker does when it routes. The message linker
//!   (`crate::context::amqp`) completes it: parent (the producer span), end (the last
//!   delivery the broker sent for the message), [`QUEUES`] and [`DELIVERIES`].
//! - Other operations seen from the broker's side of a connection make no span: the
//!   client's side already makes them when both run on this node.

use std::sync::Arc;

use opentelemetry_semantic_conventions::attribute as semconv;

use super::{
    INCOMPLETE, INCOMPLETE_REASON, KeyValue, Resource, Span, SpanKind, Status, new_span_id,
    new_trace_id,
};
use crate::conn::{ConnInfo, EndReason, Role};
use crate::context::w3c::parse_traceparent;
use crate::protocols::amqp::{
    AmqpOperation, CloseReason, Delivery, DeliveryKind, Message, Outcome, Publish,
};

/// How a consumer settled the message: `ack`, `auto_ack`, `nack`, `reject`,
/// `requeue` (a nack or reject that put it back in the queue), or `unknown` when the
/// consumer registered before the agent saw its connection, so that whether it acks is
/// unknown (the span then ends when the message was delivered). For a publish with
/// confirms: `ack` or `nack` from the broker, or `returned`.
pub const OUTCOME: &str = "messaging.rabbitmq.outcome";
/// The broker flagged the delivery as redelivered (an earlier delivery was not acked).
pub const REDELIVERED: &str = "messaging.rabbitmq.redelivered";
/// Milliseconds between the start of the publish and the start of the delivery: how
/// long the message waited in the broker. Set on consumer spans linked to their
/// producer span (`crate::context::amqp`), whose clocks are the same node's.
pub const BROKER_WAIT_MS: &str = "messaging.rabbitmq.broker_wait_ms";
/// Broker span: the exchange the message was published to (`amq.default` for the
/// default exchange, whose name is empty).
pub const EXCHANGE: &str = "messaging.rabbitmq.exchange";
/// Broker span: the queues the broker delivered the message from (a string array, in
/// the order of their first delivery; queues of consumers older than the agent are
/// unknown and left out).
pub const QUEUES: &str = "messaging.rabbitmq.queues";
/// Broker span: how many deliveries (basic.deliver, basic.get-ok) the broker sent for
/// the message, redeliveries included.
pub const DELIVERIES: &str = "messaging.rabbitmq.deliveries";

/// The span of one operation, `None` for operations that make none (topology, the
/// broker's side other than the publishes it received). `mono_to_unix_ns` is added to
/// monotonic times to get Unix times.
pub fn amqp_span(
    op: &AmqpOperation,
    conn: &ConnInfo,
    resource: Arc<Resource>,
    mono_to_unix_ns: i128,
) -> Option<Span> {
    match op {
        AmqpOperation::Publish(p) if p.role == Role::Client => {
            Some(publish_span(p, conn, resource, mono_to_unix_ns))
        }
        AmqpOperation::Publish(p) => Some(route_span(p, conn, resource, mono_to_unix_ns)),
        AmqpOperation::Delivery(d) if d.role == Role::Client => {
            Some(delivery_span(d, conn, resource, mono_to_unix_ns))
        }
        AmqpOperation::ChannelError {
            role: Role::Client,
            reason,
            ts_ns,
            ..
        }
        | AmqpOperation::ConnectionError {
            role: Role::Client,
            reason,
            ts_ns,
            ..
        } => Some(error_span(reason, *ts_ns, conn, resource, mono_to_unix_ns)),
        _ => None,
    }
}

/// The attributes every RabbitMQ span has, with the broker as server and peer.
fn common(operation_type: &str, operation_name: &str, conn: &ConnInfo) -> Vec<KeyValue> {
    vec![
        KeyValue::new(semconv::MESSAGING_SYSTEM, "rabbitmq"),
        KeyValue::new(semconv::MESSAGING_OPERATION_TYPE, operation_type),
        KeyValue::new(semconv::MESSAGING_OPERATION_NAME, operation_name),
        KeyValue::new(semconv::SERVER_ADDRESS, conn.remote.ip().to_string()),
        KeyValue::new(semconv::SERVER_PORT, conn.remote.port()),
        KeyValue::new(semconv::NETWORK_PEER_ADDRESS, conn.remote.ip().to_string()),
        KeyValue::new(semconv::NETWORK_PEER_PORT, conn.remote.port()),
        KeyValue::new(semconv::NETWORK_PROTOCOL_NAME, "amqp"),
        KeyValue::new(semconv::NETWORK_PROTOCOL_VERSION, "0.9.1"),
    ]
}

/// Attributes of the message itself.
fn message_attributes(m: &Message, attrs: &mut Vec<KeyValue>) {
    if !m.routing_key.is_empty() {
        attrs.push(KeyValue::new(
            semconv::MESSAGING_RABBITMQ_DESTINATION_ROUTING_KEY,
            m.routing_key.as_str(),
        ));
    }
    if let Some(id) = &m.properties.message_id {
        attrs.push(KeyValue::new(semconv::MESSAGING_MESSAGE_ID, id.as_str()));
    }
    if let Some(id) = &m.properties.correlation_id {
        attrs.push(KeyValue::new(
            semconv::MESSAGING_MESSAGE_CONVERSATION_ID,
            id.as_str(),
        ));
    }
    attrs.push(KeyValue::new(
        semconv::MESSAGING_MESSAGE_BODY_SIZE,
        m.body_size,
    ));
}

/// A server-named queue: its name means nothing to a reader and varies per run.
fn is_anonymous(name: &str) -> bool {
    name.starts_with("amq.gen-")
}

/// `messaging.destination.name` of a publish.
pub fn publish_destination(m: &Message) -> String {
    match (m.exchange.is_empty(), m.routing_key.is_empty()) {
        (false, false) => format!("{}:{}", m.exchange, m.routing_key),
        (false, true) => m.exchange.clone(),
        (true, false) => m.routing_key.clone(),
        (true, true) => "amq.default".to_owned(),
    }
}

/// `messaging.destination.name` of a delivery from `queue`.
pub fn delivery_destination(m: &Message, queue: Option<&str>) -> String {
    let mut parts: Vec<&str> = Vec::with_capacity(3);
    for part in [m.exchange.as_str(), m.routing_key.as_str()] {
        if !part.is_empty() {
            parts.push(part);
        }
    }
    if let Some(q) = queue.filter(|q| !q.is_empty() && *q != m.routing_key) {
        parts.push(q);
    }
    if parts.is_empty() {
        "amq.default".to_owned()
    } else {
        parts.join(":")
    }
}

/// Trace id and parent from a `traceparent` header, else a new trace.
fn trace_of(m: &Message) -> ([u8; 16], Option<[u8; 8]>) {
    match m
        .properties
        .header("traceparent")
        .and_then(parse_traceparent)
    {
        Some((trace, parent, _flags)) => (trace, Some(parent)),
        None => (new_trace_id(), None),
    }
}

fn to_unix(mono_ns: u64, mono_to_unix_ns: i128) -> u64 {
    (i128::from(mono_ns) + mono_to_unix_ns).clamp(0, i128::from(u64::MAX)) as u64
}

/// The error type of a reply code: the AMQP constant's name, else the code.
fn error_type(code: u16) -> String {
    let name = match code {
        311 => "content-too-large",
        312 => "no-route",
        313 => "no-consumers",
        320 => "connection-forced",
        402 => "invalid-path",
        403 => "access-refused",
        404 => "not-found",
        405 => "resource-locked",
        406 => "precondition-failed",
        501 => "frame-error",
        502 => "syntax-error",
        503 => "command-invalid",
        504 => "channel-error",
        505 => "unexpected-frame",
        506 => "resource-error",
        530 => "not-allowed",
        540 => "not-implemented",
        541 => "internal-error",
        _ => return code.to_string(),
    };
    name.to_owned()
}

fn close_status(reason: &CloseReason, attrs: &mut Vec<KeyValue>) -> Status {
    attrs.push(KeyValue::new(
        semconv::ERROR_TYPE,
        error_type(reason.reply_code),
    ));
    Status::Error(format!("{} {}", reason.reply_code, reason.reply_text))
}

fn publish_span(
    p: &Publish,
    conn: &ConnInfo,
    resource: Arc<Resource>,
    mono_to_unix_ns: i128,
) -> Span {
    let m = &p.message;
    let destination = publish_destination(m);
    let mut attrs = common("send", "publish", conn);
    attrs.push(KeyValue::new(
        semconv::MESSAGING_DESTINATION_NAME,
        destination.as_str(),
    ));
    message_attributes(m, &mut attrs);
    publish_span_of(
        p,
        &destination,
        attrs,
        "publish",
        SpanKind::Producer,
        resource,
        mono_to_unix_ns,
    )
}

/// The broker's span of a publish it received, before the message linker adds its
/// parent, deliveries and end. `conn` is the broker's side of the publisher's
/// connection.
fn route_span(
    p: &Publish,
    conn: &ConnInfo,
    resource: Arc<Resource>,
    mono_to_unix_ns: i128,
) -> Span {
    let m = &p.message;
    let destination = publish_destination(m);
    let exchange = if m.exchange.is_empty() {
        "amq.default"
    } else {
        m.exchange.as_str()
    };
    let mut attrs = vec![
        KeyValue::new(semconv::MESSAGING_SYSTEM, "rabbitmq"),
        KeyValue::new(semconv::MESSAGING_OPERATION_NAME, "route"),
        KeyValue::new(semconv::MESSAGING_DESTINATION_NAME, destination.as_str()),
        KeyValue::new(EXCHANGE, exchange),
    ];
    message_attributes(m, &mut attrs);
    attrs.push(KeyValue::new(DELIVERIES, 0u64));
    attrs.extend([
        KeyValue::new(semconv::SERVER_ADDRESS, conn.local.ip().to_string()),
        KeyValue::new(semconv::SERVER_PORT, conn.local.port()),
        KeyValue::new(semconv::CLIENT_ADDRESS, conn.remote.ip().to_string()),
        KeyValue::new(semconv::CLIENT_PORT, conn.remote.port()),
        KeyValue::new(semconv::NETWORK_PEER_ADDRESS, conn.remote.ip().to_string()),
        KeyValue::new(semconv::NETWORK_PEER_PORT, conn.remote.port()),
        KeyValue::new(semconv::NETWORK_PROTOCOL_NAME, "amqp"),
        KeyValue::new(semconv::NETWORK_PROTOCOL_VERSION, "0.9.1"),
    ]);
    publish_span_of(
        p,
        &destination,
        attrs,
        "route",
        SpanKind::Server,
        resource,
        mono_to_unix_ns,
    )
}

/// The outcome of a publish (confirm, return, channel error) and the span around it,
/// for the publisher's producer span and the broker's route span alike.
fn publish_span_of(
    p: &Publish,
    destination: &str,
    mut attrs: Vec<KeyValue>,
    operation: &str,
    kind: SpanKind,
    resource: Arc<Resource>,
    mono_to_unix_ns: i128,
) -> Span {
    let m = &p.message;
    let mut status = Status::Unset;
    if let Some((code, text)) = &p.returned {
        attrs.push(KeyValue::new(OUTCOME, "returned"));
        attrs.push(KeyValue::new(semconv::ERROR_TYPE, error_type(*code)));
        status = Status::Error(format!("{code} {text}"));
    } else if let Some(confirmed) = p.confirmed {
        attrs.push(KeyValue::new(
            OUTCOME,
            if confirmed { "ack" } else { "nack" },
        ));
        if !confirmed {
            attrs.push(KeyValue::new(semconv::ERROR_TYPE, "nack"));
            status =
                Status::Error("the broker did not confirm the publish (basic.nack)".to_owned());
        }
    }
    if let Some(reason) = &p.error {
        status = close_status(reason, &mut attrs);
    }
    incomplete(p.incomplete, &mut attrs);
    let (trace_id, parent_span_id) = trace_of(m);
    let name = if is_anonymous(&m.routing_key) && m.exchange.is_empty() {
        operation.to_owned()
    } else {
        format!("{operation} {destination}")
    };
    let start_unix_nanos = to_unix(p.start_ns, mono_to_unix_ns);
    Span {
        trace_id,
        span_id: new_span_id(),
        parent_span_id,
        name,
        kind,
        start_unix_nanos,
        end_unix_nanos: to_unix(p.end_ns, mono_to_unix_ns).max(start_unix_nanos),
        attributes: attrs,
        status,
        resource,
    }
}

fn delivery_span(
    d: &Delivery,
    conn: &ConnInfo,
    resource: Arc<Resource>,
    mono_to_unix_ns: i128,
) -> Span {
    let m = &d.message;
    let (operation_type, operation_name) = match d.kind {
        DeliveryKind::Deliver => ("process", "deliver"),
        DeliveryKind::Get => ("receive", "get"),
    };
    let destination = delivery_destination(m, d.queue.as_deref());
    let mut attrs = common(operation_type, operation_name, conn);
    attrs.push(KeyValue::new(
        semconv::MESSAGING_DESTINATION_NAME,
        destination.as_str(),
    ));
    if let Some(q) = &d.queue {
        attrs.push(KeyValue::new(
            semconv::MESSAGING_DESTINATION_SUBSCRIPTION_NAME,
            q.as_str(),
        ));
        if is_anonymous(q) {
            attrs.push(KeyValue::new(
                semconv::MESSAGING_DESTINATION_ANONYMOUS,
                true,
            ));
        }
    }
    message_attributes(m, &mut attrs);
    attrs.push(KeyValue::new(
        semconv::MESSAGING_RABBITMQ_MESSAGE_DELIVERY_TAG,
        d.delivery_tag,
    ));
    attrs.push(KeyValue::new(REDELIVERED, d.redelivered));
    if let Some(outcome) = d.outcome {
        let text = match outcome {
            Outcome::Ack => "ack",
            Outcome::AutoAck => "auto_ack",
            Outcome::Nack { requeue: true } | Outcome::Reject { requeue: true } => "requeue",
            Outcome::Nack { requeue: false } => "nack",
            Outcome::Reject { requeue: false } => "reject",
            Outcome::AckModeUnknown => "unknown",
        };
        attrs.push(KeyValue::new(OUTCOME, text));
    }
    incomplete(d.incomplete, &mut attrs);
    let status = match &d.error {
        Some(reason) => close_status(reason, &mut attrs),
        None => Status::Unset,
    };
    let (trace_id, parent_span_id) = trace_of(m);
    // The queue names the destination best; an anonymous one is left out.
    let named = match d.queue.as_deref() {
        Some(q) if is_anonymous(q) => delivery_destination(m, None),
        _ => destination,
    };
    let start_unix_nanos = to_unix(d.start_ns, mono_to_unix_ns);
    Span {
        trace_id,
        span_id: new_span_id(),
        parent_span_id,
        name: format!("{operation_name} {named}"),
        kind: SpanKind::Consumer,
        start_unix_nanos,
        end_unix_nanos: to_unix(d.end_ns, mono_to_unix_ns).max(start_unix_nanos),
        attributes: attrs,
        status,
        resource,
    }
}

/// Marks a publish or delivery the connection's end cut short.
fn incomplete(reason: Option<EndReason>, attrs: &mut Vec<KeyValue>) {
    if let Some(reason) = reason {
        attrs.push(KeyValue::new(INCOMPLETE, true));
        attrs.push(KeyValue::new(INCOMPLETE_REASON, reason.as_str()));
    }
}

/// A close with an error: a client span named after the method that failed.
fn error_span(
    reason: &CloseReason,
    ts_ns: u64,
    conn: &ConnInfo,
    resource: Arc<Resource>,
    mono_to_unix_ns: i128,
) -> Span {
    let name = reason.method_name().unwrap_or(if reason.class_id == 0 {
        "connection.close"
    } else {
        "channel.close"
    });
    let mut attrs = common("settle", name, conn);
    attrs.retain(|kv| kv.key != semconv::MESSAGING_OPERATION_TYPE);
    let status = close_status(reason, &mut attrs);
    let at = to_unix(ts_ns, mono_to_unix_ns);
    Span {
        trace_id: new_trace_id(),
        span_id: new_span_id(),
        parent_span_id: None,
        name: name.to_owned(),
        kind: SpanKind::Client,
        start_unix_nanos: at,
        end_unix_nanos: at,
        attributes: attrs,
        status,
        resource,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocols::amqp::Properties;
    use crate::spans::Value;

    fn conn() -> ConnInfo {
        ConnInfo {
            local: "10.0.0.2:40000".parse().unwrap(),
            remote: "10.0.0.9:5672".parse().unwrap(),
        }
    }

    fn resource() -> Arc<Resource> {
        Arc::new(Resource {
            service_name: "shop".into(),
            pid: 7,
            executable_name: "python3".into(),
            host_name: "node".into(),
            attributes: vec![],
            generic_name: false,
        })
    }

    fn message(exchange: &str, rk: &str) -> Message {
        Message {
            exchange: exchange.into(),
            routing_key: rk.into(),
            properties: Properties {
                message_id: Some("m-1".into()),
                correlation_id: Some("order-42".into()),
                ..Properties::default()
            },
            body_size: 17,
            body: b"{\"order_id\": 42}".to_vec(),
        }
    }

    fn publish(m: Message) -> Publish {
        Publish {
            role: Role::Client,
            channel: 1,
            number: 0,
            message: m,
            mandatory: false,
            start_ns: 1_000,
            end_ns: 3_000,
            confirmed: Some(true),
            returned: None,
            error: None,
            vhost: Some("/".into()),
            user: Some("guest".into()),
            incomplete: None,
        }
    }

    fn delivery(m: Message, queue: Option<&str>) -> Delivery {
        Delivery {
            role: Role::Client,
            kind: DeliveryKind::Deliver,
            channel: 1,
            consumer_tag: Some("ctag".into()),
            queue: queue.map(Into::into),
            delivery_tag: 5,
            redelivered: true,
            message: m,
            start_ns: 5_000,
            end_ns: 9_000,
            outcome: Some(Outcome::Nack { requeue: true }),
            error: None,
            vhost: None,
            user: None,
            incomplete: None,
        }
    }

    fn attr<'a>(s: &'a Span, key: &str) -> Option<&'a Value> {
        s.attribute(key)
    }

    #[test]
    fn publish_is_a_producer_span_with_messaging_attributes() {
        let op = AmqpOperation::Publish(publish(message("orders", "order.created")));
        let s = amqp_span(&op, &conn(), resource(), 1_000_000).unwrap();
        assert_eq!(s.name, "publish orders:order.created");
        assert_eq!(s.kind, SpanKind::Producer);
        assert_eq!(
            (s.start_unix_nanos, s.end_unix_nanos),
            (1_001_000, 1_003_000)
        );
        assert_eq!(
            attr(&s, semconv::MESSAGING_SYSTEM),
            Some(&Value::from("rabbitmq"))
        );
        assert_eq!(
            attr(&s, semconv::MESSAGING_OPERATION_TYPE),
            Some(&Value::from("send"))
        );
        assert_eq!(
            attr(&s, semconv::MESSAGING_DESTINATION_NAME),
            Some(&Value::from("orders:order.created"))
        );
        assert_eq!(
            attr(&s, semconv::MESSAGING_RABBITMQ_DESTINATION_ROUTING_KEY),
            Some(&Value::from("order.created"))
        );
        assert_eq!(
            attr(&s, semconv::MESSAGING_MESSAGE_ID),
            Some(&Value::from("m-1"))
        );
        assert_eq!(
            attr(&s, semconv::MESSAGING_MESSAGE_CONVERSATION_ID),
            Some(&Value::from("order-42"))
        );
        assert_eq!(
            attr(&s, semconv::MESSAGING_MESSAGE_BODY_SIZE),
            Some(&Value::Int(17))
        );
        assert_eq!(
            attr(&s, semconv::SERVER_ADDRESS),
            Some(&Value::from("10.0.0.9"))
        );
        assert_eq!(attr(&s, semconv::SERVER_PORT), Some(&Value::Int(5672)));
        assert_eq!(attr(&s, OUTCOME), Some(&Value::from("ack")));
        assert_eq!(s.status, Status::Unset);
        assert_eq!(s.resource.service_name, "shop");
    }

    #[test]
    fn default_exchange_destinations_follow_the_conventions() {
        assert_eq!(publish_destination(&message("", "")), "amq.default");
        assert_eq!(publish_destination(&message("", "mes")), "mes");
        assert_eq!(publish_destination(&message("events", "")), "events");
        assert_eq!(
            delivery_destination(&message("", "mes"), Some("mes")),
            "mes"
        );
        assert_eq!(
            delivery_destination(&message("events", ""), Some("audit")),
            "events:audit"
        );
        assert_eq!(
            delivery_destination(&message("orders", "order.created"), Some("mes")),
            "orders:order.created:mes"
        );
    }

    #[test]
    fn delivery_is_a_consumer_span_with_queue_tag_and_outcome() {
        let op = AmqpOperation::Delivery(delivery(message("orders", "order.created"), Some("mes")));
        let s = amqp_span(&op, &conn(), resource(), 0).unwrap();
        assert_eq!(s.name, "deliver orders:order.created:mes");
        assert_eq!(s.kind, SpanKind::Consumer);
        assert_eq!(
            attr(&s, semconv::MESSAGING_OPERATION_TYPE),
            Some(&Value::from("process"))
        );
        assert_eq!(
            attr(&s, semconv::MESSAGING_DESTINATION_SUBSCRIPTION_NAME),
            Some(&Value::from("mes"))
        );
        assert_eq!(
            attr(&s, semconv::MESSAGING_RABBITMQ_MESSAGE_DELIVERY_TAG),
            Some(&Value::Int(5))
        );
        assert_eq!(attr(&s, REDELIVERED), Some(&Value::Bool(true)));
        assert_eq!(attr(&s, OUTCOME), Some(&Value::from("requeue")));
        assert_eq!(
            s.status,
            Status::Unset,
            "a nack is an outcome, not an error"
        );
    }

    #[test]
    fn a_delivery_of_unknown_ack_mode_is_a_consumer_span_with_outcome_unknown() {
        let mut d = delivery(message("orders", "order.created"), None);
        d.outcome = Some(Outcome::AckModeUnknown);
        let s = amqp_span(&AmqpOperation::Delivery(d), &conn(), resource(), 0).unwrap();
        assert_eq!(s.kind, SpanKind::Consumer);
        assert_eq!(s.name, "deliver orders:order.created");
        assert_eq!(attr(&s, OUTCOME), Some(&Value::from("unknown")));
        assert_eq!(s.status, Status::Unset);
    }

    #[test]
    fn operations_the_connection_end_cut_short_are_marked_incomplete() {
        let mut d = delivery(message("orders", "order.created"), Some("mes"));
        d.outcome = None;
        d.incomplete = Some(EndReason::AgentStop);
        let s = amqp_span(&AmqpOperation::Delivery(d), &conn(), resource(), 0).unwrap();
        assert_eq!(attr(&s, INCOMPLETE), Some(&Value::Bool(true)));
        assert_eq!(
            attr(&s, INCOMPLETE_REASON),
            Some(&Value::from("agent_stop"))
        );
        assert_eq!(attr(&s, OUTCOME), None);
        assert_eq!(s.status, Status::Unset);
        let mut p = publish(message("orders", "order.created"));
        p.confirmed = None;
        p.incomplete = Some(EndReason::ProcessExit);
        let s = amqp_span(&AmqpOperation::Publish(p), &conn(), resource(), 0).unwrap();
        assert_eq!(
            attr(&s, INCOMPLETE_REASON),
            Some(&Value::from("process_exit"))
        );
        assert_eq!(s.status, Status::Unset);
    }

    #[test]
    fn traceparent_header_gives_trace_and_parent() {
        let mut m = message("orders", "order.created");
        m.properties.headers.push((
            "traceparent".into(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
        ));
        let s = amqp_span(
            &AmqpOperation::Delivery(delivery(m, Some("mes"))),
            &conn(),
            resource(),
            0,
        )
        .unwrap();
        assert_eq!(
            crate::spans::hex(&s.trace_id),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(
            s.parent_span_id.map(|p| crate::spans::hex(&p)).as_deref(),
            Some("00f067aa0ba902b7")
        );
    }

    #[test]
    fn returns_nacks_and_error_closes_are_errors() {
        let mut p = publish(message("", "nowhere"));
        p.returned = Some((312, "NO_ROUTE".into()));
        let s = amqp_span(&AmqpOperation::Publish(p), &conn(), resource(), 0).unwrap();
        assert_eq!(s.status, Status::Error("312 NO_ROUTE".into()));
        assert_eq!(
            attr(&s, semconv::ERROR_TYPE),
            Some(&Value::from("no-route"))
        );

        let mut p = publish(message("x", "y"));
        p.confirmed = Some(false);
        let s = amqp_span(&AmqpOperation::Publish(p), &conn(), resource(), 0).unwrap();
        assert!(matches!(s.status, Status::Error(_)));

        let reason = CloseReason {
            reply_code: 404,
            reply_text: "NOT_FOUND - no queue 'missing' in vhost '/'".into(),
            class_id: 50,
            method_id: 10,
            by: Role::Server,
        };
        let mut d = delivery(message("", "q"), Some("q"));
        d.error = Some(reason.clone());
        let s = amqp_span(&AmqpOperation::Delivery(d), &conn(), resource(), 0).unwrap();
        assert_eq!(
            s.status,
            Status::Error("404 NOT_FOUND - no queue 'missing' in vhost '/'".into())
        );
        let op = AmqpOperation::ChannelError {
            role: Role::Client,
            channel: 2,
            reason,
            ts_ns: 7,
            vhost: None,
        };
        let s = amqp_span(&op, &conn(), resource(), 0).unwrap();
        assert_eq!(s.name, "queue.declare");
        assert_eq!(s.kind, SpanKind::Client);
        assert_eq!(
            attr(&s, semconv::ERROR_TYPE),
            Some(&Value::from("not-found"))
        );
    }

    #[test]
    fn broker_side_publish_is_a_server_route_span_on_the_broker() {
        let mut p = publish(message("orders", "order.created"));
        p.role = Role::Server;
        let broker = ConnInfo {
            local: "10.0.0.9:5672".parse().unwrap(),
            remote: "10.0.0.2:40000".parse().unwrap(),
        };
        let s = amqp_span(&AmqpOperation::Publish(p.clone()), &broker, resource(), 0).unwrap();
        assert_eq!(s.name, "route orders:order.created");
        assert_eq!(s.kind, SpanKind::Server);
        assert_eq!((s.start_unix_nanos, s.end_unix_nanos), (1_000, 3_000));
        for (key, want) in [
            (semconv::MESSAGING_SYSTEM, Value::from("rabbitmq")),
            (semconv::MESSAGING_OPERATION_NAME, Value::from("route")),
            (
                semconv::MESSAGING_DESTINATION_NAME,
                Value::from("orders:order.created"),
            ),
            (EXCHANGE, Value::from("orders")),
            (
                semconv::MESSAGING_RABBITMQ_DESTINATION_ROUTING_KEY,
                Value::from("order.created"),
            ),
            (semconv::MESSAGING_MESSAGE_ID, Value::from("m-1")),
            (DELIVERIES, Value::Int(0)),
            (semconv::SERVER_ADDRESS, Value::from("10.0.0.9")),
            (semconv::SERVER_PORT, Value::Int(5672)),
            (semconv::CLIENT_ADDRESS, Value::from("10.0.0.2")),
            (semconv::CLIENT_PORT, Value::Int(40000)),
            (OUTCOME, Value::from("ack")),
        ] {
            assert_eq!(attr(&s, key), Some(&want), "{key}");
        }
        assert_eq!(attr(&s, semconv::MESSAGING_OPERATION_TYPE), None);
        assert_eq!(attr(&s, QUEUES), None, "the linker adds the queues");

        p.message.exchange.clear();
        p.returned = Some((312, "NO_ROUTE".into()));
        let s = amqp_span(&AmqpOperation::Publish(p), &broker, resource(), 0).unwrap();
        assert_eq!(s.name, "route order.created");
        assert_eq!(attr(&s, EXCHANGE), Some(&Value::from("amq.default")));
        assert_eq!(s.status, Status::Error("312 NO_ROUTE".into()));
    }

    #[test]
    fn broker_side_deliveries_and_topology_make_no_span() {
        let mut d = delivery(message("a", "b"), Some("q"));
        d.role = Role::Server;
        assert!(amqp_span(&AmqpOperation::Delivery(d.clone()), &conn(), resource(), 0).is_none());
        assert!(amqp_span(&AmqpOperation::Dispatch(d), &conn(), resource(), 0).is_none());
        let op = AmqpOperation::Topology {
            role: Role::Client,
            channel: 1,
            change: crate::protocols::amqp::Topology::QueueDeclare { queue: "q".into() },
            ts_ns: 0,
        };
        assert!(amqp_span(&op, &conn(), resource(), 0).is_none());
    }

    #[test]
    fn anonymous_queues_stay_out_of_span_names() {
        let op = AmqpOperation::Delivery(delivery(message("events", ""), Some("amq.gen-Xyz")));
        let s = amqp_span(&op, &conn(), resource(), 0).unwrap();
        assert_eq!(s.name, "deliver events");
        assert_eq!(
            attr(&s, semconv::MESSAGING_DESTINATION_ANONYMOUS),
            Some(&Value::Bool(true))
        );
    }
}
