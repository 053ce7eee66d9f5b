//! The terminal forms of a journey and of the summary.

use std::fmt::Write as _;
use std::time::{Duration, UNIX_EPOCH};

use super::journey::{Journey, Summary, ms};

/// `2026-12-01T14:03:07.123Z`.
pub fn timestamp(us: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_micros(us)).to_string()
}

fn ms_text(us: u64) -> String {
    format!("{:.1} ms", ms(us))
}

/// One order's journey, for a person.
pub fn journey(j: &Journey, traces_of_order: usize) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "order {}  trace {}", j.order_id, j.trace_id);
    if traces_of_order > 1 {
        let _ = writeln!(
            o,
            "  WARNING: this order is in {traces_of_order} traces; this is one of them (a link the tracing missed)"
        );
    }
    let _ = writeln!(
        o,
        "  from {} to {}: {}, {} spans",
        timestamp(j.start_us),
        timestamp(j.end_us),
        ms_text(j.end_us.saturating_sub(j.start_us)),
        j.span_count
    );
    let _ = writeln!(o, "  services: {}", j.services.join(" -> "));
    let _ = writeln!(o, "  status: {}", j.status());
    let _ = writeln!(
        o,
        "  stages (start after the first moment, stage, duration, status):"
    );
    let width = j.stages.iter().map(|s| s.name.len()).max().unwrap_or(0);
    for s in &j.stages {
        let mut line = format!(
            "    +{:>10}  {:<width$}  {:>10}  {}",
            ms_text(s.start_us.saturating_sub(j.start_us)),
            s.name,
            ms_text(s.duration_us),
            s.status,
        );
        if let Some(d) = &s.detail {
            let _ = write!(line, " ({d})");
        }
        if let Some(st) = &s.order_status {
            let _ = write!(line, "  order.status={st}");
        }
        let _ = writeln!(o, "{line}");
    }
    if !j.messages.is_empty() {
        let _ = writeln!(o, "  messages:");
        for m in &j.messages {
            let mut line = format!(
                "    +{:>10}  {} {}",
                ms_text(m.start_us.saturating_sub(j.start_us)),
                m.service,
                m.direction
            );
            if let Some(x) = &m.exchange {
                let _ = write!(line, " exchange {x}");
            }
            if let Some(k) = &m.routing_key {
                let _ = write!(line, " routing key {k}");
            }
            if let Some(q) = &m.queue {
                let _ = write!(line, " queue {q}");
            }
            if let Some(w) = m.broker_wait_ms {
                let _ = write!(line, ", waited {w:.1} ms in the broker");
            }
            if m.not_consumed {
                line.push_str(", NOT CONSUMED");
            }
            let _ = writeln!(o, "{line}");
        }
    }
    if !j.uploads.is_empty() {
        let _ = writeln!(o, "  uploads:");
        for u in &j.uploads {
            let mut line = format!(
                "    +{:>10}  {} {} {} in {}",
                ms_text(u.start_us.saturating_sub(j.start_us)),
                u.service,
                u.method,
                u.url,
                ms_text(u.duration_us)
            );
            if let Some(b) = u.bytes {
                let _ = write!(line, ", {b} bytes");
            }
            if let Some(s) = u.status {
                let _ = write!(line, ", HTTP {s}");
            }
            let _ = writeln!(o, "{line}");
        }
    }
    if !j.programs.is_empty() {
        let _ = writeln!(o, "  programs run:");
        for p in &j.programs {
            let mut line = format!(
                "    +{:>10}  {} ran {} in {}",
                ms_text(p.start_us.saturating_sub(j.start_us)),
                p.service,
                p.command_line.as_deref().unwrap_or(&p.name),
                ms_text(p.duration_us)
            );
            if let Some(c) = p.exit_code {
                let _ = write!(line, ", exit code {c}");
            }
            let _ = writeln!(o, "{line}");
        }
    }
    match (&j.failure, &j.stall) {
        (None, None) => {
            let _ = writeln!(o, "  no error, no stall");
        }
        (failure, stall) => {
            if let Some(f) = failure {
                let _ = writeln!(
                    o,
                    "  BROKE at stage {} (+{}): {} {}: {}",
                    f.stage,
                    ms_text(f.at_us.saturating_sub(j.start_us)),
                    f.service,
                    f.operation,
                    f.detail
                );
            }
            if let Some(f) = stall {
                let _ = writeln!(
                    o,
                    "  STALLS at stage {} (+{}): {} {}: {}",
                    f.stage,
                    ms_text(f.at_us.saturating_sub(j.start_us)),
                    f.service,
                    f.operation,
                    f.detail
                );
            }
        }
    }
    o
}

/// The summary across orders, as a table.
pub fn summary(s: &Summary, since: Duration) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "{} orders in the last {}, {} failed or stalled",
        s.orders,
        humantime::format_duration(since),
        s.failed_orders
    );
    let width = s
        .stages
        .iter()
        .map(|x| x.stage.len())
        .chain([s.order.stage.len(), 5])
        .max()
        .unwrap_or(5);
    let _ = writeln!(
        o,
        "{:<width$}  {:>6}  {:>6}  {:>8}  {:>10}  {:>10}  {:>10}",
        "stage", "runs", "failed", "fail %", "p50", "p95", "p99"
    );
    for x in std::iter::once(&s.order).chain(&s.stages) {
        let _ = writeln!(
            o,
            "{:<width$}  {:>6}  {:>6}  {:>7.1}%  {:>7.1} ms  {:>7.1} ms  {:>7.1} ms",
            x.stage,
            x.count,
            x.failed,
            x.failure_rate * 100.0,
            x.p50_ms,
            x.p95_ms,
            x.p99_ms
        );
    }
    o
}
