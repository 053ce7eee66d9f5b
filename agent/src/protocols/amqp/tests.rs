use agent_common::Direction::{Egress as Out, Ingress as In};
use amq_protocol::{
    frame::{AMQPContentHeader, AMQPFrame, WriteContext, gen_frame},
    protocol::{AMQPClass, basic, channel, confirm, connection, exchange, queue},
    types::{AMQPValue, FieldTable, LongString, ShortString},
};
use proptest::prelude::*;

use super::*;

fn frame(f: AMQPFrame) -> Vec<u8> {
    gen_frame(&f)(WriteContext::from(Vec::new()))
        .expect("frame serialises")
        .write
}

fn method(ch: u16, class: AMQPClass) -> Vec<u8> {
    frame(AMQPFrame::Method(ch, class))
}

fn header(ch: u16, body_size: u64, properties: basic::AMQPProperties) -> Vec<u8> {
    frame(AMQPFrame::Header(
        ch,
        AMQPContentHeader {
            class_id: 60,
            body_size,
            properties,
        },
    ))
}

fn body(ch: u16, data: &[u8]) -> Vec<u8> {
    frame(AMQPFrame::Body(ch, data.to_vec()))
}

fn props(id: &str) -> basic::AMQPProperties {
    let mut headers = FieldTable::default();
    headers.insert(
        "order_id".into(),
        AMQPValue::LongString(LongString::from("42")),
    );
    headers.insert("attempt".into(), AMQPValue::LongInt(2));
    basic::AMQPProperties::default()
        .with_content_type("application/json".into())
        .with_message_id(ShortString::from(id))
        .with_correlation_id("order-42".into())
        .with_delivery_mode(2)
        .with_timestamp(1_700_000_000)
        .with_headers(headers)
}

fn publish(ch: u16, exchange: &str, rk: &str, mandatory: bool) -> Vec<u8> {
    method(
        ch,
        AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
            exchange: exchange.into(),
            routing_key: rk.into(),
            mandatory,
            immediate: false,
        })),
    )
}

fn deliver(
    ch: u16,
    tag: &str,
    delivery_tag: u64,
    redelivered: bool,
    exchange: &str,
    rk: &str,
) -> Vec<u8> {
    method(
        ch,
        AMQPClass::Basic(basic::AMQPMethod::Deliver(basic::Deliver {
            consumer_tag: tag.into(),
            delivery_tag,
            redelivered,
            exchange: exchange.into(),
            routing_key: rk.into(),
        })),
    )
}

fn consume(ch: u16, queue: &str, tag: &str, no_ack: bool) -> Vec<u8> {
    method(
        ch,
        AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume {
            queue: queue.into(),
            consumer_tag: tag.into(),
            no_local: false,
            no_ack,
            exclusive: false,
            nowait: false,
            arguments: FieldTable::default(),
        })),
    )
}

fn consume_ok(ch: u16, tag: &str) -> Vec<u8> {
    method(
        ch,
        AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(basic::ConsumeOk {
            consumer_tag: tag.into(),
        })),
    )
}

fn ack(ch: u16, delivery_tag: u64, multiple: bool) -> Vec<u8> {
    method(
        ch,
        AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
            delivery_tag,
            multiple,
        })),
    )
}

fn nack(ch: u16, delivery_tag: u64, multiple: bool, requeue: bool) -> Vec<u8> {
    method(
        ch,
        AMQPClass::Basic(basic::AMQPMethod::Nack(basic::Nack {
            delivery_tag,
            multiple,
            requeue,
        })),
    )
}

fn reject(ch: u16, delivery_tag: u64, requeue: bool) -> Vec<u8> {
    method(
        ch,
        AMQPClass::Basic(basic::AMQPMethod::Reject(basic::Reject {
            delivery_tag,
            requeue,
        })),
    )
}

fn channel_open(ch: u16) -> Vec<u8> {
    method(
        ch,
        AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
    )
}

fn channel_close(ch: u16, code: u16, text: &str, class_id: u16, method_id: u16) -> Vec<u8> {
    method(
        ch,
        AMQPClass::Channel(channel::AMQPMethod::Close(channel::Close {
            reply_code: code,
            reply_text: text.into(),
            class_id,
            method_id,
        })),
    )
}

fn confirm_select(ch: u16) -> Vec<u8> {
    method(
        ch,
        AMQPClass::Confirm(confirm::AMQPMethod::Select(confirm::Select {
            nowait: false,
        })),
    )
}

fn heartbeat() -> Vec<u8> {
    frame(AMQPFrame::Heartbeat)
}

/// The connection handshake: client header, start, start-ok (PLAIN), tune, tune-ok,
/// open, open-ok, as (direction seen by the client, bytes).
fn handshake() -> Vec<(Direction, Vec<u8>)> {
    let mut server_props = FieldTable::default();
    let mut caps = FieldTable::default();
    caps.insert("publisher_confirms".into(), AMQPValue::Boolean(true));
    server_props.insert("capabilities".into(), AMQPValue::FieldTable(caps));
    server_props.insert("product".into(), AMQPValue::LongString("RabbitMQ".into()));
    vec![
        (Out, PROTOCOL_HEADER.to_vec()),
        (
            In,
            method(
                0,
                AMQPClass::Connection(connection::AMQPMethod::Start(connection::Start {
                    version_major: 0,
                    version_minor: 9,
                    server_properties: server_props,
                    mechanisms: "PLAIN AMQPLAIN".into(),
                    locales: "en_US".into(),
                })),
            ),
        ),
        (
            Out,
            method(
                0,
                AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
                    client_properties: FieldTable::default(),
                    mechanism: "PLAIN".into(),
                    response: LongString::from(&b"\0shop\0secret"[..]),
                    locale: "en_US".into(),
                })),
            ),
        ),
        (
            In,
            method(
                0,
                AMQPClass::Connection(connection::AMQPMethod::Tune(connection::Tune {
                    channel_max: 2047,
                    frame_max: 4096,
                    heartbeat: 60,
                })),
            ),
        ),
        (
            Out,
            method(
                0,
                AMQPClass::Connection(connection::AMQPMethod::TuneOk(connection::TuneOk {
                    channel_max: 2047,
                    frame_max: 4096,
                    heartbeat: 60,
                })),
            ),
        ),
        (
            Out,
            method(
                0,
                AMQPClass::Connection(connection::AMQPMethod::Open(connection::Open {
                    virtual_host: "/shop".into(),
                })),
            ),
        ),
        (
            In,
            method(
                0,
                AMQPClass::Connection(connection::AMQPMethod::OpenOk(connection::OpenOk {})),
            ),
        ),
    ]
}

/// Feeds the steps, one read each at ts = step number, and summarises the operations.
fn run_steps(p: &mut AmqpParser, steps: &[(Direction, Vec<u8>)]) -> Vec<String> {
    for (i, (dir, data)) in steps.iter().enumerate() {
        p.feed(*dir, data, i as u64 + 1);
    }
    p.take_operations()
        .iter()
        .map(ToString::to_string)
        .collect()
}

fn run(steps: &[(Direction, Vec<u8>)]) -> Vec<String> {
    let mut p = AmqpParser::new();
    run_steps(&mut p, steps)
}

/// A publisher session with confirms: one publish acked, two confirmed by a multiple
/// ack, one nacked, a mandatory one returned.
fn confirm_session() -> Vec<(Direction, Vec<u8>)> {
    let mut s = handshake();
    let b = br#"{"order_id": 42}"#;
    s.extend([
        (Out, channel_open(1)),
        (Out, confirm_select(1)),
        (
            Out,
            [
                publish(1, "orders", "order.created", false),
                header(1, b.len() as u64, props("m1")),
                body(1, b),
            ]
            .concat(),
        ),
        (In, ack(1, 1, false)),
        (
            Out,
            [
                publish(1, "orders", "order.created", false),
                header(1, 2, props("m2")),
                body(1, b"ab"),
            ]
            .concat(),
        ),
        (
            Out,
            [
                publish(1, "orders", "order.paid", false),
                header(1, 0, props("m3")),
            ]
            .concat(),
        ),
        (In, ack(1, 3, true)),
        (
            Out,
            [
                publish(1, "orders", "x", false),
                header(1, 1, props("m4")),
                body(1, b"x"),
            ]
            .concat(),
        ),
        (In, nack(1, 4, false, false)),
        (
            Out,
            [
                publish(1, "orders", "nowhere", true),
                header(1, 1, props("m5")),
                body(1, b"y"),
            ]
            .concat(),
        ),
        (
            In,
            [
                method(
                    1,
                    AMQPClass::Basic(basic::AMQPMethod::Return(basic::Return {
                        reply_code: 312,
                        reply_text: "NO_ROUTE".into(),
                        exchange: "orders".into(),
                        routing_key: "nowhere".into(),
                    })),
                ),
                header(1, 1, props("m5")),
                body(1, b"y"),
                ack(1, 5, false),
            ]
            .concat(),
        ),
    ]);
    s
}

#[test]
fn handshake_gives_role_vhost_and_user() {
    let mut p = AmqpParser::new();
    let mut s = handshake();
    s.push((
        Out,
        [
            publish(1, "", "q", false),
            header(1, 1, props("m")),
            body(1, b"z"),
        ]
        .concat(),
    ));
    let out = run_steps(&mut p, &s);
    assert_eq!(p.is_amqp(), Some(true));
    assert_eq!(p.role(), Some(Role::Client));
    assert_eq!(out.len(), 1, "{out:?}");
    let mut p2 = AmqpParser::new();
    for (dir, data) in &s {
        p2.feed(*dir, data, 1);
    }
    let ops = p2.take_operations();
    let AmqpOperation::Publish(publish) = &ops[0] else {
        panic!("{ops:?}")
    };
    assert_eq!(publish.vhost.as_deref(), Some("/shop"));
    assert_eq!(publish.user.as_deref(), Some("shop"));
    assert_eq!(publish.message.body, b"z");
    assert_eq!(publish.message.properties.header("order_id"), Some("42"));
    assert_eq!(publish.message.properties.header("attempt"), Some("2"));
}

#[test]
fn broker_side_sees_the_server_role() {
    let mut p = AmqpParser::new();
    for (dir, data) in handshake() {
        let flipped = if dir == Out { In } else { Out };
        p.feed(flipped, &data, 1);
    }
    assert_eq!(p.role(), Some(Role::Server));
}

/// The broker's side of a consumer session: each delivery it sends is a `Dispatch` as
/// soon as its content is written (the time it left the broker), then a `Delivery` with
/// the outcome when the consumer settles it. The client's side has no `Dispatch`.
#[test]
fn broker_side_dispatches_deliveries_when_sent() {
    let flipped: Vec<(Direction, Vec<u8>)> = consumer_session()
        .into_iter()
        .map(|(dir, data)| (if dir == Out { In } else { Out }, data))
        .collect();
    let mut p = AmqpParser::new();
    let out = run_steps(&mut p, &flipped);
    assert_eq!(p.role(), Some(Role::Server));
    let sent: Vec<&String> = out.iter().filter(|l| l.contains(" sent ")).collect();
    let short: Vec<String> = sent
        .iter()
        .map(|l| {
            let t = l.split(" t=").nth(1).unwrap_or("");
            let head: Vec<&str> = l.split(' ').take(5).collect();
            format!("{} t={t}", head.join(" "))
        })
        .collect();
    assert_eq!(
        short,
        [
            "Server sent deliver ch=1 tag=1 t=11..11",
            "Server sent deliver ch=1 tag=2 t=12..12",
            "Server sent deliver ch=1 tag=3 t=13..13",
            "Server sent deliver ch=1 tag=4 t=16..16",
            "Server sent deliver ch=1 tag=5 t=18..18",
            "Server sent deliver ch=2 tag=1 t=23..23",
        ],
        "{out:#?}"
    );
    assert!(sent.iter().all(|l| !l.contains("outcome=")));
    assert!(sent[0].contains(r#"queue="mes""#), "{}", sent[0]);
    // Each dispatch comes before the settled delivery of the same tag.
    let settled = out
        .iter()
        .position(|l| l.starts_with("Server deliver ch=1 tag=1 "))
        .expect("settled delivery");
    let dispatched = out
        .iter()
        .position(|l| l.starts_with("Server sent deliver ch=1 tag=1 "))
        .unwrap();
    assert!(dispatched < settled);
    assert!(
        run(&consumer_session())
            .iter()
            .all(|l| !l.contains(" sent "))
    );
}

#[test]
fn publisher_confirms_settle_publishes() {
    let out = run(&confirm_session());
    let expected = [
        r#"Client publish ch=1 exchange="orders" rk="order.created" body=16/16 content_type="application/json" correlation_id="order-42" message_id="m1" delivery_mode=2 timestamp=1700000000 h:attempt="2" h:order_id="42" t=10..11 confirmed=ack"#,
        r#"Client publish ch=1 exchange="orders" rk="order.created" body=2/2 content_type="application/json" correlation_id="order-42" message_id="m2" delivery_mode=2 timestamp=1700000000 h:attempt="2" h:order_id="42" t=12..14 confirmed=ack"#,
        r#"Client publish ch=1 exchange="orders" rk="order.paid" body=0/0 content_type="application/json" correlation_id="order-42" message_id="m3" delivery_mode=2 timestamp=1700000000 h:attempt="2" h:order_id="42" t=13..14 confirmed=ack"#,
        r#"Client publish ch=1 exchange="orders" rk="x" body=1/1 content_type="application/json" correlation_id="order-42" message_id="m4" delivery_mode=2 timestamp=1700000000 h:attempt="2" h:order_id="42" t=15..16 confirmed=nack"#,
        r#"Client publish ch=1 exchange="orders" rk="nowhere" body=1/1 content_type="application/json" correlation_id="order-42" message_id="m5" delivery_mode=2 timestamp=1700000000 h:attempt="2" h:order_id="42" t=17..18 mandatory confirmed=ack returned=312 "NO_ROUTE""#,
    ];
    assert_eq!(out, expected);
}

/// A consumer session: consume with manual acks, deliveries settled by ack, multiple
/// ack, nack with requeue, redelivery, reject; an auto-ack consumer on channel 2.
fn consumer_session() -> Vec<(Direction, Vec<u8>)> {
    let mut s = handshake();
    let content = |ch: u16, id: &str, data: &[u8]| {
        [header(ch, data.len() as u64, props(id)), body(ch, data)].concat()
    };
    s.extend([
        (Out, channel_open(1)),
        (Out, consume(1, "mes", "", false)),
        (In, consume_ok(1, "amq.ctag-1")),
        (
            In,
            [
                deliver(1, "amq.ctag-1", 1, false, "orders", "order.created"),
                content(1, "m1", b"one"),
            ]
            .concat(),
        ),
        (
            In,
            [
                deliver(1, "amq.ctag-1", 2, false, "orders", "order.created"),
                content(1, "m2", b"two"),
            ]
            .concat(),
        ),
        (
            In,
            [
                deliver(1, "amq.ctag-1", 3, false, "orders", "order.created"),
                content(1, "m3", b"three"),
            ]
            .concat(),
        ),
        (Out, ack(1, 1, false)),
        (Out, ack(1, 3, true)),
        (
            In,
            [
                deliver(1, "amq.ctag-1", 4, false, "", "mes"),
                content(1, "m4", b"four"),
            ]
            .concat(),
        ),
        (Out, nack(1, 4, false, true)),
        (
            In,
            [
                deliver(1, "amq.ctag-1", 5, true, "", "mes"),
                content(1, "m4", b"four"),
            ]
            .concat(),
        ),
        (Out, reject(1, 5, false)),
        (Out, channel_open(2)),
        (Out, consume(2, "audit", "auditor", true)),
        (In, consume_ok(2, "auditor")),
        (
            In,
            [
                deliver(2, "auditor", 1, false, "events", ""),
                content(2, "m6", b"six"),
            ]
            .concat(),
        ),
    ]);
    s
}

#[test]
fn deliveries_are_settled_by_acks_nacks_and_rejects() {
    let out = run(&consumer_session());
    let short: Vec<String> = out
        .iter()
        .map(|l| {
            l.split(" body=").next().unwrap().to_owned() + " " + l.rsplit(" t=").next().unwrap()
        })
        .collect();
    assert_eq!(
        short,
        [
            r#"Client deliver ch=1 tag=1 consumer="amq.ctag-1" queue="mes" exchange="orders" rk="order.created" 11..14 outcome=Some(Ack)"#,
            r#"Client deliver ch=1 tag=2 consumer="amq.ctag-1" queue="mes" exchange="orders" rk="order.created" 12..15 outcome=Some(Ack)"#,
            r#"Client deliver ch=1 tag=3 consumer="amq.ctag-1" queue="mes" exchange="orders" rk="order.created" 13..15 outcome=Some(Ack)"#,
            r#"Client deliver ch=1 tag=4 consumer="amq.ctag-1" queue="mes" exchange="" rk="mes" 16..17 outcome=Some(Nack { requeue: true })"#,
            r#"Client deliver ch=1 tag=5 consumer="amq.ctag-1" queue="mes" redelivered exchange="" rk="mes" 18..19 outcome=Some(Reject { requeue: false })"#,
            r#"Client deliver ch=2 tag=1 consumer="auditor" queue="audit" exchange="events" rk="" 23..23 outcome=Some(AutoAck)"#,
        ]
    );
}

#[test]
fn basic_get_answers_with_the_queue_of_the_request() {
    let mut s = handshake();
    let get = |queue: &str, no_ack| {
        method(
            1,
            AMQPClass::Basic(basic::AMQPMethod::Get(basic::Get {
                queue: queue.into(),
                no_ack,
            })),
        )
    };
    s.extend([
        (Out, channel_open(1)),
        (Out, get("polled", false)),
        (
            In,
            [
                method(
                    1,
                    AMQPClass::Basic(basic::AMQPMethod::GetOk(basic::GetOk {
                        delivery_tag: 1,
                        redelivered: false,
                        exchange: "".into(),
                        routing_key: "polled".into(),
                        message_count: 0,
                    })),
                ),
                header(1, 2, props("g")),
                body(1, b"hi"),
            ]
            .concat(),
        ),
        (Out, get("polled", true)),
        (
            In,
            method(
                1,
                AMQPClass::Basic(basic::AMQPMethod::GetEmpty(basic::GetEmpty {})),
            ),
        ),
        (Out, ack(1, 1, false)),
    ]);
    let out = run(&s);
    assert_eq!(out.len(), 1, "{out:?}");
    assert!(
        out[0].starts_with(
            r#"Client get ch=1 tag=1 queue="polled" exchange="" rk="polled" body=2/2"#
        ),
        "{}",
        out[0]
    );
    assert!(out[0].ends_with("t=10..13 outcome=Some(Ack)"), "{}", out[0]);
}

#[test]
fn topology_declarations_are_reported() {
    let mut s = handshake();
    s.extend([
        (Out, channel_open(1)),
        (
            Out,
            method(
                1,
                AMQPClass::Exchange(exchange::AMQPMethod::Declare(exchange::Declare {
                    exchange: "orders".into(),
                    kind: "topic".into(),
                    passive: false,
                    durable: true,
                    auto_delete: false,
                    internal: false,
                    nowait: false,
                    arguments: FieldTable::default(),
                })),
            ),
        ),
        (
            Out,
            method(
                1,
                AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
                    queue: "".into(),
                    passive: false,
                    durable: false,
                    exclusive: true,
                    auto_delete: true,
                    nowait: false,
                    arguments: FieldTable::default(),
                })),
            ),
        ),
        (
            In,
            method(
                1,
                AMQPClass::Queue(queue::AMQPMethod::DeclareOk(queue::DeclareOk {
                    queue: "amq.gen-abc".into(),
                    message_count: 0,
                    consumer_count: 0,
                })),
            ),
        ),
        (
            Out,
            method(
                1,
                AMQPClass::Queue(queue::AMQPMethod::Bind(queue::Bind {
                    queue: "".into(),
                    exchange: "orders".into(),
                    routing_key: "order.*".into(),
                    nowait: false,
                    arguments: FieldTable::default(),
                })),
            ),
        ),
        (Out, consume(1, "", "c1", true)),
        (
            In,
            [
                deliver(1, "c1", 1, false, "orders", "order.created"),
                header(1, 0, props("t")),
            ]
            .concat(),
        ),
    ]);
    let out = run(&s);
    assert_eq!(
        out,
        [
            r#"Client topology ch=1 ExchangeDeclare { exchange: "orders", kind: "topic" } t=9"#,
            r#"Client topology ch=1 QueueDeclare { queue: "amq.gen-abc" } t=11"#,
            r#"Client topology ch=1 QueueBind { queue: "amq.gen-abc", exchange: "orders", routing_key: "order.*" } t=12"#,
            r#"Client deliver ch=1 tag=1 consumer="c1" queue="amq.gen-abc" exchange="orders" rk="order.created" body=0/0 content_type="application/json" correlation_id="order-42" message_id="t" delivery_mode=2 timestamp=1700000000 h:attempt="2" h:order_id="42" t=14..14 outcome=Some(AutoAck)"#,
        ]
    );
}

#[test]
fn channel_error_marks_open_operations() {
    let mut s = consumer_session();
    s.truncate(handshake().len() + 4); // consume, consume-ok, delivery 1 unacked
    s.push((
        In,
        channel_close(
            1,
            406,
            "PRECONDITION_FAILED - unknown delivery tag 9",
            60,
            80,
        ),
    ));
    s.push((
        Out,
        method(
            1,
            AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
        ),
    ));
    let out = run(&s);
    assert_eq!(out.len(), 2, "{out:?}");
    assert!(
        out[0].contains("tag=1") && out[0].contains("outcome=None error=406"),
        "{}",
        out[0]
    );
    assert_eq!(
        out[1],
        r#"Client channel error ch=1 406 "PRECONDITION_FAILED - unknown delivery tag 9" by Server on basic.ack t=12"#
    );
}

#[test]
fn connection_error_closes_every_channel() {
    let mut s = confirm_session();
    s.truncate(handshake().len() + 3); // publish 1 awaiting its confirm
    s.push((
        In,
        method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
                reply_code: 320,
                reply_text: "CONNECTION_FORCED - broker forced connection closure".into(),
                class_id: 0,
                method_id: 0,
            })),
        ),
    ));
    let out = run(&s);
    assert_eq!(out.len(), 2, "{out:?}");
    assert!(
        out[0].ends_with(
            r#"t=10..11 error=320 "CONNECTION_FORCED - broker forced connection closure" by Server"#
        ),
        "{}",
        out[0]
    );
    assert!(
        out[1].starts_with("Client connection error 320"),
        "{}",
        out[1]
    );
}

#[test]
fn close_finishes_what_is_open_and_drops_partial_content() {
    let mut p = AmqpParser::new();
    let mut s = consumer_session();
    s.truncate(handshake().len() + 4);
    s.push((
        In,
        [
            deliver(1, "amq.ctag-1", 2, false, "", "mes"),
            header(1, 10, props("p")),
        ]
        .concat(),
    ));
    run_steps(&mut p, &s);
    p.close(99);
    let out: Vec<String> = p
        .take_operations()
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(out.len(), 1, "{out:?}");
    assert!(
        out[0].contains("tag=1")
            && out[0].ends_with("t=11..99 outcome=None incomplete=connection_closed"),
        "{}",
        out[0]
    );
}

#[test]
fn an_end_without_a_close_leaves_the_times_alone_and_says_why() {
    let mut p = AmqpParser::new();
    let mut s = consumer_session();
    s.truncate(handshake().len() + 4);
    run_steps(&mut p, &s);
    // Forgotten idle long after: the delivery ends when it was delivered, not then.
    p.end(1_000_000, EndReason::Idle);
    let out: Vec<String> = p
        .take_operations()
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(out.len(), 1, "{out:?}");
    assert!(
        out[0].ends_with("t=11..11 outcome=None incomplete=idle"),
        "{}",
        out[0]
    );
}

#[test]
fn interleaved_channels_keep_their_contents_apart() {
    let mut s = handshake();
    let (h1, h2) = (header(1, 6, props("a")), header(2, 6, props("b")));
    s.extend([
        (Out, channel_open(1)),
        (Out, channel_open(2)),
        (Out, publish(1, "x", "one", false)),
        (Out, publish(2, "x", "two", false)),
        (Out, [h2, body(2, b"bbb")].concat()),
        (Out, [h1, body(1, b"aaa")].concat()),
        (
            Out,
            [heartbeat(), body(2, b"BBB"), body(1, b"AAA")].concat(),
        ),
    ]);
    let out = run(&s);
    assert_eq!(out.len(), 2);
    assert!(
        out[0].contains(r#"rk="two" body=6/6"#) && out[0].contains("t=11..14"),
        "{}",
        out[0]
    );
    assert!(
        out[1].contains(r#"rk="one" body=6/6"#) && out[1].contains("t=10..14"),
        "{}",
        out[1]
    );
    let mut p = AmqpParser::new();
    for (dir, data) in &s {
        p.feed(*dir, data, 0);
    }
    let bodies: Vec<Vec<u8>> = p
        .take_operations()
        .into_iter()
        .map(|op| match op {
            AmqpOperation::Publish(p) => p.message.body,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(bodies, [b"bbbBBB".to_vec(), b"aaaAAA".to_vec()]);
}

#[test]
fn content_split_over_frames_and_reads() {
    let mut s = handshake();
    let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    let mut bytes = [
        publish(1, "", "models", false),
        header(1, data.len() as u64, props("big")),
    ]
    .concat();
    for chunk in data.chunks(4088) {
        bytes.extend(body(1, chunk));
    }
    s.push((Out, channel_open(1)));
    for piece in bytes.chunks(1000) {
        s.push((Out, piece.to_vec()));
    }
    let mut p = AmqpParser::new();
    for (dir, d) in &s {
        p.feed(*dir, d, 1);
    }
    let ops = p.take_operations();
    let AmqpOperation::Publish(publish) = &ops[0] else {
        panic!("{ops:?}")
    };
    assert_eq!(publish.message.body_size, 10_000);
    assert_eq!(publish.message.body, data);
}

/// Feeds `bytes` as one syscall whose first `cap` octets were captured.
fn feed_capped(p: &mut AmqpParser, dir: Direction, bytes: &[u8], cap: usize, ts: u64) {
    let n = cap.min(bytes.len());
    p.feed(dir, &bytes[..n], ts);
    p.skip(dir, (bytes.len() - n) as u64, ts);
}

#[test]
fn bodies_bigger_than_the_capture_are_skipped_in_sync() {
    // frame_max 4096 from the handshake: bodies go in 4088-octet frames.
    let data: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
    let mut message = [
        publish(1, "", "models", false),
        header(1, data.len() as u64, props("big")),
    ]
    .concat();
    for chunk in data.chunks(4088) {
        message.extend(body(1, chunk));
    }
    // Every capture cap, so that the skip ends in every part of a frame.
    for cap in (0..200)
        .chain((4000..4200).step_by(3))
        .chain([9000, 12_345, 16_000])
    {
        let mut p = AmqpParser::new();
        for (dir, d) in handshake() {
            p.feed(dir, &d, 1);
        }
        p.feed(Out, &channel_open(1), 2);
        feed_capped(&mut p, Out, &message, cap.max(1), 3);
        p.feed(
            Out,
            &[
                publish(1, "", "after", false),
                header(1, 1, props("after")),
                body(1, b"!"),
            ]
            .concat(),
            4,
        );
        let ops = p.take_operations();
        let rks: Vec<&str> = ops
            .iter()
            .map(|op| match op {
                AmqpOperation::Publish(p) => p.message.routing_key.as_str(),
                other => panic!("{other:?}"),
            })
            .collect();
        // The big message is lost only when its method or header frame was cut.
        let header_end =
            publish(1, "", "models", false).len() + header(1, 1, props("big")).len() + 6;
        if cap >= header_end {
            assert_eq!(rks, ["models", "after"], "cap {cap}");
            let AmqpOperation::Publish(big) = &ops[0] else {
                unreachable!()
            };
            assert_eq!(big.message.body_size, 20_000);
            assert!(data.starts_with(&big.message.body));
        } else {
            assert_eq!(rks.last(), Some(&"after"), "cap {cap}");
        }
    }
}

#[test]
fn mid_stream_start_resynchronises_on_two_frames() {
    let session = consumer_session();
    let client: Vec<u8> = session
        .iter()
        .filter(|(d, _)| *d == Out)
        .flat_map(|(_, b)| b.clone())
        .collect();
    let server: Vec<u8> = session
        .iter()
        .filter(|(d, _)| *d == In)
        .flat_map(|(_, b)| b.clone())
        .collect();
    // Start in the middle of the deliveries: cut inside the first delivery's frames.
    let cut = server.len() - 420;
    let mut p = AmqpParser::new();
    p.resync(In);
    p.resync(Out);
    p.feed(In, &server[cut..], 5);
    p.feed(Out, &client[client.len() - 60..], 6);
    p.close(7);
    let ops = p.take_operations();
    assert_eq!(p.is_amqp(), Some(true));
    assert_eq!(p.role(), Some(Role::Client));
    assert!(!ops.is_empty());
    for op in &ops {
        let AmqpOperation::Delivery(d) = op else {
            panic!("{op:?}")
        };
        assert!(d.message.body_size > 0);
    }
}

#[test]
fn garbage_is_not_amqp_and_yields_nothing() {
    for garbage in [
        &b"GET / HTTP/1.1\r\n\r\n"[..],
        b"\x16\x03\x01\x02\x00",
        b"AMQP\x01\x01\x00\x0a",
        b"\x01\x00\x00\xff\xff\xff\xff\xce",
    ] {
        let mut p = AmqpParser::new();
        p.feed(Out, garbage, 1);
        p.feed(In, garbage, 2);
        assert_eq!(p.is_amqp(), Some(false), "{garbage:?}");
        assert!(p.take_operations().is_empty());
    }
}

#[test]
fn garbage_after_a_gap_is_scanned_without_inventing_frames() {
    let mut p = AmqpParser::new();
    for (dir, d) in handshake() {
        p.feed(dir, &d, 1);
    }
    p.resync(In);
    let mut noise = Vec::new();
    let mut x: u32 = 12345;
    for _ in 0..200_000 {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
        noise.push((x >> 16) as u8);
    }
    p.feed(In, &noise, 2);
    assert!(p.take_operations().is_empty());
    // Real frames after the noise are found again.
    p.feed(
        Out,
        &[channel_open(1), consume(1, "q", "t", true)].concat(),
        3,
    );
    p.feed(
        In,
        &[
            deliver(1, "t", 1, false, "", "q"),
            header(1, 1, props("n")),
            body(1, b"n"),
            heartbeat(),
        ]
        .concat(),
        4,
    );
    p.feed(
        In,
        &[
            deliver(1, "t", 2, false, "", "q"),
            header(1, 1, props("n")),
            body(1, b"n"),
        ]
        .concat(),
        5,
    );
    let ops = p.take_operations();
    assert!(!ops.is_empty() && ops.len() <= 2, "{ops:?}");
}

#[test]
fn huge_declared_sizes_do_not_allocate_or_stall() {
    let mut p = AmqpParser::new();
    for (dir, d) in handshake() {
        p.feed(dir, &d, 1);
    }
    // A frame larger than frame_max loses sync instead of waiting for 4 GiB.
    p.feed(Out, &[1, 0, 1, 0xff, 0xff, 0xff, 0xf0], 2);
    p.feed(
        Out,
        &[
            publish(1, "", "a", false),
            header(1, 1, props("a")),
            body(1, b"a"),
        ]
        .concat(),
        3,
    );
    p.feed(
        Out,
        &[
            publish(1, "", "b", false),
            header(1, 1, props("b")),
            body(1, b"b"),
        ]
        .concat(),
        4,
    );
    // A content header declaring an enormous body: counted, never buffered.
    p.feed(
        Out,
        &[
            publish(1, "", "huge", false),
            header(1, u64::MAX, props("h")),
            body(1, b"x"),
        ]
        .concat(),
        5,
    );
    let ops = p.take_operations();
    assert!(
        ops.iter()
            .all(|op| matches!(op, AmqpOperation::Publish(p) if p.message.routing_key != "huge"))
    );
    assert!(!ops.is_empty());
}

#[test]
fn truncated_frames_yield_nothing_until_complete() {
    let mut s = handshake();
    s.push((Out, channel_open(1)));
    let message = [
        publish(1, "", "q", false),
        header(1, 3, props("t")),
        body(1, b"abc"),
    ]
    .concat();
    let mut p = AmqpParser::new();
    run_steps(&mut p, &s);
    for i in 0..message.len() - 1 {
        p.feed(Out, &message[i..i + 1], 5);
        assert!(p.take_operations().is_empty(), "after {i} octets");
    }
    p.feed(Out, &message[message.len() - 1..], 6);
    assert_eq!(p.take_operations().len(), 1);
}

#[test]
fn open_operations_are_bounded() {
    let mut p = AmqpParser::new();
    for (dir, d) in handshake() {
        p.feed(dir, &d, 1);
    }
    p.feed(
        Out,
        &[channel_open(1), consume(1, "q", "t", false)].concat(),
        2,
    );
    for i in 1..=(MAX_OPEN_OPERATIONS as u64 + 10) {
        p.feed(
            In,
            &[deliver(1, "t", i, false, "", "q"), header(1, 0, props("x"))].concat(),
            3,
        );
    }
    assert_eq!(p.take_operations().len(), 10);
    assert_eq!(p.open_operations, MAX_OPEN_OPERATIONS);
    p.feed(Out, &ack(1, 0, true), 4);
    assert_eq!(p.take_operations().len(), MAX_OPEN_OPERATIONS);
    assert_eq!(p.open_operations, 0);
}

#[test]
fn mandatory_publish_without_confirms_waits_for_a_return() {
    let mut p = AmqpParser::new();
    for (dir, d) in handshake() {
        p.feed(dir, &d, 1);
    }
    p.feed(
        Out,
        &[
            channel_open(1),
            publish(1, "", "gone", true),
            header(1, 1, props("r")),
            body(1, b"r"),
        ]
        .concat(),
        10,
    );
    assert!(p.take_operations().is_empty());
    p.tick(10 + RETURN_WAIT_NS);
    let ops = p.take_operations();
    assert_eq!(ops.len(), 1);
    let AmqpOperation::Publish(publish) = &ops[0] else {
        panic!()
    };
    assert_eq!(publish.returned, None);
}

/// Splits `steps` at the given cut points (octet offsets within each step).
fn split_steps(steps: &[(Direction, Vec<u8>)], cuts: &[usize]) -> Vec<(Direction, Vec<u8>, u64)> {
    let mut out = Vec::new();
    for (i, (dir, data)) in steps.iter().enumerate() {
        let mut points: Vec<usize> = cuts.iter().map(|c| c % (data.len() + 1)).collect();
        points.push(0);
        points.push(data.len());
        points.sort_unstable();
        points.dedup();
        for w in points.windows(2) {
            out.push((*dir, data[w[0]..w[1]].to_vec(), i as u64 + 1));
        }
    }
    out
}

proptest! {
    #[test]
    fn any_split_gives_the_same_operations(cuts in proptest::collection::vec(0usize..400, 0..6), which in 0usize..2) {
        let steps = if which == 0 { confirm_session() } else { consumer_session() };
        let expected = run(&steps);
        let mut p = AmqpParser::new();
        for (dir, data, ts) in split_steps(&steps, &cuts) {
            p.feed(dir, &data, ts);
        }
        let got: Vec<String> = p.take_operations().iter().map(ToString::to_string).collect();
        prop_assert_eq!(got, expected);
    }

    #[test]
    fn arbitrary_bytes_never_panic(a in proptest::collection::vec(any::<u8>(), 0..600), b in proptest::collection::vec(any::<u8>(), 0..600), gap in 0u64..5000) {
        let mut p = AmqpParser::new();
        p.feed(Out, &a, 1);
        p.skip(In, gap, 2);
        p.feed(In, &b, 3);
        p.resync(Out);
        p.feed(Out, &b, 4);
        p.close(5);
        prop_assert!(p.take_operations().is_empty());
    }

    #[test]
    fn frames_with_corrupted_octets_never_panic(flips in proptest::collection::vec((0usize..3000, any::<u8>()), 1..8)) {
        let steps = consumer_session();
        let mut bytes: Vec<(Direction, Vec<u8>)> = steps;
        let total: usize = bytes.iter().map(|(_, b)| b.len()).sum();
        for (pos, value) in flips {
            let mut pos = pos % total;
            for (_, b) in bytes.iter_mut() {
                if pos < b.len() {
                    b[pos] = value;
                    break;
                }
                pos -= b.len();
            }
        }
        let mut p = AmqpParser::new();
        run_steps(&mut p, &bytes);
        p.close(100);
        p.take_operations();
    }
}

#[test]
fn every_single_split_point_gives_the_same_operations() {
    for steps in [confirm_session(), consumer_session()] {
        let expected = run(&steps);
        let max = steps.iter().map(|(_, d)| d.len()).max().unwrap();
        for cut in 1..max {
            let mut p = AmqpParser::new();
            for (dir, data, ts) in split_steps(&steps, &[cut]) {
                p.feed(dir, &data, ts);
            }
            let got: Vec<String> = p
                .take_operations()
                .iter()
                .map(ToString::to_string)
                .collect();
            assert_eq!(got, expected, "cut {cut}");
        }
    }
}

/// A connection picked up mid-stream: the basic.consume went by before the agent
/// started. Deliveries to consumer `amq.ctag-old` on channel 1.
fn unknown_consumer() -> (AmqpParser, impl Fn(u64) -> Vec<u8>) {
    let mut p = AmqpParser::new();
    p.resync(In);
    p.resync(Out);
    let delivery = |tag: u64| {
        [
            deliver(1, "amq.ctag-old", tag, false, "orders", "order.created"),
            header(1, 3, props(&format!("m{tag}"))),
            body(1, b"one"),
        ]
        .concat()
    };
    (p, delivery)
}

fn the_delivery(p: &mut AmqpParser) -> Delivery {
    let ops = p.take_operations();
    match &ops[..] {
        [AmqpOperation::Delivery(d)] => d.clone(),
        _ => panic!("expected one delivery: {ops:?}"),
    }
}

#[test]
fn a_delivery_of_unknown_ack_mode_without_an_ack_finishes_with_outcome_unknown() {
    let (mut p, delivery) = unknown_consumer();
    p.feed(In, &delivery(1), 10);
    p.tick(10 + ACK_MODE_WAIT_NS - 1);
    assert!(p.take_operations().is_empty(), "waits a while for an ack");
    p.tick(10 + ACK_MODE_WAIT_NS);
    let d = the_delivery(&mut p);
    assert_eq!(d.outcome, Some(Outcome::AckModeUnknown));
    assert_eq!(d.queue, None);
    assert_eq!(
        (d.start_ns, d.end_ns),
        (10, 10),
        "ends when it was delivered"
    );
    assert_eq!(d.consumer_tag.as_deref(), Some("amq.ctag-old"));
    assert_eq!(p.open_operations, 0);

    // Its ack comes after all (a slow consumer): the consumers of the channel ack, and
    // the next delivery waits for its ack however long it takes.
    p.feed(
        Out,
        &[ack(1, 1, false), heartbeat()].concat(),
        20 + ACK_MODE_WAIT_NS,
    );
    assert!(p.take_operations().is_empty());
    p.feed(In, &delivery(2), 30 + ACK_MODE_WAIT_NS);
    p.tick(30 + 3 * ACK_MODE_WAIT_NS);
    assert!(p.take_operations().is_empty(), "waits for the ack now");
    p.feed(Out, &ack(1, 2, false), 40 + 3 * ACK_MODE_WAIT_NS);
    let d = the_delivery(&mut p);
    assert_eq!(d.outcome, Some(Outcome::Ack));
    assert_eq!(d.end_ns, 40 + 3 * ACK_MODE_WAIT_NS);
}

#[test]
fn a_delivery_of_unknown_ack_mode_acked_in_time_has_its_outcome() {
    let (mut p, delivery) = unknown_consumer();
    p.feed(In, &delivery(1), 10);
    p.feed(Out, &[ack(1, 1, false), heartbeat()].concat(), 20);
    let d = the_delivery(&mut p);
    assert_eq!(d.outcome, Some(Outcome::Ack));
    assert_eq!((d.start_ns, d.end_ns), (10, 20));
    // Known to ack from now on.
    p.feed(In, &delivery(2), 30);
    p.tick(30 + 2 * ACK_MODE_WAIT_NS);
    assert!(p.take_operations().is_empty());
    p.feed(Out, &ack(1, 2, false), 40);
    assert_eq!(the_delivery(&mut p).outcome, Some(Outcome::Ack));
}

#[test]
fn next_message_in_counts_what_is_left_of_the_frame() {
    let mut p = AmqpParser::new();
    for (dir, d) in handshake() {
        p.feed(dir, &d, 1);
    }
    assert_eq!(p.next_message_in(Out), Some(0));
    p.feed(Out, &channel_open(1), 2);
    let data = vec![7u8; 1000];
    let frames = [
        publish(1, "", "models", false),
        header(1, data.len() as u64, props("m")),
        body(1, &data),
    ]
    .concat();
    let body_start = frames.len() - (7 + 1000 + 1);
    // Into the body frame: 100 payload octets read, 900 and the end octet to come.
    p.feed(Out, &frames[..body_start + 7 + 100], 3);
    assert_eq!(p.next_message_in(Out), Some(901));
    p.skip(Out, 900, 4);
    assert_eq!(p.next_message_in(Out), Some(1));
    p.feed(Out, &frames[frames.len() - 1..], 5);
    assert_eq!(p.next_message_in(Out), Some(0));
    assert_eq!(p.take_operations().len(), 1);
    // Part of a frame header: the frame's size is not known yet.
    p.feed(Out, &heartbeat()[..3], 6);
    assert_eq!(p.next_message_in(Out), None);
    // Lost sync: unknown.
    p.resync(In);
    assert_eq!(p.next_message_in(In), None);
    assert!(!ProtocolParser::in_sync(&p, In));
    assert!(ProtocolParser::in_sync(&p, Out));
}
