use std::{sync::Arc, time::Duration};

use super::*;
use crate::{
    spans::{KeyValue, new_span_id, new_trace_id, test_span},
    telemetry::Metrics,
};

const S: u64 = 1_000_000_000;

fn sampler(config: SamplingConfig) -> (Sampler, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::default());
    let s = Sampler::new(
        &config,
        Some(Duration::from_secs(30)),
        1000,
        metrics.clone(),
    );
    (s, metrics)
}

fn ratio(r: f64) -> SamplingConfig {
    SamplingConfig {
        ratio: r,
        ..SamplingConfig::default()
    }
}

fn order_span(order: &str, trace: TraceId, start: u64, end: u64) -> Span {
    let mut s = test_span(trace, new_span_id(), start, end);
    s.attributes.push(KeyValue::new(ORDER_ID, order.to_owned()));
    s
}

/// Order ids the ratio keeps and drops at `r`.
fn kept_and_dropped(r: f64) -> (String, String) {
    let t = threshold(r);
    let kept = (0..)
        .map(|i| format!("ORD-{i}"))
        .find(|id| order_value(id) < t);
    let dropped = (0..)
        .map(|i| format!("ORD-{i}"))
        .find(|id| order_value(id) >= t);
    (kept.unwrap(), dropped.unwrap())
}

#[test]
fn the_hash_of_order_ids_spreads_evenly_and_is_fixed() {
    // Fixed values: every agent version must decide the same orders the same way.
    assert_eq!(order_value("ORD-1"), order_value("ORD-1"));
    assert_ne!(order_value("ORD-1"), order_value("ORD-2"));
    assert!(order_value("ORD-1") < 1 << 56);
    let t = threshold(0.1);
    let n = 100_000;
    let kept = (0..n)
        .filter(|i| order_value(&format!("order-{i}")) < t)
        .count();
    // Binomial(100000, 0.1): sd about 95; 5 sd either side.
    assert!((9_525..=10_475).contains(&kept), "{kept}");
}

#[test]
fn the_trace_id_decides_by_its_random_part() {
    let mut low = [0xffu8; 16];
    low[9..].fill(0);
    let mut high = [0u8; 16];
    high[9..].fill(0xff);
    assert_eq!(trace_value(&low), 0);
    assert_eq!(trace_value(&high), (1 << 56) - 1);
    assert!(trace_value(&low) < threshold(0.01));
    assert!(trace_value(&high) >= threshold(0.99));
    assert!(trace_value(&high) < threshold(1.0));
}

#[test]
fn every_span_of_an_order_follows_the_order_across_traces() {
    let (keep, drop) = kept_and_dropped(0.5);
    let (mut s, metrics) = sampler(ratio(0.5));
    let mut out = Vec::new();
    for _ in 0..3 {
        let trace = new_trace_id();
        s.push(order_span(&keep, trace, 10, 20), S, &mut out);
        s.push(order_span(&drop, trace, 10, 20), S, &mut out);
    }
    assert_eq!(out.len(), 3);
    assert!(
        out.iter()
            .all(|sp| sp.attribute(ORDER_ID) == Some(&Value::Str(keep.clone())))
    );
    // The dropped order's spans wait for a reason; at the end of the hold they go.
    assert_eq!(s.len(), 3);
    s.expire(100 * S);
    assert_eq!(s.len(), 0);
    assert_eq!(metrics.sampling.spans_dropped_total(), 3);
    assert_eq!(
        metrics.sampling.get(DecisionKind::Order, SampleWhy::Ratio),
        (1, 1, 0)
    );
}

#[test]
fn an_error_keeps_the_whole_order_with_what_waited() {
    let (_, drop) = kept_and_dropped(0.5);
    let (mut s, metrics) = sampler(ratio(0.5));
    let mut out = Vec::new();
    s.push(order_span(&drop, new_trace_id(), 10, 20), S, &mut out);
    s.push(order_span(&drop, new_trace_id(), 30, 40), S, &mut out);
    assert!(out.is_empty());
    let mut failed = order_span(&drop, new_trace_id(), 50, 60);
    failed.status = Status::Error("HTTP 500".into());
    s.push(failed, 2 * S, &mut out);
    assert_eq!(out.len(), 3);
    // Later spans of the order are kept too.
    s.push(order_span(&drop, new_trace_id(), 70, 80), 3 * S, &mut out);
    assert_eq!(out.len(), 4);
    assert_eq!(
        metrics.sampling.get(DecisionKind::Order, SampleWhy::Error),
        (1, 0, 0)
    );
    assert_eq!(metrics.sampling.spans_dropped_total(), 0);
}

#[test]
fn a_stall_or_slowness_keeps_the_order() {
    let (_, drop) = kept_and_dropped(0.5);
    let config = SamplingConfig {
        slow: Some(Duration::from_secs(5)),
        ..ratio(0.5)
    };
    let (mut s, metrics) = sampler(config);
    let mut out = Vec::new();
    let mut stalled = order_span(&drop, new_trace_id(), 0, 1);
    stalled.attributes.push(KeyValue::new(STALLED, true));
    s.push(order_span(&drop, new_trace_id(), 0, 1), S, &mut out);
    s.push(stalled, S, &mut out);
    assert_eq!(out.len(), 2);

    // Another order: two spans 6 s apart end to end.
    let other = (0..)
        .map(|i| format!("slow-{i}"))
        .find(|id| order_value(id) >= threshold(0.5))
        .unwrap();
    s.push(order_span(&other, new_trace_id(), 0, S), S, &mut out);
    assert_eq!(out.len(), 2);
    s.push(
        order_span(&other, new_trace_id(), 5 * S, 6 * S),
        S,
        &mut out,
    );
    assert_eq!(out.len(), 4);
    assert_eq!(
        metrics
            .sampling
            .get(DecisionKind::Order, SampleWhy::Stalled)
            .0,
        1
    );
    assert_eq!(
        metrics.sampling.get(DecisionKind::Order, SampleWhy::Slow).0,
        1
    );
}

#[test]
fn a_reason_after_the_hold_keeps_the_rest_and_says_it_came_late() {
    let (_, drop) = kept_and_dropped(0.5);
    let (mut s, metrics) = sampler(ratio(0.5));
    let mut out = Vec::new();
    s.push(order_span(&drop, new_trace_id(), 0, 1), S, &mut out);
    s.expire(100 * S);
    let mut failed = order_span(&drop, new_trace_id(), 2, 3);
    failed.status = Status::Error("boom".into());
    s.push(failed, 101 * S, &mut out);
    assert_eq!(out.len(), 1);
    assert_eq!(
        metrics.sampling.get(DecisionKind::Order, SampleWhy::Error),
        (0, 0, 1)
    );
    assert_eq!(metrics.sampling.spans_dropped_total(), 1);
}

#[test]
fn spans_that_waited_without_an_order_id_join_the_order_when_it_shows() {
    let (keep, _) = kept_and_dropped(0.01);
    let (mut s, _) = sampler(ratio(0.01));
    // A trace whose id the ratio drops.
    let trace = (0..)
        .map(|_| new_trace_id())
        .find(|t| trace_value(t) >= threshold(0.01))
        .unwrap();
    let mut out = Vec::new();
    s.push(test_span(trace, new_span_id(), 0, 1), S, &mut out);
    assert!(out.is_empty());
    s.push(order_span(&keep, trace, 1, 2), S, &mut out);
    assert_eq!(out.len(), 2);
    assert_eq!(s.len(), 0);
}

#[test]
fn forgetting_the_oldest_key_never_forgets_a_newer_decision_for_it() {
    let (_, drop) = kept_and_dropped(0.5);
    let mut config = ratio(0.5);
    config.keep_errors = true;
    let (mut s, _) = sampler(config);
    s.max_keys = 3;
    let dropped_trace = || {
        (0..)
            .map(|_| new_trace_id())
            .find(|t| trace_value(t) >= threshold(0.5))
            .unwrap()
    };
    let trace = dropped_trace();
    let mut out = Vec::new();
    // The trace waits under its id, then learns its order: its first key is gone.
    s.push(test_span(trace, new_span_id(), 0, 1), S, &mut out);
    s.push(order_span(&drop, trace, 1, 2), S, &mut out);
    assert!(out.is_empty());
    // A later span of the trace without the order id is decided again, and an error
    // keeps it.
    let mut failed = test_span(trace, new_span_id(), 2, 3);
    failed.status = Status::Error("HTTP 500".into());
    s.push(failed, S, &mut out);
    assert_eq!(out.len(), 1);
    // A new key pushes the trace's first (forgotten) decision out of the age list...
    s.push(test_span(dropped_trace(), new_span_id(), 3, 4), S, &mut out);
    // ...which must leave the error's keep alone.
    s.push(test_span(trace, new_span_id(), 4, 5), S, &mut out);
    assert_eq!(out.len(), 2, "the trace kept for its error stays kept");
}

#[test]
fn an_incoming_sampled_flag_decides_traces_without_an_order() {
    let (mut s, metrics) = sampler(ratio(0.5));
    let kept = (0..)
        .map(|_| new_trace_id())
        .find(|t| trace_value(t) < threshold(0.5))
        .unwrap();
    let dropped = (0..)
        .map(|_| new_trace_id())
        .find(|t| trace_value(t) >= threshold(0.5))
        .unwrap();
    s.parent_flags(kept, 0);
    s.parent_flags(dropped, 1);
    let mut out = Vec::new();
    s.push(test_span(kept, new_span_id(), 0, 1), S, &mut out);
    s.push(test_span(dropped, new_span_id(), 0, 1), S, &mut out);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].trace_id, dropped);
    s.expire(100 * S);
    assert_eq!(
        metrics.sampling.get(DecisionKind::Trace, SampleWhy::Parent),
        (1, 1, 0)
    );
}

#[test]
fn the_limit_drops_whole_orders_never_single_spans() {
    let config = SamplingConfig {
        limit: Some(10),
        ..ratio(1.0)
    };
    assert!(!config.keeps_all());
    let (mut s, metrics) = sampler(config);
    let mut out = Vec::new();
    // Four spans per order, all at the same moment: orders are admitted while the
    // budget lasts, and an admitted order keeps all four.
    for i in 0..10 {
        let order = format!("ORD-{i}");
        for _ in 0..4 {
            s.push(order_span(&order, new_trace_id(), 0, 1), S, &mut out);
        }
    }
    s.expire(100 * S);
    assert_eq!(out.len() % 4, 0, "{}", out.len());
    assert!(out.len() >= 10 && out.len() < 40, "{}", out.len());
    let (_, limited, _) = metrics.sampling.get(DecisionKind::Order, SampleWhy::Limit);
    assert_eq!(limited as usize, 10 - out.len() / 4);
}

#[test]
fn too_many_waiting_spans_end_the_oldest_holds_first() {
    let metrics = Arc::new(Metrics::default());
    let mut s = Sampler::new(&ratio(0.0), None, 5, metrics.clone());
    let mut out = Vec::new();
    for i in 0..8u64 {
        s.push(
            order_span(&format!("o{i}"), new_trace_id(), 0, 1),
            i,
            &mut out,
        );
    }
    assert!(out.is_empty());
    assert_eq!(s.len(), 5);
    assert_eq!(metrics.sampling.hold_full_total(), 3);
    assert_eq!(metrics.sampling.spans_dropped_total(), 3);
}

#[test]
fn bad_values_are_refused_with_a_reason() {
    assert!(ratio(1.5).check().unwrap_err().contains("between 0 and 1"));
    assert!(ratio(f64::NAN).check().is_err());
    let zero = SamplingConfig {
        limit: Some(0),
        ..ratio(0.5)
    };
    assert!(zero.check().unwrap_err().contains("limit 0"));
    assert!(ratio(0.0).check().is_ok());
}

#[test]
fn the_config_file_section_parses() {
    let s = crate::settings::Settings::parse(
        "sampling:\n  ratio: 0.1\n  slow: 10s\n  hold: 1m\n  limit: 500\n  keep_errors: false\n",
    )
    .unwrap();
    assert_eq!(s.sampling.ratio, 0.1);
    assert_eq!(s.sampling.slow, Some(Duration::from_secs(10)));
    assert_eq!(s.sampling.hold, Some(Duration::from_secs(60)));
    assert_eq!(s.sampling.limit, Some(500));
    assert!(!s.sampling.keep_errors && s.sampling.keep_stalled);
    let err = crate::settings::Settings::parse("sampling:\n  slow: soon\n").unwrap_err();
    assert!(err.contains("not a duration"), "{err}");
    let err = crate::settings::Settings::parse("sampling:\n  ratio: 2\n").unwrap_err();
    assert!(err.contains("between 0 and 1"), "{err}");
}
