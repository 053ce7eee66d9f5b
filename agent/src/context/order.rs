//! The order a trace is about, on every span of it: an `order.id` found on one span of
//! a trace is set on the spans of the same trace that lack it.
//!
//! Spans whose trace is known wait here for `hold` before they go on, so that an id
//! found a little later on another span of the trace (a response that names the order
//! the request created) still reaches them; the ids of recent traces are remembered
//! (bounded), so spans of the same trace that come later get it too. Spans that left
//! before the id was first seen keep lacking it. Only the id travels: `order.status`
//! stays on the spans whose payload said it.
//!
//! Both are bounded by bytes as well as by count: the spans waiting (the oldest leave
//! early, counted: [`OrderFill::take_cut`]) and the ids remembered (the oldest are
//! forgotten; an id is a payload's string, of any length).

use crate::FastMap;
use std::collections::VecDeque;

use crate::spans::{KeyValue, Span, TraceId, Value};

/// The business attribute naming the order a span served.
pub const ORDER_ID: &str = "order.id";
/// The order's status, where a payload says it.
pub const ORDER_STATUS: &str = "order.status";

/// Traces whose order id is remembered.
const MAX_TRACES: usize = 100_000;
/// What the remembered ids may take, in bytes (about 80 per trace with a short id).
const MAX_ID_BYTES: usize = 8 << 20;

/// See the module documentation.
pub struct OrderFill<T> {
    hold_ns: u64,
    /// (release time, the span's bytes, span, what travels with it).
    waiting: VecDeque<(u64, usize, Span, T)>,
    waiting_bytes: usize,
    max_waiting: usize,
    max_waiting_bytes: usize,
    ids: FastMap<TraceId, String>,
    /// Traces in the order their id was learnt, to forget the oldest.
    learnt: VecDeque<TraceId>,
    id_bytes: usize,
    /// Spans that left before their hold ended, to stay under the bounds.
    cut: u64,
}

impl<T> OrderFill<T> {
    /// At most `max_waiting` spans wait, taking at most `max_waiting_bytes`
    /// ([`Span::held_bytes`]).
    pub fn new(hold_ns: u64, max_waiting: usize, max_waiting_bytes: usize) -> Self {
        OrderFill {
            hold_ns,
            waiting: VecDeque::new(),
            waiting_bytes: 0,
            max_waiting: max_waiting.max(1),
            max_waiting_bytes,
            ids: FastMap::default(),
            learnt: VecDeque::new(),
            id_bytes: 0,
            cut: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    /// The bytes the waiting spans take.
    pub fn waiting_bytes(&self) -> usize {
        self.waiting_bytes
    }

    /// Spans that left before their hold ended since the last call, to keep the
    /// waiting spans under their bounds: an id found later in their trace is not on
    /// them.
    pub fn take_cut(&mut self) -> u64 {
        std::mem::take(&mut self.cut)
    }

    /// A span whose trace is known; `now_ns` monotonic. What had to leave to stay under
    /// the bounds is appended to `out`.
    pub fn push(&mut self, span: Span, then: T, now_ns: u64, out: &mut Vec<(Span, T)>) {
        self.learn(&span);
        if self.hold_ns == 0 {
            out.push((self.filled(span), then));
            return;
        }
        let bytes = span.held_bytes();
        while !self.waiting.is_empty()
            && (self.waiting.len() >= self.max_waiting
                || self.waiting_bytes + bytes > self.max_waiting_bytes)
        {
            let (_, b, s, t) = self.waiting.pop_front().expect("not empty");
            self.waiting_bytes -= b;
            self.cut += 1;
            out.push((self.filled(s), t));
        }
        self.waiting_bytes += bytes;
        self.waiting
            .push_back((now_ns.saturating_add(self.hold_ns), bytes, span, then));
    }

    /// Spans whose wait is over, with the order id of their trace when known.
    pub fn release(&mut self, now_ns: u64, out: &mut Vec<(Span, T)>) {
        while self.waiting.front().is_some_and(|(at, ..)| *at <= now_ns) {
            let (_, bytes, span, then) = self.waiting.pop_front().expect("front exists");
            self.waiting_bytes -= bytes;
            out.push((self.filled(span), then));
        }
    }

    /// Everything, at shutdown.
    pub fn drain(&mut self, out: &mut Vec<(Span, T)>) {
        self.release(u64::MAX, out);
    }

    fn learn(&mut self, span: &Span) {
        let Some(Value::Str(id)) = span.attribute(ORDER_ID) else {
            return;
        };
        if self.ids.contains_key(&span.trace_id) {
            return;
        }
        let bytes = id_bytes(id);
        while self.learnt.len() >= MAX_TRACES || self.id_bytes + bytes > MAX_ID_BYTES {
            let Some(old) = self.learnt.pop_front() else {
                break;
            };
            if let Some(old_id) = self.ids.remove(&old) {
                self.id_bytes -= id_bytes(&old_id);
            }
        }
        self.ids.insert(span.trace_id, id.clone());
        self.id_bytes += bytes;
        self.learnt.push_back(span.trace_id);
    }

    fn filled(&self, mut span: Span) -> Span {
        if span.attribute(ORDER_ID).is_none()
            && let Some(id) = self.ids.get(&span.trace_id)
        {
            span.attributes.push(KeyValue::new(ORDER_ID, id.clone()));
        }
        span
    }
}

/// What remembering a trace's order id takes: the id, its map entry and its place in
/// the order learnt.
fn id_bytes(id: &str) -> usize {
    id.len() + std::mem::size_of::<(TraceId, String)>() + std::mem::size_of::<TraceId>()
}

/// The order id a request names, for telling apart the requests a service handles at
/// once (in-process parents): `/orders/{id}` in the path, an `order_id`, `orderId` or
/// `order-id` query parameter, an `X-Order-Id` header, or such a field at the top of a
/// JSON body. The business rules of the config file give the span attributes; this is
/// only the evidence for parents.
pub fn order_id_of(request: &crate::protocols::http::RequestHead, body: &[u8]) -> Option<String> {
    const NAMES: [&str; 3] = ["order_id", "orderId", "order-id"];
    let (path, query) = match request.target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (request.target.as_str(), None),
    };
    let mut segments = path.split('/');
    while let Some(s) = segments.next() {
        if s.eq_ignore_ascii_case("orders")
            && let Some(id) = segments.next().filter(|id| !id.is_empty())
        {
            return Some(id.to_owned());
        }
    }
    if let Some(q) = query {
        for pair in q.split('&') {
            if let Some((k, v)) = pair.split_once('=')
                && NAMES.contains(&k)
                && !v.is_empty()
            {
                return Some(v.to_owned());
            }
        }
    }
    if let Some(v) = request.header("x-order-id") {
        return Some(v.trim().to_owned());
    }
    order_id_of_json(body)
}

/// The order id at the top of a JSON object body (`order_id`, `orderId`, `order-id`).
pub fn order_id_of_json(body: &[u8]) -> Option<String> {
    let body = body.trim_ascii_start();
    if body.first() != Some(&b'{') {
        return None;
    }
    let Ok(serde_json::Value::Object(map)) = serde_json::from_slice(body) else {
        return None;
    };
    ["order_id", "orderId", "order-id"]
        .iter()
        .find_map(|name| match map.get(*name) {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Number(n)) => Some(n.to_string()),
            _ => None,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(trace: u8, order: Option<&str>) -> Span {
        let mut s = crate::spans::test_span([trace; 16], [trace; 8], 1, 2);
        if let Some(id) = order {
            s.attributes.push(KeyValue::new(ORDER_ID, id));
        }
        s
    }

    #[test]
    fn spans_wait_for_the_order_id_of_their_trace_and_the_byte_bound_cuts_the_wait_counted() {
        let one = span(1, None).held_bytes();
        let with_id = span(1, Some("ord-1")).held_bytes();
        assert!(with_id > one);
        // Room for these three, not for a fourth.
        let mut fill = OrderFill::new(100, 1_000, 3 * one + with_id - 1);
        let mut out = Vec::new();
        fill.push(span(1, None), (), 0, &mut out);
        fill.push(span(2, None), (), 0, &mut out);
        fill.push(span(1, Some("ord-1")), (), 10, &mut out);
        assert!(out.is_empty());
        assert_eq!(fill.waiting_bytes(), 2 * one + with_id);
        // A fourth: the oldest leaves early, with the id its trace showed meanwhile.
        fill.push(span(2, None), (), 20, &mut out);
        assert_eq!(fill.take_cut(), 1);
        assert_eq!(out.len(), 1);
        assert_eq!(
            out[0].0.attribute(ORDER_ID),
            Some(&Value::Str("ord-1".into()))
        );
        fill.release(110, &mut out);
        assert_eq!(out.len(), 3, "the two that waited from 0 and 10");
        fill.release(120, &mut out);
        assert_eq!(out.len(), 4);
        assert_eq!(
            (fill.len(), fill.waiting_bytes(), fill.take_cut()),
            (0, 0, 0)
        );
    }

    #[test]
    fn the_ids_remembered_are_bounded_by_bytes() {
        let mut fill = OrderFill::new(0, 10, usize::MAX);
        let mut out = Vec::new();
        // Ids of 1 MiB: a handful fit, and the newest is remembered.
        let long = "x".repeat(1 << 20);
        for trace in 0..20u8 {
            fill.push(span(trace, Some(&long)), (), 0, &mut out);
        }
        assert!(fill.id_bytes <= MAX_ID_BYTES);
        assert!(fill.ids.len() < 10 && fill.ids.len() == fill.learnt.len());
        fill.push(span(19, None), (), 0, &mut out);
        fill.push(span(0, None), (), 0, &mut out);
        assert!(out[20].0.attribute(ORDER_ID).is_some());
        assert_eq!(out[21].0.attribute(ORDER_ID), None, "forgotten");
    }
}
