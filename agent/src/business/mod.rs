//! Business attributes: `order.id`, `order.status` and whatever the config file's rules
//! name, taken from the exchange a span stands for.
//!
//! A rule takes one value from one place: a URL path template, a query parameter, an
//! HTTP request or response header, a field of a JSON body (HTTP request, HTTP response
//! or AMQP message) by path, or an AMQP message header. It may be restricted to a
//! service, an HTTP method or route, an exchange or a routing key. The config file's
//! rules come first, then (unless turned off) the default rules ([`defaults`]); for each
//! attribute the first rule that finds a value sets it. Values are strings of at most
//! [`MAX_VALUE_LEN`] bytes. Bodies are only read here: no body is ever exported, only
//! the values picked.
//!
//! [`apply`] is a pure function of the rules and a view of the exchange; the span
//! builders' callers use [`annotate_http`] and [`annotate_amqp`].

mod defaults;
pub mod json;
pub mod pattern;
pub mod redact;
mod rule;
#[cfg(test)]
mod tests;

use std::borrow::Cow;

use opentelemetry_semantic_conventions::attribute as semconv;

pub use redact::{RedactionConfig, Redactor};
pub use rule::{BusinessConfig, Rule};

use crate::protocols::{
    amqp::{AmqpOperation, Message},
    http::{HttpExchange, RequestHead, ResponseHead},
};
use crate::spans::{KeyValue, Span, Value};
use json::{JsonPath, Scalar, Seg};
use rule::{BodySide, Source};

/// The attribute rules set unless they name another.
pub const ORDER_ID: &str = "order.id";
/// The order status found beside an order id.
pub const ORDER_STATUS: &str = "order.status";
/// Longest value kept, in bytes (cut at a character boundary).
pub const MAX_VALUE_LEN: usize = 256;

/// The rules in force: the config file's, then the defaults unless turned off.
#[derive(Clone, Debug)]
pub struct Rules {
    rules: Vec<Rule>,
    defaults: bool,
    /// Asked before a value from a secret header, parameter or field is kept.
    redactor: Redactor,
}

impl Default for Rules {
    /// The default rules alone, as with no config file.
    fn default() -> Self {
        Rules {
            rules: Vec::new(),
            defaults: true,
            redactor: Redactor::default(),
        }
    }
}

impl Rules {
    pub fn new(config: BusinessConfig) -> Self {
        Rules {
            rules: config.rules,
            defaults: config.defaults,
            redactor: Redactor::default(),
        }
    }

    /// What decides which values are secrets.
    pub fn redactor(&self) -> &Redactor {
        &self.redactor
    }

    /// The same rules with the config file's redaction instead of the built-in one.
    pub fn with_redaction(mut self, redactor: Redactor) -> Self {
        self.redactor = redactor;
        self
    }

    fn all(&self) -> impl Iterator<Item = &Rule> {
        let defaults: &[Rule] = if self.defaults {
            defaults::rules()
        } else {
            &[]
        };
        self.rules.iter().chain(defaults)
    }
}

/// What the rules may look at in an HTTP exchange.
pub struct HttpView<'a> {
    pub method: &'a str,
    /// The path, without query.
    pub path: Option<&'a str>,
    pub query: Option<&'a str>,
    pub request: &'a RequestHead,
    pub response: Option<&'a ResponseHead>,
    pub request_body: &'a [u8],
    pub response_body: &'a [u8],
}

/// What the rules may look at in one exchange.
pub enum Exchange<'a> {
    Http(HttpView<'a>),
    Amqp(&'a Message),
}

/// One exchange as the rules see it: its service and what it carried.
pub struct ExchangeView<'a> {
    /// `service.name` of the process the span belongs to, as known when it is built.
    pub service: &'a str,
    pub exchange: Exchange<'a>,
}

/// A JSON body the rules may read.
#[derive(Clone, Copy)]
struct Body<'a> {
    side: BodySide,
    bytes: &'a [u8],
}

/// The attributes the rules find in `view`, each name at most once, in rule order.
pub fn apply(rules: &Rules, view: &ExchangeView<'_>) -> Vec<(&'static str, Value)> {
    let candidates: Vec<&Rule> = rules.all().filter(|r| r.applies_to(view)).collect();
    let bodies = bodies(view);
    let json = JsonFinds::scan(&candidates, &bodies);
    let mut found: Vec<(&'static str, Value)> = Vec::new();
    for (i, rule) in candidates.iter().enumerate() {
        if found.iter().any(|(name, _)| *name == rule.attribute) {
            continue;
        }
        let value = match &rule.source {
            Source::Json { .. } => json.best[i]
                .as_ref()
                .map(|c| Cow::Borrowed(c.value.as_str())),
            other => simple_source(other, rule, view),
        };
        if let Some(v) = value.and_then(|v| clean(&v)) {
            let v = if rule.reads_secret(&rules.redactor) {
                redact::REDACTED.to_owned()
            } else {
                v
            };
            found.push((rule.attribute, Value::Str(v)));
        }
    }
    if rules.defaults
        && !found.iter().any(|(n, _)| *n == ORDER_STATUS)
        && let Some(status) = json.status_beside_order_id.and_then(|s| clean(&s))
    {
        found.push((ORDER_STATUS, Value::Str(status)));
    }
    found
}

/// Adds the rules' attributes to an HTTP span (those it has already stay).
pub fn annotate_http(rules: &Rules, ex: &HttpExchange, span: &mut Span) {
    let text = |key: &str| match span.attribute(key) {
        Some(Value::Str(s)) => Some(s.clone()),
        _ => None,
    };
    let (path, query) = (text(semconv::URL_PATH), text(semconv::URL_QUERY));
    let view = ExchangeView {
        service: &span.resource.service_name,
        exchange: Exchange::Http(HttpView {
            method: &ex.request.method,
            path: path.as_deref(),
            query: query.as_deref(),
            request: &ex.request,
            response: ex.response.as_ref(),
            request_body: &ex.request_body,
            response_body: &ex.response_body,
        }),
    };
    let found = apply(rules, &view);
    add(span, found);
}

/// Adds the rules' attributes to the span of an AMQP publish or delivery.
pub fn annotate_amqp(rules: &Rules, op: &AmqpOperation, span: &mut Span) {
    let message = match op {
        AmqpOperation::Publish(p) => &p.message,
        AmqpOperation::Delivery(d) | AmqpOperation::Dispatch(d) => &d.message,
        _ => return,
    };
    let view = ExchangeView {
        service: &span.resource.service_name,
        exchange: Exchange::Amqp(message),
    };
    let found = apply(rules, &view);
    add(span, found);
}

fn add(span: &mut Span, found: Vec<(&'static str, Value)>) {
    for (key, value) in found {
        if span.attribute(key).is_none() {
            span.attributes.push(KeyValue { key, value });
        }
    }
}

/// The value of a rule that reads no body.
fn simple_source<'v>(
    source: &Source,
    rule: &Rule,
    view: &ExchangeView<'v>,
) -> Option<Cow<'v, str>> {
    match (source, &view.exchange) {
        (Source::Path { pattern, capture }, Exchange::Http(h)) => {
            let taken = pattern.matches(h.path?)?;
            let raw = *taken.get(*capture)?;
            if rule.identifiers_only && !crate::spans::route::is_identifier(raw) {
                return None;
            }
            percent_decode(raw)
        }
        (Source::Query(name), Exchange::Http(h)) => query_param(h.query?, name),
        (Source::Header { name, side }, Exchange::Http(h)) => {
            let request = (*side != Some(BodySide::Response))
                .then(|| h.request.header(name))
                .flatten();
            let response = || {
                (*side != Some(BodySide::Request))
                    .then(|| h.response?.header(name))
                    .flatten()
            };
            request.or_else(response).map(Cow::Borrowed)
        }
        (Source::AmqpHeader(name), Exchange::Amqp(m)) => m
            .properties
            .headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| Cow::Borrowed(v.as_str())),
        _ => None,
    }
}

/// The value of query parameter `name` (the first one), percent-decoded, `+` as space.
fn query_param<'q>(query: &'q str, name: &str) -> Option<Cow<'q, str>> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(k)? == name).then(|| {
            if v.contains('+') {
                percent_decode(&v.replace('+', " ")).map(|c| Cow::Owned(c.into_owned()))
            } else {
                percent_decode(v)
            }
        })?
    })
}

fn percent_decode(s: &str) -> Option<Cow<'_, str>> {
    percent_encoding::percent_decode_str(s).decode_utf8().ok()
}

/// A value as exported: trimmed, not empty, at most [`MAX_VALUE_LEN`] bytes.
fn clean(v: &str) -> Option<String> {
    let v = v.trim();
    if v.is_empty() {
        return None;
    }
    let mut end = v.len().min(MAX_VALUE_LEN);
    while !v.is_char_boundary(end) {
        end -= 1;
    }
    Some(v[..end].to_owned())
}

/// The bodies of the exchange that may be JSON: not compressed, starting with `{` or `[`.
fn bodies<'a>(view: &ExchangeView<'a>) -> Vec<Body<'a>> {
    let compressed = |encoding: Option<&str>| {
        encoding.is_some_and(|e| !e.trim().is_empty() && !e.eq_ignore_ascii_case("identity"))
    };
    let mut out = Vec::new();
    let mut push = |side, bytes: &'a [u8], encoding: Option<&str>| {
        let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
        if matches!(first, Some(b'{' | b'[')) && !compressed(encoding) {
            out.push(Body { side, bytes });
        }
    };
    match &view.exchange {
        Exchange::Http(h) => {
            push(
                BodySide::Request,
                h.request_body,
                h.request.header("content-encoding"),
            );
            if let Some(resp) = h.response {
                push(
                    BodySide::Response,
                    h.response_body,
                    resp.header("content-encoding"),
                );
            }
        }
        Exchange::Amqp(m) => push(
            BodySide::Message,
            &m.body,
            m.properties.content_encoding.as_deref(),
        ),
    }
    out
}

/// A value a JSON rule found, with what makes one better than another.
struct Candidate {
    value: String,
    depth: usize,
}

/// What one scan of each body found for the JSON rules.
struct JsonFinds {
    /// Per candidate rule (same index), the shallowest match, the first among equals.
    best: Vec<Option<Candidate>>,
    /// A status field in the same object as a default order id field.
    status_beside_order_id: Option<String>,
}

impl JsonFinds {
    /// Most objects whose status fields are remembered per body.
    const MAX_STATUS_OBJECTS: usize = 64;

    fn scan(rules: &[&Rule], bodies: &[Body<'_>]) -> Self {
        let mut finds = JsonFinds {
            best: rules.iter().map(|_| None).collect(),
            status_beside_order_id: None,
        };
        let wanted = |r: &Rule, side| match &r.source {
            Source::Json { side: s, .. } => s.is_none_or(|s| s == side),
            _ => false,
        };
        // Bodies in order (request before response): an earlier body's match wins.
        for body in bodies {
            let readers: Vec<(usize, &[JsonPath])> = rules
                .iter()
                .enumerate()
                .filter(|(i, r)| finds.best[*i].is_none() && wanted(r, body.side))
                .filter_map(|(i, r)| match &r.source {
                    Source::Json { paths, .. } => Some((i, paths.as_slice())),
                    _ => None,
                })
                .collect();
            let mut statuses: Vec<(u32, String)> = Vec::new();
            let mut order_objects: Vec<u32> = Vec::new();
            let mut here: Vec<Option<Candidate>> = rules.iter().map(|_| None).collect();
            json::scan(body.bytes, |s: &Scalar<'_, '_>| {
                for (i, paths) in &readers {
                    let better = here[*i].as_ref().is_none_or(|c| s.path.len() < c.depth);
                    if better && paths.iter().any(|p| p.matches(s.path)) {
                        here[*i] = Some(Candidate {
                            value: s.value.to_string(),
                            depth: s.path.len(),
                        });
                    }
                }
                if let Some(object) = s.object {
                    if defaults::is_order_id_field(s.path) && !order_objects.contains(&object) {
                        order_objects.push(object);
                    }
                    if let Some(Seg::Key(k)) = s.path.last()
                        && defaults::STATUS_KEYS.contains(&k.as_ref())
                        && statuses.len() < Self::MAX_STATUS_OBJECTS
                        && !statuses.iter().any(|(o, _)| *o == object)
                    {
                        statuses.push((object, s.value.to_string()));
                    }
                }
            });
            for (slot, found) in finds.best.iter_mut().zip(here) {
                if slot.is_none() {
                    *slot = found;
                }
            }
            if finds.status_beside_order_id.is_none() {
                finds.status_beside_order_id = order_objects.iter().find_map(|o| {
                    statuses
                        .iter()
                        .find(|(so, _)| so == o)
                        .map(|(_, v)| v.clone())
                });
            }
        }
        finds
    }
}
