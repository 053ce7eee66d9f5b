//! Delivering batches over OTLP, the way the OpenTelemetry Collector's retry sender
//! does: a failure the OTLP specification calls retryable (the receiver down,
//! overloaded or unreachable) is retried with exponential backoff, jittered and
//! capped, or after the delay the receiver asked for (HTTP `Retry-After`, gRPC
//! `RetryInfo`), for as long as the spans are younger than the queue's age bound. A
//! permanent refusal drops the batch at once (`rejected`), and so do the spans a
//! partial success names. One batch is in flight at a time, so spans arrive in the
//! order they were made and a receiver that comes back is not flooded.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use super::config::RetryConfig;
use super::queue::{Entry, Outcome, Queue};
use super::tls::TlsFailure;
use super::transport::{SendError, Transport};
use super::{EncodedSpan, Pause, otlp};
use crate::spans::Resource;
use crate::telemetry::{DropReason, Metrics};

/// Everything the delivery task needs.
pub(super) struct Delivery {
    pub queue: Arc<Queue<EncodedSpan>>,
    pub transport: Transport,
    pub retry: RetryConfig,
    /// How long a batch waits to fill.
    pub delay: Duration,
    /// The queue's age bound: spans older than this are dropped between attempts.
    pub max_age: Duration,
    pub metrics: Arc<Metrics>,
    pub pause: Pause,
}

/// Takes batches from the queue and delivers each until it is settled, until the queue
/// is closed and empty.
pub(super) async fn run(mut d: Delivery) {
    let mut backoff = Backoff::new(d.retry.clone());
    // Since when the receiver has been failing, to say so once and once when it is back.
    let mut failing_since: Option<Instant> = None;
    // Whether this outage's TLS cause has been logged: a refused client certificate can
    // first show as a closed connection (TLS 1.3 reports it after the handshake, and the
    // HTTP/2 connection may end before the alert is read), and only a later attempt
    // names the cause.
    let mut tls_logged = false;
    while let Some(entries) = d.queue.next_batch(d.delay).await {
        let mut batch = Batch::new(entries);
        loop {
            let error = match d.transport.send(&batch.body).await {
                Ok(delivered) => {
                    if let Some(since) = failing_since.take() {
                        info!(
                            outage = ?since.elapsed(),
                            "OTLP receiver answers again; delivering the queued spans"
                        );
                    }
                    backoff.reset();
                    let rejected = usize::try_from(delivered.rejected)
                        .unwrap_or(usize::MAX)
                        .min(batch.spans);
                    d.queue
                        .settle(Outcome::Exported, batch.spans - rejected, batch.bytes);
                    if rejected > 0 {
                        warn!(
                            rejected,
                            reason = %delivered.message,
                            "OTLP receiver refused some spans (partial success); they are dropped"
                        );
                        d.queue
                            .settle(Outcome::Dropped(DropReason::Rejected), rejected, 0);
                    }
                    break;
                }
                Err(error) => error,
            };
            Metrics::inc(&d.metrics.export_failures);
            let tls_failure = TlsFailure::classify(&error.to_string());
            if let Some(cause) = tls_failure {
                Metrics::inc(&d.metrics.export_tls_failures[cause as usize]);
            }
            let retry_after = match error {
                SendError::Permanent(reason) => {
                    failing_since = None;
                    backoff.reset();
                    warn!(
                        spans = batch.spans,
                        %reason,
                        "OTLP receiver refused the batch; its spans are dropped"
                    );
                    d.queue.settle(
                        Outcome::Dropped(DropReason::Rejected),
                        batch.spans,
                        batch.bytes,
                    );
                    break;
                }
                SendError::Transient {
                    reason,
                    retry_after,
                } => {
                    let first = failing_since.is_none();
                    if first {
                        failing_since = Some(Instant::now());
                        tls_logged = false;
                    }
                    if let (Some(cause), false) = (tls_failure, tls_logged) {
                        tls_logged = true;
                        error!(
                            cause = cause.label(),
                            %reason,
                            "OTLP export failed in the TLS handshake: {}; spans stay \
                             queued until the queue is full or they pass the age bound",
                            cause.hint()
                        );
                    } else if first {
                        warn!(
                            %reason,
                            max_age = ?d.max_age,
                            "OTLP export failed; spans stay queued and are retried until the \
                             receiver answers or they pass the age bound"
                        );
                    } else {
                        debug!(%reason, "OTLP export failed again");
                    }
                    retry_after
                }
            };
            let wait = backoff.next(retry_after, d.max_age);
            (d.pause)(wait).await;
            let (expired, bytes) = batch.expire(Instant::now().checked_sub(d.max_age));
            if expired > 0 {
                warn!(
                    expired,
                    max_age = ?d.max_age,
                    "spans waited longer than the age bound for the OTLP receiver; dropped"
                );
                d.queue
                    .settle(Outcome::Dropped(DropReason::Expired), expired, bytes);
            }
            d.queue.expire_queued();
            if batch.spans == 0 {
                break;
            }
        }
    }
}

/// The waits between attempts: from `initial_backoff`, doubling up to `max_backoff`,
/// each drawn at random between half and all of the current step so that agents
/// restarted together do not retry together.
pub(super) struct Backoff {
    config: RetryConfig,
    step: Duration,
}

impl Backoff {
    pub fn new(config: RetryConfig) -> Self {
        Backoff {
            step: config.initial_backoff,
            config,
        }
    }

    /// The wait before the next attempt. A delay the receiver asked for is honoured
    /// as it is, up to `limit` (longer and the spans would expire anyway).
    pub fn next(&mut self, asked: Option<Duration>, limit: Duration) -> Duration {
        let wait = match asked {
            Some(asked) => asked.min(limit),
            None => {
                let nanos = u64::try_from(self.step.as_nanos()).unwrap_or(u64::MAX);
                Duration::from_nanos(rand::random_range(nanos / 2..=nanos))
            }
        };
        self.step = self.step.saturating_mul(2).min(self.config.max_backoff);
        wait
    }

    /// The receiver answered: the next failure starts from the first step again.
    pub fn reset(&mut self) {
        self.step = self.config.initial_backoff;
    }
}

/// One batch: its spans, encoded and grouped by resource, with when each was queued,
/// and the request they make.
struct Batch {
    groups: Vec<(Arc<Resource>, Vec<Held>)>,
    /// The encoded `ExportTraceServiceRequest`.
    body: Bytes,
    spans: usize,
    bytes: usize,
}

/// One span of a batch: its encoding, and when it was queued.
struct Held {
    bytes: Vec<u8>,
    queued: Instant,
}

impl Batch {
    fn new(entries: Vec<Entry<EncodedSpan>>) -> Self {
        let spans = entries.len();
        let bytes = entries.iter().map(|e| e.size).sum();
        let groups = otlp::group_by_resource(entries.into_iter().map(|e| {
            let held = Held {
                bytes: e.item.bytes,
                queued: e.enqueued,
            };
            (e.item.resource, held)
        }));
        let mut batch = Batch {
            groups,
            body: Bytes::new(),
            spans,
            bytes,
        };
        batch.encode();
        batch
    }

    fn encode(&mut self) {
        self.body = otlp::encode_request(&self.groups, |held| &held.bytes).into();
    }

    /// Takes out the spans queued at or before `cutoff`; answers how many, and their
    /// bytes.
    fn expire(&mut self, cutoff: Option<Instant>) -> (usize, usize) {
        let Some(cutoff) = cutoff else {
            return (0, 0);
        };
        let (mut spans, mut bytes) = (0, 0);
        for (_, group) in &mut self.groups {
            group.retain(|held| {
                let expired = held.queued <= cutoff;
                if expired {
                    spans += 1;
                    bytes += held.bytes.len();
                }
                !expired
            });
        }
        if spans > 0 {
            self.groups.retain(|(_, group)| !group.is_empty());
            self.spans -= spans;
            self.bytes -= bytes;
            self.encode();
        }
        (spans, bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use prost::Message;

    use crate::spans::{Span, SpanKind, Status};

    fn config() -> RetryConfig {
        RetryConfig {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(700),
        }
    }

    #[test]
    fn backoff_doubles_with_jitter_up_to_its_cap_and_starts_over_after_an_answer() {
        let limit = Duration::from_secs(300);
        for _ in 0..50 {
            let mut backoff = Backoff::new(config());
            let steps = [100, 200, 400, 700, 700];
            for step in steps {
                let wait = backoff.next(None, limit);
                let step = Duration::from_millis(step);
                assert!(
                    wait >= step / 2 && wait <= step,
                    "{wait:?} for step {step:?}"
                );
            }
            backoff.reset();
            assert!(backoff.next(None, limit) <= Duration::from_millis(100));
        }
    }

    #[test]
    fn a_delay_the_receiver_asks_for_is_honoured_up_to_the_age_bound() {
        let mut backoff = Backoff::new(config());
        let limit = Duration::from_secs(300);
        assert_eq!(
            backoff.next(Some(Duration::from_secs(3)), limit),
            Duration::from_secs(3)
        );
        assert_eq!(backoff.next(Some(Duration::from_secs(3600)), limit), limit);
        assert_eq!(backoff.next(Some(Duration::ZERO), limit), Duration::ZERO);
    }

    fn entry(resource: &Arc<Resource>, id: u8, enqueued: Instant) -> Entry<EncodedSpan> {
        let span = Span {
            trace_id: [1; 16],
            span_id: [id; 8],
            parent_span_id: None,
            name: "GET /".to_owned(),
            kind: SpanKind::Server,
            start_unix_nanos: 1,
            end_unix_nanos: 2,
            attributes: vec![],
            status: Status::Unset,
            resource: Arc::clone(resource),
        };
        let (item, size) = <EncodedSpan as super::super::Item>::prepare(span);
        Entry {
            item,
            size,
            enqueued,
        }
    }

    fn resource(name: &str) -> Arc<Resource> {
        Arc::new(Resource {
            service_name: name.to_owned(),
            pid: 1,
            executable_name: name.to_owned(),
            host_name: "node".to_owned(),
            attributes: vec![],
            generic_name: false,
        })
    }

    fn ids(batch: &Batch) -> Vec<u8> {
        let request = ExportTraceServiceRequest::decode(batch.body.clone()).unwrap();
        request
            .resource_spans
            .iter()
            .flat_map(|rs| &rs.scope_spans[0].spans)
            .map(|s| s.span_id[0])
            .collect()
    }

    #[test]
    fn expiring_a_batch_takes_out_exactly_the_old_spans_of_every_resource() {
        let (shop, crm) = (resource("shop"), resource("crm"));
        let t0 = Instant::now();
        let t = |s| t0 + Duration::from_secs(s);
        let entries = vec![
            entry(&shop, 1, t(0)),
            entry(&crm, 2, t(1)),
            entry(&shop, 3, t(2)),
            entry(&crm, 4, t(3)),
        ];
        let sizes: Vec<usize> = entries.iter().map(|e| e.size).collect();
        let mut batch = Batch::new(entries);
        assert_eq!((batch.spans, batch.bytes), (4, sizes.iter().sum()));
        // Grouped by resource: shop's spans, then crm's.
        assert_eq!(ids(&batch), [1, 3, 2, 4]);
        assert_eq!(batch.expire(None), (0, 0));
        // Spans 1 (shop) and 2 (crm) are old.
        assert_eq!(batch.expire(Some(t(1))), (2, sizes[0] + sizes[1]));
        assert_eq!((batch.spans, batch.bytes), (2, sizes[2] + sizes[3]));
        assert_eq!(ids(&batch), [3, 4]);
        assert_eq!(batch.expire(Some(t(2))), (1, sizes[2]));
        assert_eq!(batch.groups.len(), 1, "shop's group is gone");
        assert_eq!(ids(&batch), [4]);
        assert_eq!(batch.expire(Some(t(3))), (1, sizes[3]));
        assert!(batch.groups.is_empty());
        assert_eq!((batch.spans, batch.bytes), (0, 0));
    }
}
