//! One line per span for a person at a terminal: what happened first (time, kind,
//! service, name, status, duration), then the ids to look the trace up by, then the
//! attributes.
//!
//! ```text
//! 2026-11-24T19:30:01.123Z SERVER shop-api[1234] GET /orders/{id} 200 12.3ms trace=… span=… parent=… http.request.method=GET url.path=/orders/42
//! ```
//!
//! The status is the HTTP status code when the span has one, then `ERROR` when the
//! span failed (its message follows the ids as `status.message=`), or `-` when there
//! is nothing to say. A root span has no `parent=`. Resource attributes other than the
//! service and pid are left out: they repeat on every line.

use std::fmt::Write as _;

use opentelemetry_semantic_conventions::attribute::HTTP_RESPONSE_STATUS_CODE;

use crate::spans::{Span, SpanKind, Status, Value, hex};

/// The line for `span`, without a newline.
pub fn format_line(span: &Span) -> String {
    let mut line = String::with_capacity(256);
    let kind = match span.kind {
        SpanKind::Internal => "INTERNAL",
        SpanKind::Server => "SERVER",
        SpanKind::Client => "CLIENT",
        SpanKind::Producer => "PRODUCER",
        SpanKind::Consumer => "CONSUMER",
    };
    let _ = write!(
        line,
        "{} {kind} {}[{}] {}",
        rfc3339_millis(span.start_unix_nanos),
        escaped(&span.resource.service_name),
        span.resource.pid,
        escaped(&span.name),
    );

    let code = span.attribute(HTTP_RESPONSE_STATUS_CODE);
    match (code, &span.status) {
        (Some(code), Status::Error(_)) => {
            let _ = write!(line, " {} ERROR", plain(code));
        }
        (Some(code), _) => {
            let _ = write!(line, " {}", plain(code));
        }
        (None, Status::Error(_)) => line.push_str(" ERROR"),
        (None, _) => line.push_str(" -"),
    }
    let _ = write!(
        line,
        " {} trace={} span={}",
        duration(span.end_unix_nanos.saturating_sub(span.start_unix_nanos)),
        hex(&span.trace_id),
        hex(&span.span_id),
    );
    if let Some(parent) = &span.parent_span_id {
        let _ = write!(line, " parent={}", hex(parent));
    }
    if let Status::Error(message) = &span.status
        && !message.is_empty()
    {
        let _ = write!(line, " status.message={}", quoted_if_needed(message));
    }
    for attribute in &span.attributes {
        let _ = write!(line, " {}={}", attribute.key, plain(&attribute.value));
    }
    line
}

/// A value as a person would type it: strings bare unless they would break the line
/// into misleading `key=value` pieces.
fn plain(value: &Value) -> String {
    match value {
        Value::Str(s) => quoted_if_needed(s),
        Value::StrArray(items) => {
            let items: Vec<String> = items
                .iter()
                .map(|s| {
                    if s.contains([',', '[', ']']) {
                        format!("{s:?}")
                    } else {
                        quoted_if_needed(s)
                    }
                })
                .collect();
            format!("[{}]", items.join(","))
        }
        other => other.to_string(),
    }
}

fn quoted_if_needed(s: &str) -> String {
    let needs_quotes = s.is_empty()
        || s.chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '"' || c == '=');
    if needs_quotes {
        format!("{s:?}")
    } else {
        s.to_owned()
    }
}

/// Names print bare, spaces and all, but a control character (a newline from a
/// hostile request, say) must not forge a second line.
fn escaped(s: &str) -> std::borrow::Cow<'_, str> {
    if s.chars().any(char::is_control) {
        let quoted = format!("{s:?}");
        quoted[1..quoted.len() - 1].to_owned().into()
    } else {
        s.into()
    }
}

/// `12.3ms`, `850.0µs`, `1.25s`: three significant-ish digits, unit that fits.
fn duration(nanos: u64) -> String {
    match nanos {
        n if n < 1_000 => format!("{n}ns"),
        n if n < 1_000_000 => format!("{:.1}µs", n as f64 / 1e3),
        n if n < 1_000_000_000 => format!("{:.1}ms", n as f64 / 1e6),
        n => format!("{:.2}s", n as f64 / 1e9),
    }
}

/// `2026-11-24T19:30:01.123Z` from nanoseconds since the Unix epoch, UTC.
///
/// Written out rather than pulling a date crate in for one format: the civil-date
/// conversion is the standard days-to-(year, month, day) arithmetic on the proleptic
/// Gregorian calendar, valid for every u64 nanosecond timestamp.
fn rfc3339_millis(unix_nanos: u64) -> String {
    let secs = unix_nanos / 1_000_000_000;
    let millis = (unix_nanos % 1_000_000_000) / 1_000_000;
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// (year, month 1-12, day 1-31) of the day `days` after 1970-01-01.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    // Shift the epoch to 0000-03-01 so leap days fall at the end of each year, then
    // count 400-year eras (146,097 days each).
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::spans::{KeyValue, Resource};

    fn span() -> Span {
        Span {
            trace_id: [0x4b; 16],
            span_id: [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7],
            parent_span_id: Some([0x11; 8]),
            name: "GET /orders/{id}".to_owned(),
            kind: SpanKind::Server,
            // 2026-11-24T19:30:01.123456789Z
            start_unix_nanos: 1_795_548_601_123_456_789,
            end_unix_nanos: 1_795_548_601_123_456_789 + 12_345_678,
            attributes: vec![
                KeyValue::new("http.request.method", "GET"),
                KeyValue::new("url.path", "/orders/42"),
                KeyValue::new(HTTP_RESPONSE_STATUS_CODE, 200u16),
                KeyValue::new("user_agent.original", "curl/8.5.0 (x86_64)"),
            ],
            status: Status::Unset,
            resource: Arc::new(Resource {
                service_name: "shop-api".to_owned(),
                pid: 1234,
                executable_name: "python3".to_owned(),
                host_name: "node-1".to_owned(),
                attributes: vec![],
                generic_name: false,
            }),
        }
    }

    #[test]
    fn server_span_reads_left_to_right() {
        assert_eq!(
            format_line(&span()),
            "2026-11-24T19:30:01.123Z SERVER shop-api[1234] GET /orders/{id} 200 12.3ms \
             trace=4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b span=00f067aa0ba902b7 parent=1111111111111111 \
             http.request.method=GET url.path=/orders/42 http.response.status_code=200 \
             user_agent.original=\"curl/8.5.0 (x86_64)\""
        );
    }

    #[test]
    fn failed_root_span_says_error_and_why() {
        let mut s = span();
        s.parent_span_id = None;
        s.kind = SpanKind::Client;
        s.attributes
            .retain(|kv| kv.key != HTTP_RESPONSE_STATUS_CODE);
        s.status = Status::Error("connection reset".to_owned());
        let line = format_line(&s);
        assert!(
            line.starts_with(
                "2026-11-24T19:30:01.123Z CLIENT shop-api[1234] GET /orders/{id} ERROR 12.3ms "
            ),
            "{line}"
        );
        assert!(!line.contains("parent="), "{line}");
        assert!(
            line.contains(" status.message=\"connection reset\""),
            "{line}"
        );
    }

    #[test]
    fn span_without_status_code_shows_a_dash() {
        let mut s = span();
        s.kind = SpanKind::Producer;
        s.name = "order.created publish".to_owned();
        s.attributes.clear();
        let line = format_line(&s);
        assert!(
            line.contains(" PRODUCER shop-api[1234] order.created publish - 12.3ms "),
            "{line}"
        );
    }

    #[test]
    fn string_arrays_print_as_one_bracketed_value() {
        let mut s = span();
        s.attributes = vec![KeyValue::new(
            "messaging.rabbitmq.queues",
            vec!["crm".to_owned(), "a,b".to_owned(), "with space".to_owned()],
        )];
        let line = format_line(&s);
        assert!(
            line.ends_with(r#" messaging.rabbitmq.queues=[crm,"a,b","with space"]"#),
            "{line}"
        );
    }

    #[test]
    fn control_characters_cannot_forge_a_line() {
        let mut s = span();
        s.name = "GET /x\n2026-01-01T00:00:00.000Z SERVER fake[1] GET /".to_owned();
        let line = format_line(&s);
        assert_eq!(line.lines().count(), 1, "{line}");
        assert!(line.contains("GET /x\\n2026"), "{line}");
    }

    #[test]
    fn durations_pick_a_readable_unit() {
        assert_eq!(duration(999), "999ns");
        assert_eq!(duration(850_000), "850.0µs");
        assert_eq!(duration(12_345_678), "12.3ms");
        assert_eq!(duration(1_250_000_000), "1.25s");
    }

    #[test]
    fn dates_convert_across_leap_years_and_centuries() {
        assert_eq!(rfc3339_millis(0), "1970-01-01T00:00:00.000Z");
        // 2000-02-29T23:59:59.999Z: a leap day in a year divisible by 400.
        assert_eq!(
            rfc3339_millis(951_868_799_999_000_000),
            "2000-02-29T23:59:59.999Z"
        );
        assert_eq!(
            rfc3339_millis(951_868_800_000_000_000),
            "2000-03-01T00:00:00.000Z"
        );
        // 2100-03-01: 2100 is not a leap year.
        assert_eq!(
            rfc3339_millis(4_107_542_400_000_000_000),
            "2100-03-01T00:00:00.000Z"
        );
        assert_eq!(
            rfc3339_millis(1_735_689_599_000_000_000),
            "2024-12-31T23:59:59.000Z"
        );
    }
}
