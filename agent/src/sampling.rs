//! Sampling by order: which spans leave the node when not every trace can be kept.
//!
//! The decision is made per order, never per span: every span of a trace that names an
//! order (`order.id`, on the trace's spans by the order hold before this stage) follows
//! the order's decision, and a trace with no order id follows its trace id. Both are a
//! pure function of the id (its hash under the ratio), so every agent, on every node and
//! for every process, keeps or drops the same orders without talking to the others.
//!
//! Whatever the ratio, an order is kept once one of its spans is an error, is stalled
//! (`sonde.stalled`) or makes its end-to-end time (first start to last end, of the spans
//! this agent saw) exceed the slow threshold. The spans of an order the ratio did not
//! keep wait here for that, up to the hold; when it ends they are dropped, and a
//! trigger that comes later keeps the order from then on (its earlier spans are gone:
//! counted as kept late). A trace without an order id honours the sampled flag of an
//! incoming `traceparent` in place of its hash.
//!
//! An optional limit of spans per second: orders the ratio keeps are admitted while the
//! budget lasts; an admitted order keeps all its spans. Orders kept for an error, a stall
//! or slowness are kept whatever the limit.

use crate::FastMap;
use std::{collections::VecDeque, time::Duration};

use serde::Deserialize;

use crate::{
    context::{order::ORDER_ID, trace::STALLED},
    spans::{Span, Status, TraceId, Value},
    telemetry::{DecisionKind, SampleWhy},
};

/// The `sampling:` section of the config file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamplingConfig {
    /// The share of orders (and of traces without an order) kept, 0 to 1.
    #[serde(default = "one")]
    pub ratio: f64,
    /// Keep every order with an error span.
    #[serde(default = "yes")]
    pub keep_errors: bool,
    /// Keep every order with a stalled span.
    #[serde(default = "yes")]
    pub keep_stalled: bool,
    /// Keep every order whose end-to-end time exceeds this.
    #[serde(default, deserialize_with = "duration_opt")]
    pub slow: Option<Duration>,
    /// How long the spans of an order not kept wait for an error, a stall or slowness
    /// (default: the stall timeout and 5 s more, so a stall can still keep the order).
    #[serde(default, deserialize_with = "duration_opt")]
    pub hold: Option<Duration>,
    /// Most spans per second this node exports for orders kept by the ratio.
    #[serde(default)]
    pub limit: Option<u32>,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        SamplingConfig {
            ratio: 1.0,
            keep_errors: true,
            keep_stalled: true,
            slow: None,
            hold: None,
            limit: None,
        }
    }
}

fn one() -> f64 {
    1.0
}

fn yes() -> bool {
    true
}

fn duration_opt<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let text = String::deserialize(d)?;
    humantime::parse_duration(text.trim())
        .map(Some)
        .map_err(|e| serde::de::Error::custom(format!("{text:?} is not a duration: {e}")))
}

impl SamplingConfig {
    /// Whether this keeps everything (then no sampler is needed).
    pub fn keeps_all(&self) -> bool {
        self.ratio >= 1.0 && self.limit.is_none()
    }

    /// Checks the values; the message says which is wrong.
    pub fn check(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.ratio) || self.ratio.is_nan() {
            return Err(format!(
                "sampling ratio {} is not between 0 and 1",
                self.ratio
            ));
        }
        if self.limit == Some(0) {
            return Err(
                "sampling limit 0 would drop every order; leave it out for no limit".into(),
            );
        }
        Ok(())
    }
}

/// The part of a 64-bit value compared with the ratio: 56 bits, as in W3C trace ids'
/// random part (their last 7 bytes) and OpenTelemetry's consistent probability sampling.
const RANDOM_BITS: u32 = 56;

/// Kept when the 56-bit value is below this.
pub fn threshold(ratio: f64) -> u64 {
    if ratio >= 1.0 {
        1 << RANDOM_BITS
    } else {
        (ratio * (1u64 << RANDOM_BITS) as f64) as u64
    }
}

/// The 56 random bits of a trace id (its last 7 bytes).
pub fn trace_value(trace: &TraceId) -> u64 {
    trace[9..]
        .iter()
        .fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
}

/// 56 bits from an order id: FNV-1a over its UTF-8 bytes, mixed by SplitMix64's
/// finaliser so that ids differing in one character spread over the whole range. Fixed
/// forever: changing it would split orders between agents of different versions.
pub fn order_value(order_id: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in order_id.as_bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^= h >> 31;
    h >> (64 - RANDOM_BITS)
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Key {
    Order(String),
    Trace(TraceId),
}

impl Key {
    fn kind(&self) -> DecisionKind {
        match self {
            Key::Order(_) => DecisionKind::Order,
            Key::Trace(_) => DecisionKind::Trace,
        }
    }
}

enum State {
    Kept,
    /// Not kept (yet): its spans wait until `until` for a reason to keep it.
    Waiting {
        why: SampleWhy,
        until: u64,
        held: Vec<Span>,
    },
    /// Its hold is over: its spans are dropped, unless one is a reason to keep it.
    Dropped,
}

struct Entry {
    state: State,
    first_start: u64,
    last_end: u64,
    /// Which decision this is: a key forgotten and seen again is a new entry, and the
    /// age list's copy of the old one must not forget the new one.
    born: u64,
}

/// Keys whose decision is remembered; an order forgotten and seen again is decided
/// again, the same way (the ratio's part of the decision is a function of its id).
const MAX_KEYS: usize = 200_000;
/// Traces whose incoming sampled flag is remembered.
const MAX_FLAGS: usize = 100_000;

/// See the module documentation.
pub struct Sampler {
    threshold: u64,
    keep_errors: bool,
    keep_stalled: bool,
    slow_ns: Option<u64>,
    hold_ns: u64,
    limit: Option<Bucket>,
    entries: FastMap<Key, Entry>,
    /// Keys in the order they were first seen, to forget the oldest, with the `born`
    /// of the entry they were seen for.
    age: VecDeque<(u64, Key)>,
    /// The next entry's `born`.
    births: u64,
    /// How many keys are remembered (MAX_KEYS; smaller in tests).
    max_keys: usize,
    /// Waiting keys by the end of their hold (constant hold: in time order).
    deadlines: VecDeque<(u64, Key)>,
    held: usize,
    max_held: usize,
    /// Sampled flags of incoming `traceparent`s, by trace.
    flags: FastMap<TraceId, bool>,
    flag_age: VecDeque<TraceId>,
    metrics: std::sync::Arc<crate::telemetry::Metrics>,
}

impl Sampler {
    /// `stall_timeout` sets the default hold; `max_held` bounds the spans waiting.
    pub fn new(
        config: &SamplingConfig,
        stall_timeout: Option<Duration>,
        max_held: usize,
        metrics: std::sync::Arc<crate::telemetry::Metrics>,
    ) -> Self {
        let hold = config.hold.unwrap_or_else(|| {
            stall_timeout.map_or(Duration::from_secs(10), |s| s + Duration::from_secs(5))
        });
        Sampler {
            threshold: threshold(config.ratio),
            keep_errors: config.keep_errors,
            keep_stalled: config.keep_stalled,
            slow_ns: config.slow.map(|d| d.as_nanos() as u64),
            hold_ns: hold.as_nanos() as u64,
            limit: config.limit.map(Bucket::new),
            entries: FastMap::default(),
            age: VecDeque::new(),
            births: 0,
            max_keys: MAX_KEYS,
            deadlines: VecDeque::new(),
            held: 0,
            max_held: max_held.max(1),
            flags: FastMap::default(),
            flag_age: VecDeque::new(),
            metrics,
        }
    }

    /// Spans held, waiting for a reason to keep their order.
    pub fn len(&self) -> usize {
        self.held
    }

    pub fn is_empty(&self) -> bool {
        self.held == 0
    }

    /// An incoming `traceparent` with these trace flags started (or continued) `trace`.
    pub fn parent_flags(&mut self, trace: TraceId, flags: u8) {
        if self.flags.contains_key(&trace) {
            return;
        }
        if self.flag_age.len() >= MAX_FLAGS
            && let Some(old) = self.flag_age.pop_front()
        {
            self.flags.remove(&old);
        }
        self.flags.insert(trace, flags & 1 == 1);
        self.flag_age.push_back(trace);
    }

    /// One span on its way out; what may leave is appended to `out`. `now_ns` monotonic.
    pub fn push(&mut self, span: Span, now_ns: u64, out: &mut Vec<Span>) {
        self.expire(now_ns);
        let key = match span.attribute(ORDER_ID) {
            Some(Value::Str(id)) => Key::Order(id.clone()),
            _ => Key::Trace(span.trace_id),
        };
        if !self.entries.contains_key(&key) {
            self.decide(key.clone(), &span, now_ns);
        }
        // Spans of this trace that waited without an order id now follow the order.
        if matches!(key, Key::Order(_)) {
            self.adopt(Key::Trace(span.trace_id), &key, out);
        }
        self.place(&key, span, out);
    }

    /// Ends the holds that are over.
    pub fn expire(&mut self, now_ns: u64) {
        while self.deadlines.front().is_some_and(|(at, _)| *at <= now_ns) {
            let (at, key) = self.deadlines.pop_front().expect("front exists");
            self.end_hold(&key, Some(at));
        }
    }

    /// At shutdown: the spans still waiting are dropped (counted).
    pub fn drain(&mut self) {
        while let Some((at, key)) = self.deadlines.pop_front() {
            self.end_hold(&key, Some(at));
        }
    }

    fn decide(&mut self, key: Key, span: &Span, now_ns: u64) {
        let (kept, why) = match &key {
            Key::Order(id) => (order_value(id) < self.threshold, SampleWhy::Ratio),
            Key::Trace(trace) => match self.flags.get(trace) {
                Some(&sampled) => (sampled, SampleWhy::Parent),
                None => (trace_value(trace) < self.threshold, SampleWhy::Ratio),
            },
        };
        let limited = kept && self.limit.as_mut().is_some_and(|b| !b.admit(now_ns));
        let (kept, why) = if limited {
            (false, SampleWhy::Limit)
        } else {
            (kept, why)
        };
        if self.age.len() >= self.max_keys
            && let Some((born, old)) = self.age.pop_front()
            && self.entries.get(&old).is_some_and(|e| e.born == born)
        {
            self.forget(&old);
        }
        let born = self.births;
        self.births += 1;
        let state = if kept {
            self.metrics.sampling.kept(key.kind(), why);
            State::Kept
        } else {
            let until = now_ns.saturating_add(self.hold_ns);
            self.deadlines.push_back((until, key.clone()));
            State::Waiting {
                why,
                until,
                held: Vec::new(),
            }
        };
        self.entries.insert(
            key.clone(),
            Entry {
                state,
                first_start: span.start_unix_nanos,
                last_end: span.end_unix_nanos,
                born,
            },
        );
        self.age.push_back((born, key));
    }

    /// Puts a span where its key's state says: out, held, or dropped.
    fn place(&mut self, key: &Key, span: Span, out: &mut Vec<Span>) {
        let trigger = self.trigger(key, &span);
        let Some(entry) = self.entries.get_mut(key) else {
            return;
        };
        match (&mut entry.state, trigger) {
            (State::Kept, _) => {
                if let Some(bucket) = &mut self.limit {
                    bucket.spend(1);
                }
                out.push(span);
            }
            (State::Waiting { held, .. }, Some(why)) => {
                self.held -= held.len();
                out.append(held);
                out.push(span);
                entry.state = State::Kept;
                self.metrics.sampling.kept(key.kind(), why);
            }
            (State::Waiting { held, .. }, None) => {
                held.push(span);
                self.held += 1;
                if self.held > self.max_held {
                    self.shed();
                }
            }
            (State::Dropped, Some(why)) => {
                entry.state = State::Kept;
                self.metrics.sampling.kept_late(key.kind(), why);
                out.push(span);
            }
            (State::Dropped, None) => self.metrics.sampling.spans_dropped(1),
        }
    }

    /// Why this span keeps its order whatever the ratio, if it does; it also widens the
    /// order's end-to-end time.
    fn trigger(&mut self, key: &Key, span: &Span) -> Option<SampleWhy> {
        let entry = self.entries.get_mut(key)?;
        entry.first_start = entry.first_start.min(span.start_unix_nanos);
        entry.last_end = entry.last_end.max(span.end_unix_nanos);
        if matches!(entry.state, State::Kept) {
            return None;
        }
        if self.keep_errors && matches!(span.status, Status::Error(_)) {
            return Some(SampleWhy::Error);
        }
        if self.keep_stalled && matches!(span.attribute(STALLED), Some(Value::Bool(true))) {
            return Some(SampleWhy::Stalled);
        }
        match self.slow_ns {
            Some(slow) if entry.last_end.saturating_sub(entry.first_start) > slow => {
                Some(SampleWhy::Slow)
            }
            _ => None,
        }
    }

    /// A trace whose spans waited under their trace id learnt its order: they join it.
    fn adopt(&mut self, from: Key, to: &Key, out: &mut Vec<Span>) {
        let Some(entry) = self.entries.get_mut(&from) else {
            return;
        };
        let State::Waiting { held, .. } = &mut entry.state else {
            return;
        };
        let spans = std::mem::take(held);
        self.held -= spans.len();
        self.forget(&from);
        for span in spans {
            self.place(to, span, out);
        }
    }

    /// The hold of `key` that ends `at` (or any, for `None`) is over.
    fn end_hold(&mut self, key: &Key, at: Option<u64>) {
        let Some(entry) = self.entries.get_mut(key) else {
            return;
        };
        let State::Waiting { why, until, held } = &mut entry.state else {
            return;
        };
        if at.is_some_and(|at| at != *until) {
            return;
        }
        let (why, n) = (*why, held.len());
        entry.state = State::Dropped;
        self.held -= n;
        self.metrics.sampling.dropped(key.kind(), why);
        self.metrics.sampling.spans_dropped(n as u64);
    }

    /// Too many spans wait: the holds that end soonest end now.
    fn shed(&mut self) {
        while self.held > self.max_held {
            let Some((at, key)) = self.deadlines.pop_front() else {
                return;
            };
            self.end_hold(&key, Some(at));
            self.metrics.sampling.hold_full();
        }
    }

    fn forget(&mut self, key: &Key) {
        if let Some(Entry {
            state: State::Waiting { held, why, .. },
            ..
        }) = self.entries.remove(key)
            && !held.is_empty()
        {
            self.held -= held.len();
            self.metrics.sampling.dropped(key.kind(), why);
            self.metrics.sampling.spans_dropped(held.len() as u64);
        }
    }
}

/// Spans per second, with a burst of one second's worth.
struct Bucket {
    per_sec: f64,
    tokens: f64,
    at_ns: u64,
}

impl Bucket {
    fn new(per_sec: u32) -> Self {
        Bucket {
            per_sec: f64::from(per_sec),
            tokens: f64::from(per_sec),
            at_ns: 0,
        }
    }

    /// Whether a new order may start now.
    fn admit(&mut self, now_ns: u64) -> bool {
        let dt = now_ns.saturating_sub(self.at_ns) as f64 / 1e9;
        self.at_ns = now_ns;
        self.tokens = (self.tokens + dt * self.per_sec).min(self.per_sec);
        self.tokens >= 1.0
    }

    /// Spans of admitted orders use the budget; the debt is at most one second's.
    fn spend(&mut self, n: u32) {
        self.tokens = (self.tokens - f64::from(n)).max(-self.per_sec);
    }
}

#[cfg(test)]
mod tests;
