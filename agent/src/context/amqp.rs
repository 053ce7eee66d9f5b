//! Message linker: makes each RabbitMQ delivery the child of the publish that carried
//! the same message, across the processes of this node (DESIGN.md, rule 2).
//!
//! The broker hands the consumer the exchange and routing key the message was
//! published with, its properties and its body, so a message is recognised by a
//! [`MessageKey`]: exchange, routing key, the properties a broker does not rewrite, the
//! body size and a digest of the body's first [`BODY_DIGEST_LEN`] octets when both
//! sides captured them. Identical messages are matched in publish order, one delivery
//! per queue and publish, so a fan-out links every queue's delivery to the one publish.
//!
//! A producer span leaves at once; what it takes to link to it stays for `remember`
//! (messages may wait in a queue), and at least `hold` after its first match (the other
//! queues of a fan-out). A consumer span whose publish was not seen yet (events of two
//! processes arrive out of order) waits up to `hold`, then leaves unlinked. A consumer
//! span with a `traceparent` of its own keeps it (rule 1), unless the publish carried
//! the same one: then it links to the producer span, which is a child of that same
//! parent. Linking also sets how long the message waited in the broker
//! ([`crate::spans::amqp::BROKER_WAIT_MS`]).
//!
//! The broker's view, when the broker process is traced too: its span of a publish it
//! received (kind `SERVER`, see [`crate::spans::amqp`]) is held here for `hold` while
//! the deliveries the broker sends for the same message ([`MessageLinker::offer_dispatch`],
//! from [`AmqpOperation::Dispatch`]) are counted on it, one per queue as for consumer
//! spans (a redelivery counts on the route already delivered to its queue). Then it
//! leaves: the child of the producer span of the same message (identical messages in
//! order, one broker span per publish; a new trace, or the message's `traceparent`,
//! when the publisher is not traced), ending at the last delivery sent, with
//! [`QUEUES`] and [`DELIVERIES`]. A fan-out is one producer span, one broker span
//! listing its queues, and one consumer span per queue, the consumer spans children of
//! the producer span as without the broker. Deliveries sent more than `hold` after the
//! broker's publish completed (a message that waited in a queue for a consumer) are
//! not on the broker span; a delivery whose publish the broker span has not seen yet waits `hold` for it.
//!
//! Memory is bounded by `max_entries` producers, as many waiting consumer spans, as
//! many held broker spans and as many waiting deliveries; past that the oldest go
//! (a broker span leaves early, a delivery is forgotten).

use crate::FastMap;
use std::{
    collections::{BTreeMap, VecDeque},
    hash::{DefaultHasher, Hash, Hasher},
    time::Duration,
};

use crate::{
    protocols::amqp::{AmqpOperation, Message},
    spans::{
        KeyValue, Span, SpanId, SpanKind, TraceId, Value,
        amqp::{BROKER_WAIT_MS, DELIVERIES, QUEUES},
    },
};

/// Body octets digested into a key: short enough that both sides usually captured them.
pub const BODY_DIGEST_LEN: usize = 256;
/// Queues remembered per producer entry (fan-out width tracked).
const MAX_QUEUES_PER_PUBLISH: usize = 64;

/// What identifies a message on both sides of the broker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MessageKey {
    /// Digest of exchange, routing key, stable properties and body size.
    fingerprint: u64,
    /// Digest of the body's first octets, when they were captured.
    body: Option<u64>,
    /// The queue a delivery came from (`None` for publishes, or when unknown).
    queue: Option<String>,
    /// A redelivery: it may link to a publish whose delivery to the queue already did.
    redelivered: bool,
}

impl MessageKey {
    /// The key of a publish or delivery; `None` for other operations.
    pub fn of(op: &AmqpOperation) -> Option<Self> {
        match op {
            AmqpOperation::Publish(p) => Some(Self::new(&p.message, None, false)),
            AmqpOperation::Delivery(d) | AmqpOperation::Dispatch(d) => {
                Some(Self::new(&d.message, d.queue.clone(), d.redelivered))
            }
            _ => None,
        }
    }

    fn new(m: &Message, queue: Option<String>, redelivered: bool) -> Self {
        let mut h = DefaultHasher::new();
        m.exchange.hash(&mut h);
        m.routing_key.hash(&mut h);
        m.body_size.hash(&mut h);
        let p = &m.properties;
        // Timestamp, delivery mode and priority are left out: broker plugins and queue
        // types may set them.
        for field in [
            &p.content_type,
            &p.content_encoding,
            &p.correlation_id,
            &p.reply_to,
            &p.expiration,
            &p.message_id,
            &p.kind,
            &p.user_id,
            &p.app_id,
        ] {
            field.hash(&mut h);
        }
        // The broker adds x-* headers (x-death, x-delivery-count...) and removes BCC.
        for (k, v) in &p.headers {
            if !k.starts_with("x-") && k != "BCC" {
                k.hash(&mut h);
                v.hash(&mut h);
            }
        }
        let want = usize::try_from(m.body_size).map_or(BODY_DIGEST_LEN, |s| s.min(BODY_DIGEST_LEN));
        let body = (m.body.len() >= want).then(|| {
            let mut b = DefaultHasher::new();
            m.body[..want].hash(&mut b);
            b.finish()
        });
        MessageKey {
            fingerprint: h.finish(),
            body,
            queue,
            redelivered,
        }
    }

    /// Whether the two keys may name the same message.
    pub fn same_message(&self, other: &MessageKey) -> bool {
        self.fingerprint == other.fingerprint
            && match (self.body, other.body) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            }
    }
}

/// What a consumer span needs of its producer.
struct Producer {
    key: MessageKey,
    trace_id: TraceId,
    span_id: SpanId,
    parent: Option<SpanId>,
    start_unix_nanos: u64,
    /// Queues whose delivery already linked to it.
    matched: Vec<Option<String>>,
    /// A broker span took it as its parent.
    routed: bool,
    deadline_ns: u64,
}

struct Waiting {
    span: Span,
    key: MessageKey,
    deadline_ns: u64,
}

/// A broker span held while the broker's deliveries of its message are counted.
struct Route {
    span: Span,
    key: MessageKey,
    /// Queues delivered from (`None`: a consumer whose queue is unknown), for matching.
    queues: Vec<Option<String>>,
    deliveries: u64,
    /// When the last delivery was sent (Unix ns).
    last_sent_unix_nanos: u64,
    deadline_ns: u64,
}

/// A delivery the broker sent before its broker span was seen.
struct Dispatched {
    key: MessageKey,
    sent_unix_nanos: u64,
    deadline_ns: u64,
}

pub struct MessageLinker {
    hold_ns: u64,
    remember_ns: u64,
    max_entries: usize,
    /// Producers by arrival sequence number, and their sequence numbers by fingerprint.
    producers: BTreeMap<u64, Producer>,
    producers_by_fp: FastMap<u64, VecDeque<u64>>,
    waiting: BTreeMap<u64, Waiting>,
    waiting_by_fp: FastMap<u64, VecDeque<u64>>,
    /// Broker spans held, and deliveries waiting for theirs, likewise.
    routes: BTreeMap<u64, Route>,
    routes_by_fp: FastMap<u64, VecDeque<u64>>,
    dispatched: BTreeMap<u64, Dispatched>,
    dispatched_by_fp: FastMap<u64, VecDeque<u64>>,
    next_seq: u64,
}

impl MessageLinker {
    pub fn new(hold: Duration, remember: Duration, max_entries: usize) -> Self {
        MessageLinker {
            hold_ns: hold.as_nanos() as u64,
            remember_ns: remember.as_nanos() as u64,
            max_entries: max_entries.max(1),
            producers: BTreeMap::new(),
            producers_by_fp: FastMap::default(),
            waiting: BTreeMap::new(),
            waiting_by_fp: FastMap::default(),
            routes: BTreeMap::new(),
            routes_by_fp: FastMap::default(),
            dispatched: BTreeMap::new(),
            dispatched_by_fp: FastMap::default(),
            next_seq: 0,
        }
    }

    /// Offers a finished RabbitMQ span with the key of its message. Returns the spans
    /// ready to go on: a producer span at once, with any consumer spans that waited for
    /// it, linked; a consumer span once linked (or later, from `expire`); a broker span
    /// (kind `SERVER`) later, from `expire`.
    pub fn offer(&mut self, span: Span, key: MessageKey, now_ns: u64) -> Vec<Span> {
        let mut out = Vec::new();
        match span.kind {
            SpanKind::Producer => {
                self.expire_producers(now_ns);
                if self.producers.len() >= self.max_entries {
                    self.drop_oldest_producer();
                }
                let seq = self.next_seq;
                self.next_seq += 1;
                let fp = key.fingerprint;
                let mut producer = Producer {
                    key,
                    trace_id: span.trace_id,
                    span_id: span.span_id,
                    parent: span.parent_span_id,
                    start_unix_nanos: span.start_unix_nanos,
                    matched: Vec::new(),
                    routed: false,
                    deadline_ns: now_ns.saturating_add(self.remember_ns),
                };
                out.push(span);
                // Consumer spans that waited for this publish, oldest first, one per queue,
                // and the redeliveries to a queue already matched (a nack that requeued
                // before the publish was seen).
                let candidates: Vec<u64> = self
                    .waiting_by_fp
                    .get(&fp)
                    .map(|q| q.iter().copied().collect())
                    .unwrap_or_default();
                for wseq in candidates {
                    let Some(w) = self.waiting.get(&wseq) else {
                        continue;
                    };
                    let taken = producer.matched.contains(&w.key.queue) && !w.key.redelivered;
                    if !producer.key.same_message(&w.key) || taken {
                        continue;
                    }
                    let mut w = self.remove_waiting(wseq).expect("present above");
                    link(
                        &mut producer,
                        &mut w.span,
                        w.key.queue,
                        now_ns,
                        self.hold_ns,
                    );
                    out.push(w.span);
                }
                self.producers.insert(seq, producer);
                self.producers_by_fp.entry(fp).or_default().push_back(seq);
            }
            SpanKind::Consumer => {
                let candidates = self.producers_by_fp.get(&key.fingerprint);
                let first = |already_matched: bool| {
                    candidates.and_then(|q| {
                        q.iter().copied().find(|seq| {
                            self.producers.get(seq).is_some_and(|p| {
                                p.key.same_message(&key)
                                    && p.matched.contains(&key.queue) == already_matched
                            })
                        })
                    })
                };
                // A redelivery comes from a publish already delivered to the queue, if seen.
                let found = if key.redelivered {
                    first(true).or_else(|| first(false))
                } else {
                    first(false)
                };
                let mut span = span;
                if let Some(seq) = found {
                    let producer = self.producers.get_mut(&seq).expect("found above");
                    link(producer, &mut span, key.queue, now_ns, self.hold_ns);
                    out.push(span);
                } else {
                    if self.waiting.len() >= self.max_entries
                        && let Some((&oldest, _)) = self.waiting.first_key_value()
                    {
                        out.extend(self.remove_waiting(oldest).map(|w| w.span));
                    }
                    let seq = self.next_seq;
                    self.next_seq += 1;
                    self.waiting_by_fp
                        .entry(key.fingerprint)
                        .or_default()
                        .push_back(seq);
                    self.waiting.insert(
                        seq,
                        Waiting {
                            span,
                            key,
                            deadline_ns: now_ns.saturating_add(self.hold_ns),
                        },
                    );
                }
            }
            SpanKind::Server => {
                if self.routes.len() >= self.max_entries
                    && let Some((&oldest, _)) = self.routes.first_key_value()
                {
                    out.extend(self.finish_route(oldest));
                }
                let seq = self.next_seq;
                self.next_seq += 1;
                let fp = key.fingerprint;
                let mut route = Route {
                    last_sent_unix_nanos: span.end_unix_nanos,
                    span,
                    key,
                    queues: Vec::new(),
                    deliveries: 0,
                    deadline_ns: now_ns.saturating_add(self.hold_ns),
                };
                // Deliveries sent before this span arrived, oldest first, one per queue.
                let candidates: Vec<u64> = self
                    .dispatched_by_fp
                    .get(&fp)
                    .map(|q| q.iter().copied().collect())
                    .unwrap_or_default();
                for dseq in candidates {
                    let Some(d) = self.dispatched.get(&dseq) else {
                        continue;
                    };
                    if !route.key.same_message(&d.key)
                        || (route.queues.contains(&d.key.queue) && !d.key.redelivered)
                    {
                        continue;
                    }
                    let d = self.remove_dispatched(dseq).expect("present above");
                    route.add(d.key.queue, d.sent_unix_nanos);
                }
                self.routes.insert(seq, route);
                self.routes_by_fp.entry(fp).or_default().push_back(seq);
            }
            _ => out.push(span),
        }
        out
    }

    /// The producer span a delivery of the message `key` would be linked to now, as
    /// (trace, span), without taking it: so that a delivery's trace is known when it
    /// starts, before it is acked.
    pub fn peek_producer(&self, key: &MessageKey) -> Option<(TraceId, SpanId)> {
        let candidates = self.producers_by_fp.get(&key.fingerprint)?;
        let first = |already_matched: bool| {
            candidates.iter().find_map(|seq| {
                self.producers.get(seq).filter(|p| {
                    p.key.same_message(key) && p.matched.contains(&key.queue) == already_matched
                })
            })
        };
        let p = if key.redelivered {
            first(true).or_else(|| first(false))
        } else {
            first(false)
        }?;
        Some((p.trace_id, p.span_id))
    }

    /// Offers a delivery the broker sent (`key` of an [`AmqpOperation::Dispatch`], sent
    /// at `sent_unix_nanos`): counted on the broker span of its message, or kept for
    /// `hold` until that span arrives.
    pub fn offer_dispatch(&mut self, key: MessageKey, sent_unix_nanos: u64, now_ns: u64) {
        let candidates = self.routes_by_fp.get(&key.fingerprint);
        let first = |already: bool| {
            candidates.and_then(|q| {
                q.iter().copied().find(|seq| {
                    self.routes.get(seq).is_some_and(|r| {
                        r.key.same_message(&key) && r.queues.contains(&key.queue) == already
                    })
                })
            })
        };
        let found = if key.redelivered {
            first(true).or_else(|| first(false))
        } else {
            first(false)
        };
        if let Some(seq) = found {
            let route = self.routes.get_mut(&seq).expect("found above");
            route.add(key.queue, sent_unix_nanos);
            return;
        }
        if self.dispatched.len() >= self.max_entries
            && let Some((&oldest, _)) = self.dispatched.first_key_value()
        {
            self.remove_dispatched(oldest);
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.dispatched_by_fp
            .entry(key.fingerprint)
            .or_default()
            .push_back(seq);
        self.dispatched.insert(
            seq,
            Dispatched {
                key,
                sent_unix_nanos,
                deadline_ns: now_ns.saturating_add(self.hold_ns),
            },
        );
    }

    /// Consumer spans whose wait is over and broker spans whose time is up; forgets
    /// producers and deliveries past their time.
    pub fn expire(&mut self, now_ns: u64) -> Vec<Span> {
        let routes: Vec<u64> = self
            .routes
            .iter()
            .filter(|(_, r)| r.deadline_ns <= now_ns)
            .map(|(s, _)| *s)
            .collect();
        let mut out: Vec<Span> = routes
            .into_iter()
            .filter_map(|s| self.finish_route(s))
            .collect();
        self.expire_producers(now_ns);
        let dispatched: Vec<u64> = self
            .dispatched
            .iter()
            .filter(|(_, d)| d.deadline_ns <= now_ns)
            .map(|(s, _)| *s)
            .collect();
        for seq in dispatched {
            self.remove_dispatched(seq);
        }
        let due: Vec<u64> = self
            .waiting
            .iter()
            .filter(|(_, w)| w.deadline_ns <= now_ns)
            .map(|(s, _)| *s)
            .collect();
        out.extend(
            due.into_iter()
                .filter_map(|s| self.remove_waiting(s))
                .map(|w| w.span),
        );
        out
    }

    /// Everything still waiting (at shutdown).
    pub fn drain(&mut self) -> Vec<Span> {
        let routes: Vec<u64> = self.routes.keys().copied().collect();
        let mut out: Vec<Span> = routes
            .into_iter()
            .filter_map(|s| self.finish_route(s))
            .collect();
        self.producers.clear();
        self.producers_by_fp.clear();
        self.waiting_by_fp.clear();
        self.dispatched.clear();
        self.dispatched_by_fp.clear();
        out.extend(
            std::mem::take(&mut self.waiting)
                .into_values()
                .map(|w| w.span),
        );
        out
    }

    /// Broker spans held for their deliveries.
    pub fn routes_len(&self) -> usize {
        self.routes.len()
    }

    /// Broker deliveries waiting for their broker span.
    pub fn dispatched_len(&self) -> usize {
        self.dispatched.len()
    }

    /// The broker span `seq`, completed: parent, deliveries, queues, end.
    fn finish_route(&mut self, seq: u64) -> Option<Span> {
        let mut route = self.routes.remove(&seq)?;
        remove_seq(&mut self.routes_by_fp, route.key.fingerprint, seq);
        let producer = self
            .producers_by_fp
            .get(&route.key.fingerprint)
            .and_then(|q| {
                q.iter().copied().find(|s| {
                    self.producers
                        .get(s)
                        .is_some_and(|p| !p.routed && p.key.same_message(&route.key))
                })
            });
        let span = &mut route.span;
        if let Some(p) = producer.and_then(|s| self.producers.get_mut(&s)) {
            p.routed = true;
            span.trace_id = p.trace_id;
            span.parent_span_id = Some(p.span_id);
        }
        span.end_unix_nanos = span.end_unix_nanos.max(route.last_sent_unix_nanos);
        span.attributes
            .retain(|kv| kv.key != DELIVERIES && kv.key != QUEUES);
        let queues: Vec<String> = route.queues.into_iter().flatten().collect();
        if !queues.is_empty() {
            span.attributes.push(KeyValue::new(QUEUES, queues));
        }
        span.attributes
            .push(KeyValue::new(DELIVERIES, route.deliveries));
        Some(route.span)
    }

    fn remove_dispatched(&mut self, seq: u64) -> Option<Dispatched> {
        let d = self.dispatched.remove(&seq)?;
        remove_seq(&mut self.dispatched_by_fp, d.key.fingerprint, seq);
        Some(d)
    }

    /// Consumer spans waiting for their producer.
    pub fn waiting_len(&self) -> usize {
        self.waiting.len()
    }

    /// Producers remembered for deliveries to come.
    pub fn producers_len(&self) -> usize {
        self.producers.len()
    }

    fn remove_waiting(&mut self, seq: u64) -> Option<Waiting> {
        let w = self.waiting.remove(&seq)?;
        if let Some(q) = self.waiting_by_fp.get_mut(&w.key.fingerprint) {
            q.retain(|s| *s != seq);
            if q.is_empty() {
                self.waiting_by_fp.remove(&w.key.fingerprint);
            }
        }
        Some(w)
    }

    fn remove_producer(&mut self, seq: u64) {
        let Some(p) = self.producers.remove(&seq) else {
            return;
        };
        if let Some(q) = self.producers_by_fp.get_mut(&p.key.fingerprint) {
            q.retain(|s| *s != seq);
            if q.is_empty() {
                self.producers_by_fp.remove(&p.key.fingerprint);
            }
        }
    }

    fn drop_oldest_producer(&mut self) {
        if let Some((&seq, _)) = self.producers.first_key_value() {
            self.remove_producer(seq);
        }
    }

    fn expire_producers(&mut self, now_ns: u64) {
        let due: Vec<u64> = self
            .producers
            .iter()
            .filter(|(_, p)| p.deadline_ns <= now_ns)
            .map(|(s, _)| *s)
            .collect();
        for seq in due {
            self.remove_producer(seq);
        }
    }
}

impl Route {
    /// One more delivery of the message, from `queue`, sent at `sent_unix_nanos`.
    fn add(&mut self, queue: Option<String>, sent_unix_nanos: u64) {
        if self.queues.len() < MAX_QUEUES_PER_PUBLISH && !self.queues.contains(&queue) {
            self.queues.push(queue);
        }
        self.deliveries += 1;
        self.last_sent_unix_nanos = self.last_sent_unix_nanos.max(sent_unix_nanos);
    }
}

/// Removes `seq` from the queue of sequence numbers under `fp`.
fn remove_seq(index: &mut FastMap<u64, VecDeque<u64>>, fp: u64, seq: u64) {
    if let Some(q) = index.get_mut(&fp) {
        q.retain(|s| *s != seq);
        if q.is_empty() {
            index.remove(&fp);
        }
    }
}

/// Makes `consumer` the child of `producer`'s span (unless it carries a parent of its
/// own that the publish did not share) and records the queue as matched.
fn link(
    producer: &mut Producer,
    consumer: &mut Span,
    queue: Option<String>,
    now_ns: u64,
    hold_ns: u64,
) {
    if producer.matched.len() < MAX_QUEUES_PER_PUBLISH && !producer.matched.contains(&queue) {
        producer.matched.push(queue);
    }
    if producer.matched.len() == 1 {
        producer.deadline_ns = producer.deadline_ns.max(now_ns.saturating_add(hold_ns));
    }
    let shares_parent = consumer.parent_span_id.is_none()
        || (consumer.trace_id == producer.trace_id && consumer.parent_span_id == producer.parent);
    if !shares_parent {
        return;
    }
    consumer.trace_id = producer.trace_id;
    consumer.parent_span_id = Some(producer.span_id);
    let waited_ns = consumer
        .start_unix_nanos
        .saturating_sub(producer.start_unix_nanos);
    consumer.attributes.retain(|kv| kv.key != BROKER_WAIT_MS);
    consumer.attributes.push(KeyValue::new(
        BROKER_WAIT_MS,
        Value::Double(waited_ns as f64 / 1e6),
    ));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        conn::Role,
        protocols::amqp::{Delivery, DeliveryKind, Properties, Publish},
        spans::{new_span_id, new_trace_id},
    };

    fn message(id: &str, body: &[u8]) -> Message {
        Message {
            exchange: "events".into(),
            routing_key: "order.status".into(),
            properties: Properties {
                message_id: Some(id.into()),
                headers: vec![("order_id".into(), "42".into())],
                ..Properties::default()
            },
            body_size: body.len() as u64,
            body: body.to_vec(),
        }
    }

    fn publish_key(m: Message) -> MessageKey {
        MessageKey::of(&AmqpOperation::Publish(Publish {
            role: Role::Client,
            channel: 1,
            number: 0,
            message: m,
            mandatory: false,
            start_ns: 0,
            end_ns: 0,
            confirmed: None,
            returned: None,
            error: None,
            vhost: None,
            user: None,
            incomplete: None,
        }))
        .unwrap()
    }

    fn delivery_key(m: Message, queue: &str) -> MessageKey {
        MessageKey::of(&AmqpOperation::Delivery(Delivery {
            role: Role::Client,
            kind: DeliveryKind::Deliver,
            channel: 1,
            consumer_tag: None,
            queue: Some(queue.into()),
            delivery_tag: 1,
            redelivered: false,
            message: m,
            start_ns: 0,
            end_ns: 0,
            outcome: None,
            error: None,
            vhost: None,
            user: None,
            incomplete: None,
        }))
        .unwrap()
    }

    fn span(kind: SpanKind, start: u64) -> Span {
        Span {
            kind,
            ..crate::spans::test_span(new_trace_id(), new_span_id(), start, start + 1)
        }
    }

    fn linker() -> MessageLinker {
        MessageLinker::new(Duration::from_secs(2), Duration::from_secs(60), 100)
    }

    #[test]
    fn delivery_becomes_child_of_publish_in_either_order() {
        for consumer_first in [false, true] {
            let mut l = linker();
            let p = span(SpanKind::Producer, 1_000_000);
            let c = span(SpanKind::Consumer, 4_000_000);
            let ids = (p.trace_id, p.span_id);
            let (pk, ck) = (
                publish_key(message("m1", b"body")),
                delivery_key(message("m1", b"body"), "crm"),
            );
            let out = if consumer_first {
                assert!(l.offer(c, ck, 0).is_empty());
                l.offer(p, pk, 10)
            } else {
                assert_eq!(l.offer(p, pk, 0).len(), 1);
                l.offer(c, ck, 10)
            };
            let consumer = out.iter().find(|s| s.kind == SpanKind::Consumer).unwrap();
            assert_eq!(
                (consumer.trace_id, consumer.parent_span_id),
                (ids.0, Some(ids.1))
            );
            assert_eq!(
                consumer.attribute(BROKER_WAIT_MS),
                Some(&Value::Double(3.0))
            );
            assert_eq!(l.waiting_len(), 0);
        }
    }

    #[test]
    fn fan_out_links_every_queue_to_one_publish_and_identical_messages_go_in_order() {
        let mut l = linker();
        let (p1, p2) = (span(SpanKind::Producer, 1), span(SpanKind::Producer, 2));
        let (id1, id2) = (p1.span_id, p2.span_id);
        l.offer(p1, publish_key(message("same", b"x")), 0);
        l.offer(p2, publish_key(message("same", b"x")), 0);
        let mut parents = Vec::new();
        for queue in ["crm", "audit", "crm", "audit"] {
            let out = l.offer(
                span(SpanKind::Consumer, 5),
                delivery_key(message("same", b"x"), queue),
                1,
            );
            parents.push(out[0].parent_span_id.unwrap());
        }
        assert_eq!(parents, [id1, id1, id2, id2]);
    }

    #[test]
    fn redelivery_links_to_the_publish_already_delivered() {
        let mut l = linker();
        let p = span(SpanKind::Producer, 1);
        let id = p.span_id;
        l.offer(p, publish_key(message("a", b"x")), 0);
        let first = l.offer(
            span(SpanKind::Consumer, 2),
            delivery_key(message("a", b"x"), "q"),
            0,
        );
        let mut again = delivery_key(message("a", b"x"), "q");
        again.redelivered = true;
        let second = l.offer(span(SpanKind::Consumer, 3), again, 0);
        assert_eq!(
            (first[0].parent_span_id, second[0].parent_span_id),
            (Some(id), Some(id))
        );
    }

    #[test]
    fn a_redelivery_waiting_with_its_first_delivery_links_to_the_late_publish() {
        let mut l = linker();
        let p = span(SpanKind::Producer, 1_000_000);
        let id = p.span_id;
        let mut again = delivery_key(message("a", b"x"), "q");
        again.redelivered = true;
        let first = l.offer(
            span(SpanKind::Consumer, 2_000_000),
            delivery_key(message("a", b"x"), "q"),
            0,
        );
        let second = l.offer(span(SpanKind::Consumer, 5_000_000), again, 0);
        assert!(first.is_empty() && second.is_empty());
        let out = l.offer(p, publish_key(message("a", b"x")), 10);
        let waits: Vec<_> = out
            .iter()
            .filter(|s| s.kind == SpanKind::Consumer)
            .map(|s| (s.parent_span_id, s.attribute(BROKER_WAIT_MS).cloned()))
            .collect();
        assert_eq!(
            waits,
            [
                (Some(id), Some(Value::Double(1.0))),
                (Some(id), Some(Value::Double(4.0)))
            ]
        );
        assert_eq!(l.waiting_len(), 0);
    }

    #[test]
    fn different_messages_do_not_link() {
        let mut l = linker();
        l.offer(
            span(SpanKind::Producer, 1),
            publish_key(message("a", b"x")),
            0,
        );
        assert!(
            l.offer(
                span(SpanKind::Consumer, 2),
                delivery_key(message("b", b"x"), "q"),
                0
            )
            .is_empty()
        );
        assert!(
            l.offer(
                span(SpanKind::Consumer, 2),
                delivery_key(message("a", b"y"), "q"),
                0
            )
            .is_empty()
        );
        let out = l.expire(3_000_000_000);
        assert_eq!(out.len(), 2);
        assert!(out.iter().all(|s| s.parent_span_id.is_none()));
    }

    #[test]
    fn broker_headers_do_not_break_the_match() {
        let mut delivered = message("a", b"x");
        delivered
            .properties
            .headers
            .push(("x-delivery-count".into(), "1".into()));
        delivered.properties.timestamp = Some(1_700_000_000);
        assert!(publish_key(message("a", b"x")).same_message(&delivery_key(delivered, "q")));
    }

    #[test]
    fn own_traceparent_wins_unless_the_publish_shared_it() {
        let mut l = linker();
        let p = span(SpanKind::Producer, 1);
        let mut c = span(SpanKind::Consumer, 2);
        let foreign = (c.trace_id, new_span_id());
        c.parent_span_id = Some(foreign.1);
        l.offer(p, publish_key(message("a", b"x")), 0);
        let out = l.offer(c, delivery_key(message("a", b"x"), "q"), 0);
        assert_eq!(
            (out[0].trace_id, out[0].parent_span_id),
            (foreign.0, Some(foreign.1))
        );

        let upstream = (new_trace_id(), new_span_id());
        let mut p = span(SpanKind::Producer, 1);
        (p.trace_id, p.parent_span_id) = (upstream.0, Some(upstream.1));
        let producer_id = p.span_id;
        let mut c = span(SpanKind::Consumer, 2);
        (c.trace_id, c.parent_span_id) = (upstream.0, Some(upstream.1));
        l.offer(p, publish_key(message("b", b"x")), 0);
        let out = l.offer(c, delivery_key(message("b", b"x"), "q"), 0);
        assert_eq!(
            (out[0].trace_id, out[0].parent_span_id),
            (upstream.0, Some(producer_id))
        );
    }

    fn dispatch_key(m: Message, queue: &str, redelivered: bool) -> MessageKey {
        let mut k = delivery_key(m, queue);
        k.redelivered = redelivered;
        k
    }

    fn queues_of(s: &Span) -> Option<Vec<String>> {
        match s.attribute(QUEUES) {
            Some(Value::StrArray(q)) => Some(q.clone()),
            None => None,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn broker_span_lists_the_queues_of_a_fan_out_under_the_producer() {
        let mut l = linker();
        let hold = 2_000_000_000;
        let p = span(SpanKind::Producer, 1_000);
        let route = span(SpanKind::Server, 1_100);
        let (producer_id, trace, route_id) = (p.span_id, p.trace_id, route.span_id);
        let m = || message("fan", b"x");
        assert_eq!(l.offer(p, publish_key(m()), 0).len(), 1);
        assert!(
            l.offer(route, publish_key(m()), 10).is_empty(),
            "held for its deliveries"
        );
        l.offer_dispatch(dispatch_key(m(), "crm", false), 1_500, 20);
        l.offer_dispatch(dispatch_key(m(), "audit", false), 1_900, 30);
        // The consumer spans still link to the producer span.
        for q in ["crm", "audit"] {
            let out = l.offer(span(SpanKind::Consumer, 2_000), delivery_key(m(), q), 40);
            assert_eq!(out[0].parent_span_id, Some(producer_id));
        }
        assert!(l.expire(hold).is_empty(), "held for `hold` after its offer");
        let out = l.expire(hold + 10);
        assert_eq!(out.len(), 1);
        let r = &out[0];
        assert_eq!(r.span_id, route_id);
        assert_eq!((r.trace_id, r.parent_span_id), (trace, Some(producer_id)));
        assert_eq!(r.end_unix_nanos, 1_900, "ends at the last delivery sent");
        assert_eq!(
            queues_of(r),
            Some(vec!["crm".to_owned(), "audit".to_owned()])
        );
        assert_eq!(r.attribute(DELIVERIES), Some(&Value::Int(2)));
        assert_eq!((l.routes_len(), l.dispatched_len()), (0, 0));
    }

    #[test]
    fn broker_span_takes_deliveries_sent_before_it_and_a_producer_seen_after_it() {
        let mut l = linker();
        let m = || message("early", b"x");
        l.offer_dispatch(dispatch_key(m(), "crm", false), 500, 0);
        assert_eq!(l.dispatched_len(), 1);
        l.offer(span(SpanKind::Server, 100), publish_key(m()), 1);
        assert_eq!(l.dispatched_len(), 0);
        let p = span(SpanKind::Producer, 50);
        let producer = (p.trace_id, p.span_id);
        l.offer(p, publish_key(m()), 2);
        let out = l.drain();
        assert_eq!(out.len(), 1);
        assert_eq!(
            (out[0].trace_id, out[0].parent_span_id),
            (producer.0, Some(producer.1))
        );
        assert_eq!(out[0].end_unix_nanos, 500);
        assert_eq!(queues_of(&out[0]), Some(vec!["crm".to_owned()]));
    }

    #[test]
    fn identical_messages_give_one_broker_span_each_in_order() {
        let mut l = linker();
        let m = || message("same", b"x");
        let (p1, p2) = (span(SpanKind::Producer, 1), span(SpanKind::Producer, 2));
        let (id1, id2) = (p1.span_id, p2.span_id);
        l.offer(p1, publish_key(m()), 0);
        l.offer(p2, publish_key(m()), 0);
        let (r1, r2) = (span(SpanKind::Server, 3), span(SpanKind::Server, 4));
        let (rid1, rid2) = (r1.span_id, r2.span_id);
        l.offer(r1, publish_key(m()), 0);
        l.offer(r2, publish_key(m()), 0);
        for (q, at) in [("crm", 10), ("audit", 11), ("crm", 12), ("audit", 13)] {
            l.offer_dispatch(dispatch_key(m(), q, false), at, 0);
        }
        // A redelivery to crm counts on the first route delivered to crm.
        l.offer_dispatch(dispatch_key(m(), "crm", true), 20, 0);
        let mut out = l.expire(u64::MAX);
        out.sort_by_key(|s| s.start_unix_nanos);
        let got: Vec<_> = out
            .iter()
            .map(|s| {
                (
                    s.span_id,
                    s.parent_span_id,
                    s.attribute(DELIVERIES).cloned(),
                    s.end_unix_nanos,
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                (rid1, Some(id1), Some(Value::Int(3)), 20),
                (rid2, Some(id2), Some(Value::Int(2)), 13),
            ]
        );
    }

    #[test]
    fn broker_span_without_a_traced_publisher_and_late_deliveries() {
        let mut l = MessageLinker::new(Duration::from_nanos(100), Duration::from_nanos(1000), 2);
        let r = span(SpanKind::Server, 1);
        let own = (r.trace_id, r.parent_span_id);
        l.offer(r, publish_key(message("alone", b"x")), 0);
        let out = l.expire(100);
        assert_eq!((out[0].trace_id, out[0].parent_span_id), own);
        assert_eq!(out[0].attribute(DELIVERIES), Some(&Value::Int(0)));
        assert_eq!(queues_of(&out[0]), None);
        // A delivery long after its broker span left waits, then is forgotten.
        l.offer_dispatch(dispatch_key(message("alone", b"x"), "q", false), 5, 150);
        assert_eq!(l.dispatched_len(), 1);
        assert!(l.expire(250).is_empty());
        assert_eq!(l.dispatched_len(), 0);
        // Bounds: a third held broker span sends the oldest out early; a third waiting
        // delivery forgets the oldest.
        for i in 0..3 {
            let out = l.offer(
                span(SpanKind::Server, 1),
                publish_key(message(&format!("r{i}"), b"x")),
                300,
            );
            assert_eq!(out.len(), usize::from(i == 2));
            l.offer_dispatch(
                dispatch_key(message(&format!("d{i}"), b"x"), "q", false),
                1,
                300,
            );
        }
        assert_eq!((l.routes_len(), l.dispatched_len()), (2, 2));
        assert_eq!(l.drain().len(), 2);
        assert_eq!((l.routes_len(), l.dispatched_len()), (0, 0));
    }

    #[test]
    fn memory_is_bounded_and_producers_are_forgotten() {
        let mut l = MessageLinker::new(Duration::from_nanos(100), Duration::from_nanos(1000), 3);
        for i in 0..10 {
            l.offer(
                span(SpanKind::Producer, 1),
                publish_key(message(&i.to_string(), b"x")),
                0,
            );
        }
        assert_eq!(l.producers_len(), 3);
        let mut released = 0;
        for i in 10..20 {
            released += l
                .offer(
                    span(SpanKind::Consumer, 1),
                    delivery_key(message(&i.to_string(), b"x"), "q"),
                    0,
                )
                .len();
        }
        assert_eq!((l.waiting_len(), released), (3, 7));
        assert_eq!(l.expire(100).len(), 3);
        l.expire(1000);
        assert_eq!(l.producers_len(), 0);
        assert!(l.drain().is_empty());
    }
}
