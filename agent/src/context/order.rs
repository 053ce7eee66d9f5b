//! The order a trace is about, on every span of it: an `order.id` found on one span of
//! a trace is set on the spans of the same trace that lack it.
//!
//! Spans whose trace is known wait here for `hold` before they go on, so that an id
//! found a little later on another span of the trace (a response that names the order
//! the request created) still reaches them; the ids of recent traces are remembered
//! (bounded), so spans of the same trace that come later get it too. Spans that left
//! before the id was first seen keep lacking it. Only the id travels: `order.status`
//! stays on the spans whose payload said it.

use crate::FastMap;
use std::collections::VecDeque;

use crate::spans::{KeyValue, Span, TraceId, Value};

/// The business attribute naming the order a span served.
pub const ORDER_ID: &str = "order.id";
/// The order's status, where a payload says it.
pub const ORDER_STATUS: &str = "order.status";

/// Traces whose order id is remembered.
const MAX_TRACES: usize = 100_000;

/// See the module documentation.
pub struct OrderFill<T> {
    hold_ns: u64,
    waiting: VecDeque<(u64, Span, T)>,
    ids: FastMap<TraceId, String>,
    /// Traces in the order their id was learnt, to forget the oldest.
    learnt: VecDeque<TraceId>,
    max_waiting: usize,
}

impl<T> OrderFill<T> {
    pub fn new(hold_ns: u64, max_waiting: usize) -> Self {
        OrderFill {
            hold_ns,
            waiting: VecDeque::new(),
            ids: FastMap::default(),
            learnt: VecDeque::new(),
            max_waiting: max_waiting.max(1),
        }
    }

    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    /// A span whose trace is known; `now_ns` monotonic. What had to leave to stay under
    /// the bound is appended to `out`.
    pub fn push(&mut self, span: Span, then: T, now_ns: u64, out: &mut Vec<(Span, T)>) {
        self.learn(&span);
        if self.hold_ns == 0 {
            out.push((self.filled(span), then));
            return;
        }
        if self.waiting.len() >= self.max_waiting
            && let Some((_, s, t)) = self.waiting.pop_front()
        {
            out.push((self.filled(s), t));
        }
        self.waiting
            .push_back((now_ns.saturating_add(self.hold_ns), span, then));
    }

    /// Spans whose wait is over, with the order id of their trace when known.
    pub fn release(&mut self, now_ns: u64, out: &mut Vec<(Span, T)>) {
        while self.waiting.front().is_some_and(|(at, _, _)| *at <= now_ns) {
            let (_, span, then) = self.waiting.pop_front().expect("front exists");
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
        if self.learnt.len() >= MAX_TRACES
            && let Some(old) = self.learnt.pop_front()
        {
            self.ids.remove(&old);
        }
        self.ids.insert(span.trace_id, id.clone());
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
