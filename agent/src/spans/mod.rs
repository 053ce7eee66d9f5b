//! The span model every stage after the protocol parsers speaks.
//!
//! sonde builds spans after the fact, for many services at once, with its own ids and
//! times, so it does not go through the OpenTelemetry SDK's live-span API: a [`Span`]
//! is plain data that the exporters turn into OTLP.

pub mod amqp;
pub mod http;
pub mod route;

use std::sync::Arc;

/// sonde's attribute on a span whose exchange never finished (no response, a response
/// cut short): `true`. The span ends at the last byte seen.
pub const INCOMPLETE: &str = "sonde.incomplete";
/// Why the exchange never finished: `connection_closed`, `process_exit`, `evicted`
/// (the connection table was full), `idle`, `capture_end`, `agent_stop` or
/// `stream_reset` (an HTTP/2 stream reset by either end).
pub const INCOMPLETE_REASON: &str = "sonde.incomplete.reason";

/// sonde's attribute on an HTTP/2 span whose request headers referred to HPACK table
/// entries sent before the agent watched the connection: `true`. What they held is
/// missing (the method or path too, when they were among them).
pub const HEADER_TABLE_UNKNOWN: &str = "sonde.http2.header_table_unknown";

/// 16-byte W3C trace id.
pub type TraceId = [u8; 16];
/// 8-byte W3C span id.
pub type SpanId = [u8; 8];

/// What the span stands for, as in OTLP's `SpanKind`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpanKind {
    Internal,
    Server,
    Client,
    Producer,
    Consumer,
}

/// A span's outcome, as in OTLP's `Status`.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum Status {
    #[default]
    Unset,
    Ok,
    Error(String),
}

/// An attribute value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Str(String),
    Int(i64),
    Bool(bool),
    Double(f64),
    /// A homogeneous array of strings (OTLP `ArrayValue` of string values).
    StrArray(Vec<String>),
}

impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::Str(v.to_owned())
    }
}
impl From<String> for Value {
    fn from(v: String) -> Self {
        Value::Str(v)
    }
}
impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Value::Int(v)
    }
}
impl From<u16> for Value {
    fn from(v: u16) -> Self {
        Value::Int(i64::from(v))
    }
}
impl From<u32> for Value {
    fn from(v: u32) -> Self {
        Value::Int(i64::from(v))
    }
}
impl From<u64> for Value {
    fn from(v: u64) -> Self {
        Value::Int(i64::try_from(v).unwrap_or(i64::MAX))
    }
}
impl From<Vec<String>> for Value {
    fn from(v: Vec<String>) -> Self {
        Value::StrArray(v)
    }
}
impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Value::Bool(v)
    }
}

impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Value::Str(s) => write!(f, "{s:?}"),
            Value::Int(i) => write!(f, "{i}"),
            Value::Bool(b) => write!(f, "{b}"),
            Value::Double(d) => write!(f, "{d}"),
            Value::StrArray(items) => {
                f.write_str("[")?;
                for (i, s) in items.iter().enumerate() {
                    if i > 0 {
                        f.write_str(",")?;
                    }
                    write!(f, "{s:?}")?;
                }
                f.write_str("]")
            }
        }
    }
}

/// One attribute. Keys come from `opentelemetry_semantic_conventions` where a
/// convention exists.
#[derive(Clone, Debug, PartialEq)]
pub struct KeyValue {
    pub key: &'static str,
    pub value: Value,
}

impl KeyValue {
    pub fn new(key: &'static str, value: impl Into<Value>) -> Self {
        KeyValue {
            key,
            value: value.into(),
        }
    }
}

/// The service a span belongs to: one per traced process.
#[derive(Clone, Debug, PartialEq)]
pub struct Resource {
    /// `service.name`.
    pub service_name: String,
    /// `process.pid`.
    pub pid: u32,
    /// `process.executable.name`.
    pub executable_name: String,
    /// `host.name`.
    pub host_name: String,
    /// Further resource attributes (container, Kubernetes, command line...).
    pub attributes: Vec<KeyValue>,
    /// `service_name` is sonde's own guess (the script or executable name), not the
    /// process's OTEL_SERVICE_NAME or an identity rule's: a Kubernetes workload's name
    /// ([`crate::kubernetes`]) replaces it.
    pub generic_name: bool,
}

/// A finished span.
#[derive(Clone, Debug)]
pub struct Span {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub parent_span_id: Option<SpanId>,
    pub name: String,
    pub kind: SpanKind,
    /// Wall-clock start, nanoseconds since the Unix epoch.
    pub start_unix_nanos: u64,
    /// Wall-clock end, nanoseconds since the Unix epoch.
    pub end_unix_nanos: u64,
    pub attributes: Vec<KeyValue>,
    pub status: Status,
    pub resource: Arc<Resource>,
}

impl Span {
    /// The value of attribute `key`, if the span has it.
    pub fn attribute(&self, key: &str) -> Option<&Value> {
        self.attributes
            .iter()
            .find(|kv| kv.key == key)
            .map(|kv| &kv.value)
    }

    /// The memory the span takes, its resource aside (shared by the spans of a
    /// process): for stages bounded by bytes.
    pub fn held_bytes(&self) -> usize {
        let values: usize = self
            .attributes
            .iter()
            .map(|kv| match &kv.value {
                Value::Str(s) => s.capacity(),
                Value::StrArray(items) => {
                    items.capacity() * std::mem::size_of::<String>()
                        + items.iter().map(String::capacity).sum::<usize>()
                }
                Value::Int(_) | Value::Bool(_) | Value::Double(_) => 0,
            })
            .sum();
        let status = match &self.status {
            Status::Error(message) => message.capacity(),
            Status::Unset | Status::Ok => 0,
        };
        std::mem::size_of::<Span>()
            + self.name.capacity()
            + self.attributes.capacity() * std::mem::size_of::<KeyValue>()
            + values
            + status
    }
}

/// A plain server span for unit tests: the given ids, start and end, no attributes,
/// service `s`.
#[cfg(test)]
pub fn test_span(trace_id: TraceId, span_id: SpanId, start: u64, end: u64) -> Span {
    Span {
        trace_id,
        span_id,
        parent_span_id: None,
        name: "GET /".into(),
        kind: SpanKind::Server,
        start_unix_nanos: start,
        end_unix_nanos: end,
        attributes: vec![],
        status: Status::Unset,
        resource: Arc::new(Resource {
            service_name: "s".into(),
            pid: 1,
            executable_name: "s".into(),
            host_name: "h".into(),
            attributes: vec![],
            generic_name: false,
        }),
    }
}

/// Fresh random ids. Trace ids are never all zero, as W3C requires.
pub fn new_trace_id() -> TraceId {
    loop {
        let id: TraceId = rand::random();
        if id != [0; 16] {
            return id;
        }
    }
}

pub fn new_span_id() -> SpanId {
    loop {
        let id: SpanId = rand::random();
        if id != [0; 8] {
            return id;
        }
    }
}

/// Lower-case hex, as W3C and OTLP JSON write ids.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}
