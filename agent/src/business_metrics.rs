//! The business metrics of /metrics, from the spans the agent exports: request rate,
//! errors and duration per service and route (HTTP) and per messaging destination
//! (RabbitMQ), and the processing time and failures of each order stage.
//!
//! Label values are bounded: routes are `http.route` (the agent's own templating of
//! the path when the service declares none, ids as `{id}`), and destinations and stage
//! names have the span's order id and any id-like segment replaced by `{order.id}` and
//! `{id}`. On top of that each family holds at most [`MAX_SERIES`] label sets; spans
//! that would make another are counted under labels all `_other`, and counted in
//! `sonde_metric_series_folded_total{family}`.

use std::fmt::Write as _;
use std::sync::Mutex;

use opentelemetry_semantic_conventions::attribute as semconv;

use crate::FastMap;
use crate::spans::route::{is_identifier, template_route};
use crate::spans::{Span, SpanKind, Status, Value};

/// Most label sets per family.
pub const MAX_SERIES: usize = 500;
/// Upper bounds of the duration histograms, in seconds.
pub const BUCKETS: [f64; 14] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
const OTHER: &str = "_other";
const KNOWN_METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

#[derive(Clone, Debug, Default)]
struct Red {
    count: u64,
    errors: u64,
    /// Per bucket of [`BUCKETS`], not cumulative; the last slot is +Inf.
    buckets: [u64; BUCKETS.len() + 1],
    sum_seconds: f64,
}

impl Red {
    fn observe(&mut self, seconds: f64, error: bool) {
        self.count += 1;
        if error {
            self.errors += 1;
        }
        let i = BUCKETS
            .iter()
            .position(|b| seconds <= *b)
            .unwrap_or(BUCKETS.len());
        self.buckets[i] += 1;
        self.sum_seconds += seconds;
    }
}

/// Label values of one series, in the family's label order, each ended by a NUL (a
/// NUL inside a value becomes U+FFFD): one string, so that a span's series is found
/// by a key built in a reused buffer, without an allocation per span. Ordered as the
/// list of values would be.
type Labels = String;

#[derive(Debug, Default)]
struct Family {
    series: FastMap<Labels, Red>,
    folded: u64,
}

impl Family {
    fn observe(&mut self, labels: &str, seconds: f64, error: bool) {
        if let Some(red) = self.series.get_mut(labels) {
            red.observe(seconds, error);
            return;
        }
        let key = if self.series.len() < MAX_SERIES {
            labels.to_owned()
        } else {
            self.folded += 1;
            let n = labels.matches('\0').count();
            format!("{OTHER}\0").repeat(n)
        };
        self.series.entry(key).or_default().observe(seconds, error);
    }
}

/// Appends one label value and its NUL to `key`.
fn push_label(key: &mut String, value: &str) {
    if value.contains('\0') {
        key.push_str(&value.replace('\0', "\u{fffd}"));
    } else {
        key.push_str(value);
    }
    key.push('\0');
}

/// Appends `text` folded by [`fold_ids`] as a label value.
fn push_folded(key: &mut String, text: &str, order_id: Option<&str>) {
    let at = key.len();
    fold_ids_into(text, order_id, key);
    if key[at..].contains('\0') {
        let value = key[at..].replace('\0', "\u{fffd}");
        key.truncate(at);
        key.push_str(&value);
    }
    key.push('\0');
}

#[derive(Debug, Default)]
struct Families {
    http: Family,
    messaging: Family,
    stages: Family,
    /// The key being built for the span observed (see [`Labels`]).
    key: String,
}

/// The business metrics; [`observe`](Self::observe) each exported span.
#[derive(Debug, Default)]
pub struct BusinessMetrics(Mutex<Families>);

struct FamilyInfo {
    key: &'static str,
    name: &'static str,
    help: &'static str,
    labels: &'static [&'static str],
}

const HTTP: FamilyInfo = FamilyInfo {
    key: "http",
    name: "sonde_http",
    help: "HTTP exchanges by service, kind (server: requests it served; client: calls it made), method and route",
    labels: &["service", "kind", "method", "route"],
};
const MESSAGING: FamilyInfo = FamilyInfo {
    key: "messaging",
    name: "sonde_messaging",
    help: "RabbitMQ publishes and deliveries by service, operation and destination",
    labels: &["service", "operation", "destination"],
};
const STAGES: FamilyInfo = FamilyInfo {
    key: "order_stage",
    name: "sonde_order_stage",
    help: "Order stages (spans with an order.id that are a request served, a message processed or a program run) by service and stage",
    labels: &["service", "stage"],
};

fn str_attr<'a>(span: &'a Span, key: &str) -> Option<&'a str> {
    match span.attribute(key) {
        Some(Value::Str(s)) => Some(s.as_str()),
        _ => None,
    }
}

/// `text` with `order_id` as `{order.id}` and each id-like segment (between `/`, `:`,
/// `.`) as `{id}`.
pub fn fold_ids(text: &str, order_id: Option<&str>) -> String {
    let mut out = String::with_capacity(text.len());
    fold_ids_into(text, order_id, &mut out);
    out
}

/// [`fold_ids`], appended to `out`.
fn fold_ids_into(text: &str, order_id: Option<&str>, out: &mut String) {
    let replaced;
    let text = match order_id.filter(|o| !o.is_empty() && text.contains(*o)) {
        Some(o) => {
            replaced = text.replace(o, "{order.id}");
            replaced.as_str()
        }
        None => text,
    };
    let flush = |segment: &str, out: &mut String| {
        if segment.starts_with("amq.gen-") || (is_identifier(segment) && !segment.contains('{')) {
            out.push_str("{id}");
        } else {
            out.push_str(segment);
        }
    };
    let mut start = 0;
    for (i, c) in text.char_indices() {
        let segment = &text[start..i];
        // `amq.gen-...` (a server-named queue) is one segment, dots and all.
        if c == ':' || (matches!(c, '/' | '.') && !segment.starts_with("amq")) {
            flush(segment, out);
            out.push(c);
            start = i + c.len_utf8();
        }
    }
    flush(&text[start..], out);
}

impl BusinessMetrics {
    /// Counts one exported span. Stalled spans are left out: the same exchange's
    /// ordinary span follows when it ends.
    pub fn observe(&self, span: &Span) {
        if matches!(
            span.attribute(crate::context::trace::STALLED),
            Some(Value::Bool(true))
        ) {
            return;
        }
        let seconds = span.end_unix_nanos.saturating_sub(span.start_unix_nanos) as f64 / 1e9;
        let error = matches!(span.status, Status::Error(_));
        let service = span.resource.service_name.as_str();
        let order_id = str_attr(span, "order.id");
        let Ok(mut guard) = self.0.lock() else {
            return;
        };
        let f = &mut *guard;
        let mut key = std::mem::take(&mut f.key);
        if let Some(method) = str_attr(span, semconv::HTTP_REQUEST_METHOD) {
            let kind = match span.kind {
                SpanKind::Server => "server",
                SpanKind::Client => "client",
                _ => "other",
            };
            let method = if KNOWN_METHODS.contains(&method) {
                method
            } else {
                "_OTHER"
            };
            key.clear();
            push_label(&mut key, service);
            push_label(&mut key, kind);
            push_label(&mut key, method);
            match str_attr(span, semconv::HTTP_ROUTE) {
                Some(route) => push_folded(&mut key, route, order_id),
                None => {
                    let route = template_route(str_attr(span, semconv::URL_PATH).unwrap_or("/"));
                    push_folded(&mut key, &route, order_id);
                }
            }
            f.http.observe(&key, seconds, error);
        } else if str_attr(span, semconv::MESSAGING_SYSTEM).is_some()
            && matches!(span.kind, SpanKind::Producer | SpanKind::Consumer)
        {
            let operation = if span.kind == SpanKind::Producer {
                "publish"
            } else {
                "process"
            };
            let destination = str_attr(span, semconv::MESSAGING_DESTINATION_NAME).unwrap_or("");
            key.clear();
            push_label(&mut key, service);
            push_label(&mut key, operation);
            push_folded(&mut key, destination, order_id);
            f.messaging.observe(&key, seconds, error);
        }
        let stage = matches!(
            span.kind,
            SpanKind::Server | SpanKind::Consumer | SpanKind::Internal
        );
        if stage && order_id.is_some() {
            key.clear();
            push_label(&mut key, service);
            match span.attribute(semconv::PROCESS_COMMAND_ARGS) {
                Some(Value::StrArray(args)) if span.kind == SpanKind::Internal => {
                    let name = crate::orders::journey::program_name(&span.name, args);
                    push_folded(&mut key, &name, order_id);
                }
                _ => push_folded(&mut key, &span.name, order_id),
            }
            f.stages.observe(&key, seconds, error);
        }
        f.key = key;
    }

    /// The families in the Prometheus text format: `{name}_total`, `{name}_errors_total`
    /// and `{name}_duration_seconds` (a histogram) each, then the folded counts.
    pub fn render(&self, out: &mut String) {
        let Ok(f) = self.0.lock() else {
            return;
        };
        for (info, family) in [
            (&HTTP, &f.http),
            (&MESSAGING, &f.messaging),
            (&STAGES, &f.stages),
        ] {
            render_family(out, info, family);
        }
        let _ = writeln!(
            out,
            "# HELP sonde_metric_series_folded_total Spans counted under labels all \"_other\" because their family already had {MAX_SERIES} label sets.\n# TYPE sonde_metric_series_folded_total counter"
        );
        for (info, family) in [
            (&HTTP, &f.http),
            (&MESSAGING, &f.messaging),
            (&STAGES, &f.stages),
        ] {
            let _ = writeln!(
                out,
                "sonde_metric_series_folded_total{{family=\"{}\"}} {}",
                info.key, family.folded
            );
        }
    }
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn render_family(out: &mut String, info: &FamilyInfo, family: &Family) {
    let mut series: Vec<(&Labels, &Red)> = family.series.iter().collect();
    series.sort_by(|a, b| a.0.cmp(b.0));
    let labels = |values: &Labels| -> String {
        info.labels
            .iter()
            .zip(values.split_terminator('\0'))
            .map(|(k, v)| format!("{k}=\"{}\"", escape_label(v)))
            .collect::<Vec<_>>()
            .join(",")
    };
    let name = info.name;
    let _ = writeln!(
        out,
        "# HELP {name}_total {}.\n# TYPE {name}_total counter",
        info.help
    );
    for (l, r) in &series {
        let _ = writeln!(out, "{name}_total{{{}}} {}", labels(l), r.count);
    }
    let _ = writeln!(
        out,
        "# HELP {name}_errors_total Of {name}_total, those whose span is an error.\n# TYPE {name}_errors_total counter"
    );
    for (l, r) in &series {
        let _ = writeln!(out, "{name}_errors_total{{{}}} {}", labels(l), r.errors);
    }
    let _ = writeln!(
        out,
        "# HELP {name}_duration_seconds Duration of {name}_total.\n# TYPE {name}_duration_seconds histogram"
    );
    for (l, r) in &series {
        let l = labels(l);
        let mut cumulative = 0;
        for (i, bound) in BUCKETS.iter().enumerate() {
            cumulative += r.buckets[i];
            let _ = writeln!(
                out,
                "{name}_duration_seconds_bucket{{{l},le=\"{bound}\"}} {cumulative}"
            );
        }
        let _ = writeln!(
            out,
            "{name}_duration_seconds_bucket{{{l},le=\"+Inf\"}} {}",
            r.count
        );
        let _ = writeln!(out, "{name}_duration_seconds_sum{{{l}}} {}", r.sum_seconds);
        let _ = writeln!(out, "{name}_duration_seconds_count{{{l}}} {}", r.count);
    }
}

#[cfg(test)]
mod tests;
