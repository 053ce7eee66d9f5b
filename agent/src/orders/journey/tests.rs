use serde_json::json;

use super::*;

fn span(
    id: &str,
    parent: Option<&str>,
    service: &str,
    name: &str,
    kind: Kind,
    start_ms: u64,
    dur_ms: u64,
) -> Span {
    Span {
        trace_id: "t1".into(),
        span_id: id.into(),
        parent: parent.map(str::to_owned),
        service: service.into(),
        name: name.into(),
        kind,
        start_us: 1_000_000_000 + start_ms * 1000,
        duration_us: dur_ms * 1000,
        tags: BTreeMap::from([("order.id".to_owned(), json!("o-7"))]),
    }
}

fn with(mut s: Span, key: &str, v: Value) -> Span {
    s.tags.insert(key.to_owned(), v);
    s
}

/// Sets `key` on the span `id` of `spans`.
fn tag(spans: &mut [Span], id: &str, key: &str, v: Value) {
    let s = spans.iter_mut().find(|s| s.span_id == id).expect("span");
    s.tags.insert(key.to_owned(), v);
}

/// curl -> shop (PUT to the store, publish) -> broker -> mes consumer (runs the slicer,
/// reports to the CRM).
fn pipeline() -> Vec<Span> {
    vec![
        span("a", None, "curl", "POST", Kind::Client, 0, 500),
        with(
            span("b", Some("a"), "shop", "POST /orders", Kind::Server, 1, 498),
            "order.status",
            json!("created"),
        ),
        with(
            span("c", Some("b"), "shop", "PUT", Kind::Client, 5, 20),
            "http.request.method",
            json!("PUT"),
        ),
        span(
            "d",
            Some("c"),
            "store",
            "PUT /models/o-7.stl",
            Kind::Server,
            6,
            18,
        ),
        with(
            with(
                span(
                    "e",
                    Some("b"),
                    "shop",
                    "publish orders",
                    Kind::Producer,
                    30,
                    2,
                ),
                "messaging.rabbitmq.destination.routing_key",
                json!("order.created"),
            ),
            "messaging.destination.name",
            json!("orders"),
        ),
        with(
            span(
                "f",
                Some("e"),
                "mes",
                "process orders:order.created:mes",
                Kind::Consumer,
                40,
                400,
            ),
            "messaging.rabbitmq.broker_wait_ms",
            json!(8.5),
        ),
        with(
            span("g", Some("f"), "mes", "CuraEngine", Kind::Internal, 50, 300),
            "process.command_args",
            json!("[\"CuraEngine\",\"slice\"]"),
        ),
        span("h", Some("f"), "mes", "POST", Kind::Client, 360, 30),
        with(
            span(
                "i",
                Some("h"),
                "crm",
                "POST /orders/{id}/status",
                Kind::Server,
                361,
                28,
            ),
            "order.status",
            json!("done"),
        ),
    ]
}

#[test]
fn a_good_journey_has_its_stages_messages_upload_and_program() {
    let j = Journey::new("o-7", "t1", pipeline());
    let s = OrderSummary::of(&j);
    assert_eq!(s.services, ["curl", "shop", "store", "mes", "crm"]);
    assert_eq!(s.spans, 9);
    assert_eq!(s.duration_ms, Some(500.0));
    assert_eq!(s.status, "done");
    assert_eq!(s.failed_stage, None);
    let stages: Vec<&str> = j.stages.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        stages,
        [
            "shop: POST /orders",
            "store: PUT /models/{order.id}.stl",
            "mes: process orders:order.created:mes",
            "mes: CuraEngine",
            "crm: POST /orders/{id}/status"
        ]
    );
    assert_eq!(j.uploads.len(), 1);
    assert_eq!(
        j.programs[0].command_line.as_deref(),
        Some("CuraEngine slice")
    );
    assert_eq!(j.messages.len(), 2);
    assert!(!j.messages[0].not_consumed);
    assert_eq!(j.messages[0].exchange.as_deref(), Some("orders"));
    assert_eq!(j.messages[1].broker_wait_ms, Some(8.5));
}

#[test]
fn the_failure_is_charged_where_it_started_not_to_its_callers() {
    let mut spans = pipeline();
    // The slicer exits 1, the consumer fails, the CRM is told "failed".
    tag(&mut spans, "g", "error", json!(true));
    tag(&mut spans, "f", "error", json!(true));
    tag(&mut spans, "g", "process.exit.code", json!(1));
    tag(&mut spans, "i", "order.status", json!("failed"));
    let j = Journey::new("o-7", "t1", spans);
    let s = OrderSummary::of(&j);
    assert_eq!(s.status, "failed");
    assert_eq!(s.failed_stage.as_deref(), Some("mes: CuraEngine"));
    assert_eq!(j.failure.as_ref().unwrap().detail, "exit code 1");
}

#[test]
fn a_failing_call_is_charged_to_the_stage_it_called() {
    let mut spans = pipeline();
    tag(&mut spans, "h", "error", json!(true));
    tag(&mut spans, "h", "http.response.status_code", json!(503));
    let j = Journey::new("o-7", "t1", spans);
    assert_eq!(j.failed_stage(), Some("crm: POST /orders/{id}/status"));
    assert_eq!(j.failure.as_ref().unwrap().detail, "HTTP 503");
    assert_eq!(j.failure.as_ref().unwrap().service, "mes");
}

#[test]
fn an_order_that_ends_done_did_not_fail_though_a_call_on_its_way_did() {
    let mut spans = pipeline();
    tag(&mut spans, "h", "error", json!(true));
    let j = Journey::new("o-7", "t1", spans.clone());
    assert!(!j.recovered, "the failed call carried the status");
    assert_eq!(j.failed_stage(), Some("crm: POST /orders/{id}/status"));
    // Its retry, after the failed call ended, goes through.
    let end = spans.iter().map(Span::end_us).max().unwrap();
    spans.push(with(
        span(
            "r",
            Some("f"),
            "crm",
            "POST /orders/{id}/status",
            Kind::Server,
            end + 10,
            5,
        ),
        "order.status",
        json!("done"),
    ));
    let j = Journey::new("o-7", "t1", spans);
    assert!(j.recovered);
    assert_eq!(j.status(), "done");
    assert_eq!(j.failed_stage(), None);
    // The error it recovered from is still in its journey.
    assert_eq!(j.failure.as_ref().unwrap().service, "mes");
}

#[test]
fn a_status_that_says_failed_with_no_error_span_is_a_failure() {
    let mut spans = pipeline();
    spans[8].tags.insert("order.status".into(), json!("failed"));
    let j = Journey::new("o-7", "t1", spans);
    assert_eq!(j.status(), "failed");
    assert_eq!(j.failed_stage(), Some("crm: POST /orders/{id}/status"));
}

#[test]
fn a_hanging_span_is_a_stall_until_its_ordinary_span_comes() {
    let mut spans = pipeline();
    spans.retain(|s| !["h", "i"].contains(&s.span_id.as_str()));
    let hang = with(
        with(
            span("h", Some("f"), "mes", "POST", Kind::Client, 360, 2000),
            STALLED,
            json!(true),
        ),
        STALLED_FOR_MS,
        json!(2000),
    );
    let hang_server = with(
        with(
            span(
                "i",
                Some("h"),
                "crm",
                "POST /orders/{id}/status",
                Kind::Server,
                361,
                1999,
            ),
            STALLED,
            json!(true),
        ),
        STALLED_FOR_MS,
        json!(1999),
    );
    spans.push(hang.clone());
    spans.push(hang_server.clone());
    let j = Journey::new("o-7", "t1", spans.clone());
    assert_eq!(j.status(), "created");
    assert_eq!(j.failed_stage(), Some("crm: POST /orders/{id}/status"));
    assert_eq!(
        j.stall.as_ref().unwrap().detail,
        "still running after 1999 ms"
    );
    // The request ends: its ordinary span (another id, same start) replaces the stall.
    let mut done = hang_server;
    done.span_id = "i2".into();
    done.tags.remove(STALLED);
    done.duration_us = 5_000_000;
    spans.push(done);
    let mut client_done = hang;
    client_done.span_id = "h2".into();
    client_done.tags.remove(STALLED);
    spans.push(client_done);
    let j = Journey::new("o-7", "t1", spans);
    assert_eq!(j.failed_stage(), None, "{:?}", j.stall);
    assert_eq!(j.span_count, 11);
}

#[test]
fn a_message_nobody_consumed_is_a_stall() {
    let mut spans = pipeline();
    spans.retain(|s| ["a", "b", "c", "d", "e"].contains(&s.span_id.as_str()));
    let j = Journey::new("o-7", "t1", spans);
    assert_eq!(j.status(), "created");
    assert_eq!(
        j.failed_stage(),
        Some("shop: publish orders (not consumed)")
    );
    assert!(j.messages[0].not_consumed);
}

#[test]
fn no_status_and_no_fault_is_unknown() {
    let spans = vec![span("a", None, "curl", "GET", Kind::Client, 0, 5)];
    let j = Journey::new("o-7", "t1", spans);
    assert_eq!(j.status(), "unknown");
    let e = with(
        span("a", None, "curl", "GET", Kind::Client, 0, 5),
        "error",
        json!(true),
    );
    assert_eq!(Journey::new("o-7", "t1", vec![e]).status(), "error");
}

#[test]
fn the_contract_keys_are_exactly_these() {
    assert_eq!(
        serde_json::to_string(&OrderSummary::missing("o-9")).unwrap(),
        r#"{"order_id":"o-9","trace_id":null,"services":[],"spans":0,"duration_ms":null,"status":"unknown","failed_stage":null}"#
    );
}

#[test]
fn percentiles_are_nearest_rank() {
    let v: Vec<f64> = (1..=100).map(f64::from).collect();
    assert_eq!(percentile(&v, 50.0), 50.0);
    assert_eq!(percentile(&v, 95.0), 95.0);
    assert_eq!(percentile(&v, 99.0), 99.0);
    assert_eq!(percentile(&[3.0], 99.0), 3.0);
    assert_eq!(percentile(&[], 50.0), 0.0);
}

#[test]
fn the_summary_counts_runs_and_failures_per_stage() {
    let ok = Journey::new("o-7", "t1", pipeline());
    let mut spans = pipeline();
    spans[6].tags.insert("error".into(), json!(true));
    // The MES reports the failure (a "done" after the slicer's error would be an order
    // that went through).
    spans[8].tags.insert("order.status".into(), json!("failed"));
    let bad = Journey::new("o-7", "t2", spans);
    let s = Summary::of(&[ok, bad]);
    assert_eq!(s.orders, 2);
    assert_eq!(s.failed_orders, 1);
    let slicer = s
        .stages
        .iter()
        .find(|x| x.stage == "mes: CuraEngine")
        .unwrap();
    assert_eq!(
        (slicer.count, slicer.failed, slicer.failure_rate),
        (2, 1, 0.5)
    );
    assert_eq!(slicer.p50_ms, 300.0);
    assert_eq!(s.order.p99_ms, 500.0);
}

#[test]
fn a_script_is_named_by_its_script_not_its_interpreter() {
    let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(
        program_name("sh", &args(&["/bin/sh", "/srv/slicer.sh", "broken"])),
        "slicer.sh"
    );
    assert_eq!(
        program_name("python3.11", &args(&["python3.11", "-u", "check.py"])),
        "check.py"
    );
    assert_eq!(program_name("sh", &args(&["sh", "-c", "sleep 1"])), "sh");
    assert_eq!(
        program_name("CuraEngine", &args(&["CuraEngine", "slice", "-l", "a.stl"])),
        "CuraEngine"
    );
    let mut spans = pipeline();
    spans[6].name = "sh".into();
    spans[6].tags.insert(
        "process.command_args".into(),
        json!("[\"/bin/sh\",\"/x/slicer.sh\",\"good\"]"),
    );
    let j = Journey::new("o-7", "t1", spans);
    assert!(
        j.stages.iter().any(|s| s.name == "mes: slicer.sh"),
        "{:?}",
        j.stages
    );
}
