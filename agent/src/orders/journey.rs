//! An order's journey, read from the spans of its trace: its stages, the messages it
//! passed through, the files it uploaded and the programs it ran, and where it broke
//! or stalls. Pure functions of the spans, so that they are tested without Jaeger.
//!
//! A *stage* is a unit of work one service did for the order: a span of kind SERVER
//! (a request it served), CONSUMER (a message it processed) or INTERNAL (a program it
//! ran, the slicer say), named `service: operation` (`mes: process orders:order.created`,
//! `crm: POST /orders/{id}`). Clients and producers are the calls between stages; a
//! failing call is charged to the stage it called when that is traced, else to the
//! stage that made it.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Serialize;
use serde_json::Value;

/// `sonde.stalled`: the agent exported the span while its exchange hung.
pub const STALLED: &str = "sonde.stalled";
/// `sonde.stalled.for_ms`: how long it had hung then.
pub const STALLED_FOR_MS: &str = "sonde.stalled.for_ms";
/// Values of `order.status` that say the order failed, though no span is an error
/// (an MES that reports a rejected model with a 200, say).
pub const FAILED_STATUSES: [&str; 5] = ["failed", "failure", "error", "rejected", "cancelled"];
/// Values of `order.status` that say the order went through: one on a span that is not
/// an error, after every error span ended, means those errors (a call that failed and
/// was retried) did not fail it.
pub const DONE_STATUSES: [&str; 7] = [
    "done",
    "completed",
    "complete",
    "delivered",
    "shipped",
    "succeeded",
    "success",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Server,
    Client,
    Producer,
    Consumer,
    Internal,
    Unspecified,
}

impl Kind {
    pub fn parse(s: &str) -> Kind {
        match s {
            "server" => Kind::Server,
            "client" => Kind::Client,
            "producer" => Kind::Producer,
            "consumer" => Kind::Consumer,
            "internal" => Kind::Internal,
            _ => Kind::Unspecified,
        }
    }

    /// Work done by a service for the order, rather than a call between two.
    pub fn is_stage(self) -> bool {
        matches!(self, Kind::Server | Kind::Consumer | Kind::Internal)
    }
}

/// One span as Jaeger's query API gives it, times in microseconds since the epoch.
#[derive(Clone, Debug, Serialize)]
pub struct Span {
    pub trace_id: String,
    pub span_id: String,
    pub parent: Option<String>,
    pub service: String,
    pub name: String,
    pub kind: Kind,
    pub start_us: u64,
    pub duration_us: u64,
    pub tags: BTreeMap<String, Value>,
}

impl Span {
    pub fn end_us(&self) -> u64 {
        self.start_us.saturating_add(self.duration_us)
    }

    pub fn str(&self, key: &str) -> Option<&str> {
        self.tags.get(key).and_then(Value::as_str)
    }

    pub fn int(&self, key: &str) -> Option<i64> {
        match self.tags.get(key)? {
            Value::Number(n) => n.as_i64(),
            Value::String(s) => s.parse().ok(),
            _ => None,
        }
    }

    fn flag(&self, key: &str) -> bool {
        match self.tags.get(key) {
            Some(Value::Bool(b)) => *b,
            Some(Value::String(s)) => s == "true",
            _ => false,
        }
    }

    /// The span's status is an error (Jaeger's `error` tag, or the OTLP status).
    pub fn is_error(&self) -> bool {
        self.flag("error") || self.str("otel.status_code") == Some("ERROR")
    }

    pub fn is_stalled(&self) -> bool {
        self.flag(STALLED)
    }

    /// What went wrong, in a few words: the status description, else the HTTP status
    /// code, the error type or the process exit code.
    pub fn error_text(&self) -> String {
        if let Some(d) = self.str("otel.status_description") {
            return d.to_owned();
        }
        if let Some(code) = self.int("http.response.status_code") {
            return format!("HTTP {code}");
        }
        if let Some(t) = self.str("error.type") {
            return t.to_owned();
        }
        if let Some(code) = self.int("process.exit.code") {
            return format!("exit code {code}");
        }
        "error".to_owned()
    }
}

/// One order's trace, analysed.
#[derive(Clone, Debug, Serialize)]
pub struct Journey {
    pub order_id: String,
    pub trace_id: String,
    /// Services in the order they first appear.
    pub services: Vec<String>,
    /// Spans in the trace, stalled ones included.
    pub span_count: usize,
    pub start_us: u64,
    pub end_us: u64,
    /// The last `order.status` seen: that of the last span to start that carries one
    /// (a request that encloses later ones, the first the order came in with, started
    /// before them).
    pub last_order_status: Option<String>,
    /// It met errors, but a span that is not an error said it went through
    /// ([`DONE_STATUSES`]) after the last of them ended.
    pub recovered: bool,
    pub stages: Vec<Stage>,
    pub messages: Vec<MessageHop>,
    pub uploads: Vec<Transfer>,
    pub programs: Vec<Program>,
    pub failure: Option<Failure>,
    pub stall: Option<Failure>,
    /// Spans of the trace (stalled ones that their ordinary span replaced are left
    /// out), sorted by start: the page draws them.
    pub spans: Vec<Span>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Stage {
    /// `service: operation`, the operation with the order id replaced by `{order.id}`.
    pub name: String,
    pub service: String,
    pub span_id: String,
    pub start_us: u64,
    pub duration_us: u64,
    /// `ok`, `error` or `stalled`.
    pub status: &'static str,
    pub detail: Option<String>,
    pub order_status: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct MessageHop {
    pub service: String,
    /// `publish` or `process`/`receive`, as the span's kind says.
    pub direction: &'static str,
    pub exchange: Option<String>,
    pub routing_key: Option<String>,
    /// The queue it was delivered from, for a consumer.
    pub queue: Option<String>,
    pub start_us: u64,
    pub duration_us: u64,
    pub broker_wait_ms: Option<f64>,
    /// A publish no consumer span followed.
    pub not_consumed: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct Transfer {
    pub service: String,
    pub method: String,
    pub url: String,
    pub bytes: Option<i64>,
    pub start_us: u64,
    pub duration_us: u64,
    pub status: Option<i64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Program {
    pub service: String,
    pub name: String,
    pub command_line: Option<String>,
    pub exit_code: Option<i64>,
    pub start_us: u64,
    pub duration_us: u64,
    pub error: bool,
}

/// Where an order broke or stalls.
#[derive(Clone, Debug, Serialize)]
pub struct Failure {
    /// The stage charged with it (see the module comment).
    pub stage: String,
    /// The span where it showed first: its service and operation.
    pub service: String,
    pub operation: String,
    pub span_id: String,
    pub detail: String,
    pub at_us: u64,
}

/// Interpreters whose program is the script they run.
const INTERPRETERS: [&str; 10] = [
    "sh", "bash", "dash", "zsh", "python", "python3", "node", "perl", "ruby", "php",
];

/// A program's name for a person: the agent names a program by its executable, so a
/// script run by an interpreter (`/bin/sh slice.sh`, `python3 check.py`) is named by
/// its script instead. `sh -c '...'` keeps the interpreter's name.
pub fn program_name(name: &str, args: &[String]) -> String {
    let interpreter = INTERPRETERS.contains(&name)
        || (name.starts_with("python3.") && name[8..].chars().all(|c| c.is_ascii_digit()));
    if !interpreter || args.iter().skip(1).any(|a| a == "-c" || a == "-e") {
        return name.to_owned();
    }
    match args.iter().skip(1).find(|a| !a.starts_with('-')) {
        Some(script) => script.rsplit('/').next().unwrap_or(script).to_owned(),
        None => name.to_owned(),
    }
}

/// `operation` with `order_id` replaced by `{order.id}`, so that stage names stay the
/// same from one order to the next (an S3 key named after the order, say).
pub fn stage_name(service: &str, operation: &str, order_id: &str) -> String {
    let operation = if order_id.is_empty() {
        operation.to_owned()
    } else {
        operation.replace(order_id, "{order.id}")
    };
    format!("{service}: {operation}")
}

/// A stalled span whose ordinary span came later (the request hung, then ended): the
/// ordinary span tells the whole story, the stalled one is left out.
fn superseded_stalls(spans: &[Span]) -> HashSet<String> {
    let ordinary: HashSet<(&str, &str, Option<&str>, u64)> = spans
        .iter()
        .filter(|s| !s.is_stalled())
        .map(|s| {
            (
                s.service.as_str(),
                s.name.as_str(),
                s.parent.as_deref(),
                s.start_us / 1000,
            )
        })
        .collect();
    spans
        .iter()
        .filter(|s| s.is_stalled())
        .filter(|s| {
            let key = (s.service.as_str(), s.name.as_str(), s.parent.as_deref());
            // Starts are compared to the millisecond, either side of a boundary.
            let ms = s.start_us / 1000;
            [ms.saturating_sub(1), ms, ms + 1]
                .iter()
                .any(|m| ordinary.contains(&(key.0, key.1, key.2, *m)))
        })
        .map(|s| s.span_id.clone())
        .collect()
}

impl Journey {
    /// The journey of `order_id` from the spans of one trace (any order).
    pub fn new(order_id: &str, trace_id: &str, mut all: Vec<Span>) -> Journey {
        for s in all.iter_mut().filter(|s| s.kind == Kind::Internal) {
            let args = s
                .tags
                .get("process.command_args")
                .map(command_args)
                .unwrap_or_default();
            s.name = program_name(&s.name, &args);
        }
        all.sort_by(|a, b| {
            (a.start_us, a.end_us(), &a.span_id).cmp(&(b.start_us, b.end_us(), &b.span_id))
        });
        let span_count = all.len();
        let gone = superseded_stalls(&all);
        let spans: Vec<Span> = all
            .into_iter()
            .filter(|s| !gone.contains(&s.span_id))
            .collect();
        let start_us = spans.iter().map(|s| s.start_us).min().unwrap_or(0);
        let end_us = spans.iter().map(Span::end_us).max().unwrap_or(0);
        let mut services: Vec<String> = Vec::new();
        for s in &spans {
            if !services.contains(&s.service) {
                services.push(s.service.clone());
            }
        }
        let by_id: HashMap<&str, &Span> = spans.iter().map(|s| (s.span_id.as_str(), s)).collect();
        let mut children: HashMap<&str, Vec<&Span>> = HashMap::new();
        for s in &spans {
            if let Some(p) = s.parent.as_deref() {
                children.entry(p).or_default().push(s);
            }
        }
        let last_order_status = spans
            .iter()
            .filter(|s| s.str("order.status").is_some())
            .max_by_key(|s| (s.start_us, s.end_us()))
            .and_then(|s| s.str("order.status"))
            .map(str::to_owned);

        let stage_of = |s: &Span| -> String {
            // A call charges the stage it called when that is traced, else its caller.
            let mut at = s;
            if !at.kind.is_stage() {
                if let Some(callee) = children
                    .get(at.span_id.as_str())
                    .and_then(|c| c.iter().find(|c| c.kind.is_stage()))
                {
                    return stage_name(&callee.service, &callee.name, order_id);
                }
                while !at.kind.is_stage() {
                    match at.parent.as_deref().and_then(|p| by_id.get(p)) {
                        Some(p) => at = p,
                        None => break,
                    }
                }
            }
            stage_name(&at.service, &at.name, order_id)
        };
        let failure_at = |s: &Span, detail: String| Failure {
            stage: stage_of(s),
            service: s.service.clone(),
            operation: s.name.clone(),
            span_id: s.span_id.clone(),
            detail,
            at_us: s.start_us,
        };

        // Where it broke: the error spans none of whose children is an error (the
        // origin, not the callers it propagated to), the first to end.
        let failure = spans
            .iter()
            .filter(|s| s.is_error() && !s.is_stalled())
            .filter(|s| {
                !children
                    .get(s.span_id.as_str())
                    .is_some_and(|c| c.iter().any(|c| c.is_error() && !c.is_stalled()))
            })
            .min_by_key(|s| (s.end_us(), s.start_us))
            .map(|s| failure_at(s, s.error_text()))
            .or_else(|| {
                // No error span, but the order says it failed: the first span with
                // that status.
                let failed = last_order_status
                    .as_deref()
                    .filter(|st| FAILED_STATUSES.contains(&st.to_ascii_lowercase().as_str()))?;
                spans
                    .iter()
                    .filter(|s| s.str("order.status") == Some(failed))
                    .min_by_key(|s| s.end_us())
                    .map(|s| failure_at(s, format!("order.status {failed}")))
            });

        let last_error_end = spans
            .iter()
            .filter(|s| s.is_error() && !s.is_stalled())
            .map(Span::end_us)
            .max();
        let recovered = last_error_end.is_some_and(|end| {
            spans.iter().any(|s| {
                !s.is_error()
                    && s.start_us >= end
                    && s.str("order.status")
                        .is_some_and(|st| DONE_STATUSES.iter().any(|d| d.eq_ignore_ascii_case(st)))
            })
        });

        // Where it stalls: a span still hanging; the last of them to start, as a caller
        // waits on its callee, which started after it. (A stalled span's children name
        // its ordinary span as parent, which is not there yet: depth cannot be read.)
        let stall = spans
            .iter()
            .filter(|s| s.is_stalled())
            .max_by_key(|s| (s.start_us, s.kind == Kind::Server))
            .map(|s| {
                let ms = s.int(STALLED_FOR_MS).unwrap_or(0);
                failure_at(s, format!("still running after {ms} ms"))
            })
            .or_else(|| {
                spans
                    .iter()
                    .filter(|s| s.kind == Kind::Producer && !consumed(s, &children))
                    .min_by_key(|s| s.start_us)
                    .map(|s| Failure {
                        stage: format!(
                            "{} (not consumed)",
                            stage_name(&s.service, &s.name, order_id)
                        ),
                        service: s.service.clone(),
                        operation: s.name.clone(),
                        span_id: s.span_id.clone(),
                        detail: "published, no consumer took the message".to_owned(),
                        at_us: s.end_us(),
                    })
            });

        let stages = spans
            .iter()
            .filter(|s| s.kind.is_stage())
            .map(|s| Stage {
                name: stage_name(&s.service, &s.name, order_id),
                service: s.service.clone(),
                span_id: s.span_id.clone(),
                start_us: s.start_us,
                duration_us: s.duration_us,
                status: if s.is_stalled() {
                    "stalled"
                } else if s.is_error() {
                    "error"
                } else {
                    "ok"
                },
                detail: if s.is_stalled() {
                    Some(format!(
                        "stalled for {} ms",
                        s.int(STALLED_FOR_MS).unwrap_or(0)
                    ))
                } else if s.is_error() {
                    Some(s.error_text())
                } else {
                    None
                },
                order_status: s.str("order.status").map(str::to_owned),
            })
            .collect();
        let messages = spans
            .iter()
            .filter(|s| matches!(s.kind, Kind::Producer | Kind::Consumer))
            .map(|s| MessageHop {
                service: s.service.clone(),
                direction: if s.kind == Kind::Producer {
                    "publish"
                } else {
                    "consume"
                },
                exchange: s
                    .str("messaging.rabbitmq.exchange")
                    .or_else(|| {
                        (s.kind == Kind::Producer)
                            .then(|| s.str("messaging.destination.name"))
                            .flatten()
                    })
                    .map(str::to_owned),
                routing_key: s
                    .str("messaging.rabbitmq.destination.routing_key")
                    .map(str::to_owned),
                queue: (s.kind == Kind::Consumer)
                    .then(|| {
                        s.str("messaging.destination.subscription.name")
                            .or_else(|| s.str("messaging.destination.name"))
                    })
                    .flatten()
                    .map(str::to_owned),
                start_us: s.start_us,
                duration_us: s.duration_us,
                broker_wait_ms: s
                    .tags
                    .get("messaging.rabbitmq.broker_wait_ms")
                    .and_then(Value::as_f64),
                not_consumed: s.kind == Kind::Producer && !consumed(s, &children),
            })
            .collect();
        let uploads = spans
            .iter()
            .filter(|s| s.kind == Kind::Client && s.str("http.request.method") == Some("PUT"))
            .map(|s| Transfer {
                service: s.service.clone(),
                method: "PUT".to_owned(),
                url: s
                    .str("url.full")
                    .or_else(|| s.str("url.path"))
                    .unwrap_or(&s.name)
                    .to_owned(),
                bytes: s.int("http.request.body.size"),
                start_us: s.start_us,
                duration_us: s.duration_us,
                status: s.int("http.response.status_code"),
            })
            .collect();
        let programs = spans
            .iter()
            .filter(|s| s.kind == Kind::Internal)
            .map(|s| Program {
                service: s.service.clone(),
                name: s.name.clone(),
                command_line: s.tags.get("process.command_args").map(command_line),
                exit_code: s.int("process.exit.code"),
                start_us: s.start_us,
                duration_us: s.duration_us,
                error: s.is_error(),
            })
            .collect();
        Journey {
            order_id: order_id.to_owned(),
            trace_id: trace_id.to_owned(),
            services,
            span_count,
            start_us,
            end_us,
            last_order_status,
            recovered,
            stages,
            messages,
            uploads,
            programs,
            failure,
            stall,
            spans,
        }
    }

    pub fn duration_ms(&self) -> f64 {
        ms(self.end_us.saturating_sub(self.start_us))
    }

    /// The final `order.status`, else `error` when a span failed, `stalled` when one
    /// stalls, `unknown` otherwise.
    pub fn status(&self) -> String {
        if let Some(s) = &self.last_order_status {
            return s.clone();
        }
        if self.failure.is_some() {
            "error".to_owned()
        } else if self.stall.is_some() {
            "stalled".to_owned()
        } else {
            "unknown".to_owned()
        }
    }

    /// The stage where it failed, else where it stalls; `None` when it went through
    /// (`recovered`), whatever errors it met on the way.
    pub fn failed_stage(&self) -> Option<&str> {
        if self.recovered {
            return None;
        }
        self.failure
            .as_ref()
            .or(self.stall.as_ref())
            .map(|f| f.stage.as_str())
    }
}

/// A publish whose message some consumer span (or a broker span that delivered it)
/// follows.
fn consumed(publish: &Span, children: &HashMap<&str, Vec<&Span>>) -> bool {
    let mut stack = vec![publish];
    while let Some(s) = stack.pop() {
        for c in children.get(s.span_id.as_str()).into_iter().flatten() {
            if c.kind == Kind::Consumer {
                return true;
            }
            // The broker's own span (kind SERVER) sits between publish and delivery.
            if c.kind == Kind::Server && c.str("messaging.system").is_some() {
                stack.push(c);
            }
        }
    }
    false
}

/// `process.command_args` as Jaeger stores a string array: a JSON list in a string.
fn command_args(v: &Value) -> Vec<String> {
    let parsed = match v {
        Value::String(s) => serde_json::from_str::<Value>(s).unwrap_or(Value::Null),
        v => v.clone(),
    };
    match parsed {
        Value::Array(items) => items
            .iter()
            .map(|i| {
                i.as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| i.to_string())
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// The same, as one line.
fn command_line(v: &Value) -> String {
    let parsed;
    let v = match v {
        Value::String(s) => match serde_json::from_str::<Value>(s) {
            Ok(p) => {
                parsed = p;
                &parsed
            }
            Err(_) => return s.clone(),
        },
        v => v,
    };
    match v {
        Value::Array(items) => items
            .iter()
            .map(|i| {
                i.as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| i.to_string())
            })
            .collect::<Vec<_>>()
            .join(" "),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

pub fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// The report line of an order, the CONTRACT of `sonde orders --json` (and of
/// `cargo xtask demo --summary`): these keys and no others.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct OrderSummary {
    pub order_id: String,
    pub trace_id: Option<String>,
    pub services: Vec<String>,
    pub spans: usize,
    pub duration_ms: Option<f64>,
    pub status: String,
    pub failed_stage: Option<String>,
}

impl OrderSummary {
    pub fn of(j: &Journey) -> OrderSummary {
        OrderSummary {
            order_id: j.order_id.clone(),
            trace_id: Some(j.trace_id.clone()),
            services: j.services.clone(),
            spans: j.span_count,
            duration_ms: Some(j.duration_ms()),
            status: j.status(),
            failed_stage: j.failed_stage().map(str::to_owned),
        }
    }

    /// An order Jaeger has no trace of.
    pub fn missing(order_id: &str) -> OrderSummary {
        OrderSummary {
            order_id: order_id.to_owned(),
            trace_id: None,
            services: Vec::new(),
            spans: 0,
            duration_ms: None,
            status: "unknown".to_owned(),
            failed_stage: None,
        }
    }
}

/// Per-stage figures across orders.
#[derive(Clone, Debug, Serialize)]
pub struct StageStats {
    pub stage: String,
    /// Times the stage ran (an order can run one more than once).
    pub count: usize,
    /// Of those, how many failed (error) or stall.
    pub failed: usize,
    pub failure_rate: f64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub orders: usize,
    /// Orders whose journey failed or stalls.
    pub failed_orders: usize,
    /// End to end, per order.
    pub order: StageStats,
    pub stages: Vec<StageStats>,
}

/// The nearest-rank percentile of sorted values.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn stats(stage: String, mut durations_ms: Vec<f64>, failed: usize) -> StageStats {
    durations_ms.sort_by(f64::total_cmp);
    let count = durations_ms.len();
    StageStats {
        stage,
        count,
        failed,
        failure_rate: if count == 0 {
            0.0
        } else {
            failed as f64 / count as f64
        },
        p50_ms: percentile(&durations_ms, 50.0),
        p95_ms: percentile(&durations_ms, 95.0),
        p99_ms: percentile(&durations_ms, 99.0),
    }
}

impl Summary {
    pub fn of(journeys: &[Journey]) -> Summary {
        let mut per: BTreeMap<&str, (Vec<f64>, usize)> = BTreeMap::new();
        for j in journeys {
            for s in &j.stages {
                let e = per.entry(s.name.as_str()).or_default();
                e.0.push(ms(s.duration_us));
                if s.status != "ok" {
                    e.1 += 1;
                }
            }
        }
        let failed_orders = journeys
            .iter()
            .filter(|j| j.failed_stage().is_some())
            .count();
        Summary {
            orders: journeys.len(),
            failed_orders,
            order: stats(
                "order (end to end)".to_owned(),
                journeys.iter().map(Journey::duration_ms).collect(),
                failed_orders,
            ),
            stages: per
                .into_iter()
                .map(|(name, (d, f))| stats(name.to_owned(), d, f))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests;
