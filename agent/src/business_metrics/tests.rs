use std::sync::Arc;

use super::*;
use crate::spans::{KeyValue, Resource};

fn span(
    service: &str,
    kind: SpanKind,
    name: &str,
    ms: u64,
    attrs: Vec<KeyValue>,
    error: bool,
) -> Span {
    Span {
        trace_id: [1; 16],
        span_id: [2; 8],
        parent_span_id: None,
        name: name.to_owned(),
        kind,
        start_unix_nanos: 1_000_000_000,
        end_unix_nanos: 1_000_000_000 + ms * 1_000_000,
        attributes: attrs,
        status: if error {
            Status::Error("boom".into())
        } else {
            Status::Unset
        },
        resource: Arc::new(Resource {
            service_name: service.to_owned(),
            pid: 1,
            executable_name: "x".into(),
            host_name: "h".into(),
            attributes: vec![],
            generic_name: false,
        }),
    }
}

fn http(
    service: &str,
    path: &str,
    route: Option<&str>,
    order: Option<&str>,
    ms: u64,
    error: bool,
) -> Span {
    let mut attrs = vec![
        KeyValue::new(semconv::HTTP_REQUEST_METHOD, "POST"),
        KeyValue::new(semconv::URL_PATH, path),
    ];
    if let Some(r) = route {
        attrs.push(KeyValue::new(semconv::HTTP_ROUTE, r));
    }
    if let Some(o) = order {
        attrs.push(KeyValue::new("order.id", o));
    }
    span(
        service,
        SpanKind::Server,
        &format!("POST {}", route.unwrap_or(path)),
        ms,
        attrs,
        error,
    )
}

fn rendered(m: &BusinessMetrics) -> String {
    let mut s = String::new();
    m.render(&mut s);
    s
}

#[test]
fn requests_errors_and_durations_per_service_and_route() {
    let m = BusinessMetrics::default();
    m.observe(&http(
        "shop",
        "/orders/17",
        Some("/orders/{id}"),
        Some("17"),
        20,
        false,
    ));
    m.observe(&http(
        "shop",
        "/orders/18",
        Some("/orders/{id}"),
        Some("18"),
        300,
        true,
    ));
    let s = rendered(&m);
    let l = r#"service="shop",kind="server",method="POST",route="/orders/{id}""#;
    assert!(s.contains(&format!("sonde_http_total{{{l}}} 2\n")), "{s}");
    assert!(
        s.contains(&format!("sonde_http_errors_total{{{l}}} 1\n")),
        "{s}"
    );
    assert!(
        s.contains(&format!(
            "sonde_http_duration_seconds_bucket{{{l},le=\"0.025\"}} 1\n"
        )),
        "{s}"
    );
    assert!(
        s.contains(&format!(
            "sonde_http_duration_seconds_bucket{{{l},le=\"0.5\"}} 2\n"
        )),
        "{s}"
    );
    assert!(
        s.contains(&format!("sonde_http_duration_seconds_count{{{l}}} 2\n")),
        "{s}"
    );
    // Both were order stages too.
    assert!(
        s.contains(r#"sonde_order_stage_total{service="shop",stage="POST /orders/{id}"} 2"#),
        "{s}"
    );
    assert!(
        s.contains(r#"sonde_order_stage_errors_total{service="shop",stage="POST /orders/{id}"} 1"#),
        "{s}"
    );
}

#[test]
fn no_raw_id_becomes_a_label_value() {
    let m = BusinessMetrics::default();
    // No http.route: the path is templated; the order id in a file name is folded.
    m.observe(&http(
        "store",
        "/models/ORD-123456.stl",
        None,
        Some("ORD-123456"),
        5,
        false,
    ));
    m.observe(&http(
        "store",
        "/models/o-7.stl",
        None,
        Some("o-7"),
        5,
        false,
    ));
    let s = rendered(&m);
    assert!(s.contains(r#"route="/models/{id}""#), "{s}");
    assert!(s.contains(r#"route="/models/{order.id}.stl""#), "{s}");
    assert!(!s.contains("123456") && !s.contains("o-7"), "{s}");
    let pubs = span(
        "mes",
        SpanKind::Producer,
        "publish orders:order.o-7.status",
        1,
        vec![
            KeyValue::new(semconv::MESSAGING_SYSTEM, "rabbitmq"),
            KeyValue::new(
                semconv::MESSAGING_DESTINATION_NAME,
                "orders:order.o-7.status",
            ),
            KeyValue::new("order.id", "o-7"),
        ],
        false,
    );
    m.observe(&pubs);
    let anon = span(
        "shop",
        SpanKind::Consumer,
        "deliver x",
        1,
        vec![
            KeyValue::new(semconv::MESSAGING_SYSTEM, "rabbitmq"),
            KeyValue::new(
                semconv::MESSAGING_DESTINATION_NAME,
                "events:e.12345:amq.gen-JzTY20BRgKO-HjmUJj0wLg",
            ),
        ],
        false,
    );
    m.observe(&anon);
    let s = rendered(&m);
    assert!(s.contains(r#"sonde_messaging_total{service="mes",operation="publish",destination="orders:order.{order.id}.status"} 1"#), "{s}");
    assert!(s.contains(r#"sonde_messaging_total{service="shop",operation="process",destination="events:e.{id}:{id}"} 1"#), "{s}");
}

#[test]
fn label_sets_are_capped_and_the_rest_is_counted() {
    let m = BusinessMetrics::default();
    for i in 0..MAX_SERIES + 10 {
        m.observe(&http(
            "shop",
            "/x",
            Some(&format!("/r{}", "a".repeat(i % 40) + &"b".repeat(i / 40))),
            None,
            1,
            false,
        ));
    }
    let s = rendered(&m);
    let series = s
        .lines()
        .filter(|l| l.starts_with("sonde_http_total{"))
        .count();
    assert_eq!(series, MAX_SERIES + 1, "{s}");
    assert!(
        s.contains(
            r#"sonde_http_total{service="_other",kind="_other",method="_other",route="_other"} 10"#
        ),
        "{s}"
    );
    assert!(
        s.contains(r#"sonde_metric_series_folded_total{family="http"} 10"#),
        "{s}"
    );
}

#[test]
fn stalled_spans_are_left_out_and_programs_are_stages() {
    let m = BusinessMetrics::default();
    let mut hang = http("crm", "/slow", Some("/slow"), Some("o-1"), 2000, false);
    hang.attributes
        .push(KeyValue::new(crate::context::trace::STALLED, true));
    m.observe(&hang);
    let slicer = span(
        "mes",
        SpanKind::Internal,
        "CuraEngine",
        1500,
        vec![KeyValue::new("order.id", "o-1")],
        true,
    );
    m.observe(&slicer);
    let s = rendered(&m);
    assert!(!s.contains("/slow"), "{s}");
    assert!(
        s.contains(r#"sonde_order_stage_errors_total{service="mes",stage="CuraEngine"} 1"#),
        "{s}"
    );
    assert!(s.contains(r#"sonde_order_stage_duration_seconds_bucket{service="mes",stage="CuraEngine",le="1"} 0"#), "{s}");
    assert!(s.contains(r#"sonde_order_stage_duration_seconds_bucket{service="mes",stage="CuraEngine",le="2.5"} 1"#), "{s}");
}
