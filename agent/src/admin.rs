//! The admin endpoint: `GET /healthz` (the process answers), `GET /readyz` (every
//! probe is attached), `GET /metrics` (the [`Metrics`] counters in Prometheus text
//! format).
//!
//! Hand-written over a `TcpListener`, with httparse for the request head: three fixed
//! routes, one short response each and `Connection: close` do not justify a web
//! framework in a node agent. Binding is separate from serving so the caller can say
//! plainly that the port is taken.

use std::fmt::Write as _;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

use crate::telemetry::{DropReason, Metrics};

/// Longest request head accepted; the routes take no body.
const MAX_HEAD: usize = 8 * 1024;
/// How long a client may take to send its request head.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Binds the admin address. An address in use comes back as `ErrorKind::AddrInUse`.
pub async fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Binds `addr` and answers admin requests on it: [`bind`] then [`serve_on`].
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> io::Result<()> {
    serve_on(bind(addr).await?, metrics).await
}

/// Answers admin requests on `listener` until the task is dropped. Accept errors
/// (a client gone before accept, out of file descriptors) are logged and survived:
/// the endpoint must outlive a bad moment, it is how the agent's health is seen.
pub async fn serve_on(listener: TcpListener, metrics: Arc<Metrics>) -> io::Result<()> {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let metrics = Arc::clone(&metrics);
                tokio::spawn(async move {
                    if let Err(error) = handle(stream, &metrics).await {
                        debug!(%peer, %error, "admin request failed");
                    }
                });
            }
            Err(error) => {
                warn!(%error, "admin endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

struct Response {
    status: u16,
    content_type: &'static str,
    body: String,
    extra_header: Option<&'static str>,
}

impl Response {
    fn text(status: u16, body: &str) -> Self {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            body: format!("{body}\n"),
            extra_header: None,
        }
    }
}

async fn handle(mut stream: TcpStream, metrics: &Metrics) -> io::Result<()> {
    let mut buf = vec![0u8; MAX_HEAD];
    let mut len = 0;
    let parsed = loop {
        let n = tokio::time::timeout(READ_TIMEOUT, stream.read(&mut buf[len..]))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "request head too slow"))??;
        if n == 0 {
            return Ok(());
        }
        len += n;
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut request = httparse::Request::new(&mut headers);
        match request.parse(&buf[..len]) {
            Ok(httparse::Status::Complete(_)) => {
                break Some((
                    request.method.unwrap_or_default().to_owned(),
                    request.path.unwrap_or_default().to_owned(),
                ));
            }
            Ok(httparse::Status::Partial) if len < buf.len() => continue,
            Ok(httparse::Status::Partial) | Err(_) => break None,
        }
    };
    let (head_only, response) = match parsed {
        None => (false, Response::text(400, "bad request")),
        Some((method, target)) => (method == "HEAD", route(&method, &target, metrics)),
    };
    write_response(&mut stream, &response, head_only).await
}

fn route(method: &str, target: &str, metrics: &Metrics) -> Response {
    let path = target.split(['?', '#']).next().unwrap_or_default();
    let known = matches!(path, "/healthz" | "/readyz" | "/metrics");
    if !known {
        return Response::text(404, "not found: try /healthz, /readyz or /metrics");
    }
    if method != "GET" && method != "HEAD" {
        return Response {
            extra_header: Some("Allow: GET, HEAD"),
            ..Response::text(405, "method not allowed")
        };
    }
    match path {
        "/healthz" => Response::text(200, "ok"),
        "/readyz" if metrics.ready.load(Ordering::Relaxed) => Response::text(200, "ready"),
        "/readyz" => Response::text(503, "not ready: probes are still being attached"),
        _ => Response {
            status: 200,
            content_type: PROMETHEUS_TEXT,
            body: render_metrics(metrics),
            extra_header: None,
        },
    }
}

async fn write_response(
    stream: &mut TcpStream,
    response: &Response,
    head_only: bool,
) -> io::Result<()> {
    let reason = match response.status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        503 => "Service Unavailable",
        _ => "",
    };
    let mut head = format!(
        "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
        response.status,
        response.content_type,
        response.body.len()
    );
    if let Some(header) = response.extra_header {
        head.push_str(header);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await?;
    if !head_only {
        stream.write_all(response.body.as_bytes()).await?;
    }
    stream.shutdown().await
}

/// The Kubernetes metadata's counters ([`crate::kubernetes`]).
fn kubernetes_metrics(out: &mut String, k8s: &crate::kubernetes::K8sMetrics) {
    let crate::kubernetes::K8sMetrics {
        errors,
        refreshes,
        pods,
        spans_without_pod,
    } = k8s;
    let name = "sonde_k8s_metadata_errors_total";
    let _ = writeln!(
        out,
        "# HELP {name} Failed reads of this node's pods from the Kubernetes API server or kubelet, by \
         reason: unauthorized (401), forbidden (403: RBAC), tls, unreachable, timeout, \
         http_status, invalid_response, token (unreadable token file), config \
         (kubernetes.enabled is true but sonde is not set up to reach the cluster).\n# TYPE {name} counter"
    );
    for reason in crate::kubernetes::ErrorReason::ALL {
        let _ = writeln!(
            out,
            "{name}{{reason=\"{}\"}} {}",
            reason.label(),
            errors[reason as usize].load(Ordering::Relaxed)
        );
    }
    let name = "sonde_k8s_metadata_refreshes_total";
    let _ = writeln!(
        out,
        "# HELP {name} Successful reads of this node's pods.\n# TYPE {name} counter\n{name} {}",
        refreshes.load(Ordering::Relaxed)
    );
    let name = "sonde_k8s_spans_without_pod_metadata_total";
    let _ = writeln!(
        out,
        "# HELP {name} Spans of processes in a pod's cgroup that left without the pod's metadata (the pod was not found yet).\n# TYPE {name} counter\n{name} {}",
        spans_without_pod.load(Ordering::Relaxed)
    );
    let name = "sonde_k8s_pods";
    let _ = writeln!(
        out,
        "# HELP {name} Pods of this node in the metadata cache.\n# TYPE {name} gauge\n{name} {}",
        pods.load(Ordering::Relaxed)
    );
}

/// Every [`Metrics`] field, in the Prometheus text exposition format. The fields are
/// destructured without `..`, so a new counter that is not exposed here does not
/// compile.
fn render_metrics(metrics: &Metrics) -> String {
    let Metrics {
        tee,
        kubernetes,
        events_seen,
        bytes_seen,
        events_lost,
        events_lost_by_cause,
        kernel_counters,
        events_malformed,
        spans_built,
        spans_exported,
        spans_dropped,
        export_failures,
        export_tls_failures,
        parse_failures,
        connections_tracked,
        connections_evicted,
        bytes_skipped,
        message_starts_missed,
        spans_waiting,
        discovery_requests_dropped,
        spans_identity_unconfirmed,
        parent_ambiguous,
        parent_undecided,
        spans_stalled,
        order_holds_cut,
        process_spans,
        sampling,
        values_redacted,
        inject_counts,
        inject_unmatched,
        inject_conflicts,
        inject_active,
        ready,
        export_queue_spans,
        export_queue_bytes,
        business,
        bpf_programs,
    } = metrics;
    let mut out = String::with_capacity(2048);
    let mut counter = |name: &str, help: &str, value: &AtomicU64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
            value.load(Ordering::Relaxed)
        );
    };
    counter(
        "sonde_events_total",
        "Ring buffer events decoded, of any kind.",
        events_seen,
    );
    counter(
        "sonde_bytes_total",
        "Payload bytes moved by traced sockets, captured or not.",
        bytes_seen,
    );
    counter(
        "sonde_events_lost_total",
        "Events the kernel side could not deliver.",
        events_lost,
    );
    for (name, value) in agent_common::counter::NAMES.iter().zip(kernel_counters) {
        let help = match *name {
            "sonde_tls_sockets_guessed_total" => {
                "TLS plaintext events put on a socket guessed from the thread's last read (memory BIOs, not confirmed yet)."
            }
            "sonde_tls_sockets_confirmed_total" => {
                "Memory-BIO TLS sessions whose socket was confirmed by a socket write carrying one of their TLS records."
            }
            "sonde_tls_sockets_corrected_total" => {
                "Guessed TLS sockets that a confirmation proved wrong."
            }
            _ => "Syscalls split at an announced message start, with a prefix copied from there.",
        };
        counter(name, help, value);
    }
    let _ = writeln!(
        out,
        "# HELP sonde_events_lost_by_cause_total Events the kernel side could not deliver, by cause.\n\
         # TYPE sonde_events_lost_by_cause_total counter"
    );
    for (cause, value) in agent_common::lost::NAMES.iter().zip(events_lost_by_cause) {
        let _ = writeln!(
            out,
            "sonde_events_lost_by_cause_total{{cause=\"{cause}\"}} {}",
            value.load(Ordering::Relaxed)
        );
    }
    let mut counter = |name: &str, help: &str, value: &AtomicU64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
            value.load(Ordering::Relaxed)
        );
    };
    counter(
        "sonde_events_malformed_total",
        "Events that arrived malformed and were dropped.",
        events_malformed,
    );
    counter("sonde_spans_built_total", "Spans built.", spans_built);
    counter(
        "sonde_spans_exported_total",
        "Spans an exporter delivered.",
        spans_exported,
    );
    counter(
        "sonde_export_failures_total",
        "Failed export attempts, each retry counted.",
        export_failures,
    );
    counter(
        "sonde_parse_failures_total",
        "Connections no protocol parser could read.",
        parse_failures,
    );
    counter(
        "sonde_connections_evicted_total",
        "Connections dropped from the full connection table.",
        connections_evicted,
    );
    counter(
        "sonde_bytes_skipped_total",
        "Stream bytes that passed without being captured.",
        bytes_skipped,
    );
    counter(
        "sonde_discovery_requests_dropped_total",
        "Requests to the discovery thread (name a process, find its TLS code) dropped: queue full.",
        discovery_requests_dropped,
    );
    counter(
        "sonde_spans_identity_unconfirmed_total",
        "Spans that left before /proc named their process (named from its exec event or pid).",
        spans_identity_unconfirmed,
    );
    counter(
        "sonde_parent_ambiguous_total",
        "Calls and programs left without a parent: several requests of their process were in flight and nothing told them apart.",
        parent_ambiguous,
    );
    let [injected, skipped @ ..] = inject_counts;
    counter(
        "sonde_inject_injected_total",
        "Requests sent by traced processes into which the kernel wrote a traceparent header.",
        injected,
    );
    counter(
        "sonde_inject_unmatched_total",
        "Injected traceparents whose ids no client span took (its trace lacks that span here).",
        inject_unmatched,
    );
    counter(
        "sonde_inject_trace_conflicts_total",
        "Client spans with an injected traceparent put under a local parent in another trace than the one sent.",
        inject_conflicts,
    );
    counter(
        "sonde_parent_undecided_total",
        "Exchanges whose parent was not known within the decision window (or that were forgotten to bound memory): they started a trace of their own.",
        parent_undecided,
    );
    counter(
        "sonde_spans_stalled_total",
        "Spans exported while their exchange hung past the stall timeout (sonde.stalled=true).",
        spans_stalled,
    );
    counter(
        "sonde_order_holds_cut_total",
        "Spans that left the wait for their trace's order id early because too many spans (or bytes of them) waited: an order id found later in their trace is not set on them.",
        order_holds_cut,
    );
    counter(
        "sonde_process_spans_total",
        "Programs a traced service ran while handling a request, made into spans.",
        process_spans,
    );
    counter(
        "sonde_values_redacted_total",
        "Attribute values (or parts of them) replaced by [REDACTED] because they held a secret or a payment card number.",
        values_redacted,
    );
    counter(
        "sonde_message_starts_missed_total",
        "Messages that started in bytes the kernel did not copy, so the parser resynchronised.",
        message_starts_missed,
    );
    let h2 = &crate::protocols::http2::COUNTERS;
    counter(
        "sonde_http2_streams_dropped_total",
        "HTTP/2 streams not followed because a connection had the most open streams followed at once.",
        &h2.streams_dropped,
    );
    counter(
        "sonde_http2_header_blocks_too_large_total",
        "HTTP/2 header blocks larger than the parser decodes: their streams are not followed and the connection's header table becomes unknown.",
        &h2.blocks_too_large,
    );
    counter(
        "sonde_http2_header_blocks_undecodable_total",
        "HTTP/2 header blocks HPACK could not decode: their streams are not followed and the connection's header table becomes unknown.",
        &h2.blocks_undecodable,
    );
    counter(
        "sonde_http2_sync_lost_total",
        "HTTP/2 connection directions that lost their frame boundaries (bytes not captured, or not frames).",
        &h2.sync_lost,
    );
    counter(
        "sonde_http2_header_table_unknown_total",
        "HTTP/2 requests and responses whose headers referred to header table entries sent before the agent watched the connection (spans marked sonde.http2.header_table_unknown).",
        &h2.table_unknown,
    );
    let name = "sonde_spans_dropped_total";
    let _ = writeln!(
        out,
        "# HELP {name} Spans dropped before delivery, by reason: queue_full (the export \
         queue was at its bound), expired (older than the queue's age bound), rejected \
         (refused by the receiver), write_failed (stdout or file), shutdown (still queued \
         when the agent stopped).\n# TYPE {name} counter"
    );
    for reason in DropReason::ALL {
        let _ = writeln!(
            out,
            "{name}{{reason=\"{}\"}} {}",
            reason.label(),
            spans_dropped.get(reason)
        );
    }
    sampling_metrics(&mut out, sampling);
    let name = "sonde_export_tls_failures_total";
    let _ = writeln!(
        out,
        "# HELP {name} Export attempts whose TLS handshake with the OTLP receiver failed, by \
         cause: unknown_issuer (its certificate is not signed by a trusted CA), \
         server_certificate_expired, server_name_mismatch, client_certificate_rejected (the \
         receiver refused sonde's client certificate), other.\n# TYPE {name} counter"
    );
    for cause in crate::export::tls::TlsFailure::ALL {
        let _ = writeln!(
            out,
            "{name}{{cause=\"{}\"}} {}",
            cause.label(),
            export_tls_failures[cause as usize].load(Ordering::Relaxed)
        );
    }
    kubernetes_metrics(&mut out, kubernetes);
    let mut gauge = |name: &str, help: &str, value: u64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
        );
    };
    gauge(
        "sonde_connections_tracked",
        "Connections in the connection table.",
        connections_tracked.load(Ordering::Relaxed),
    );
    gauge(
        "sonde_spans_waiting",
        "Spans held for the other end of their connection or message.",
        spans_waiting.load(Ordering::Relaxed),
    );
    gauge(
        "sonde_export_queue_spans",
        "Spans in the export queue or in a batch being sent.",
        export_queue_spans.load(Ordering::Relaxed),
    );
    gauge(
        "sonde_export_queue_bytes",
        "Protobuf-encoded bytes of those spans (the queue is bounded by this).",
        export_queue_bytes.load(Ordering::Relaxed),
    );
    gauge(
        "sonde_ready",
        "1 once every probe is attached.",
        u64::from(ready.load(Ordering::Relaxed)),
    );
    if let Some(tee) = tee.get() {
        let name = "sonde_tee_spans_written_total";
        let _ = writeln!(
            out,
            "# HELP {name} Spans written to the --tee-file copy.\n# TYPE {name} counter\n{name} {}",
            tee.spans_exported.load(Ordering::Relaxed)
        );
        let name = "sonde_tee_spans_dropped_total";
        let _ = writeln!(
            out,
            "# HELP {name} Spans the --tee-file copy dropped, by reason (as sonde_spans_dropped_total).\n\
             # TYPE {name} counter"
        );
        for reason in DropReason::ALL {
            let _ = writeln!(
                out,
                "{name}{{reason=\"{}\"}} {}",
                reason.label(),
                tee.spans_dropped.get(reason)
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP sonde_build_info The running sonde's version.\n# TYPE sonde_build_info gauge\n\
         sonde_build_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    );
    business.render(&mut out);
    let _ = writeln!(
        out,
        "# HELP sonde_inject_skipped_total Requests or connections left as they were, by reason.\n\
         # TYPE sonde_inject_skipped_total counter"
    );
    for (reason, value) in agent_common::inject::NAMES[1..].iter().zip(skipped) {
        let _ = writeln!(
            out,
            "sonde_inject_skipped_total{{reason=\"{reason}\"}} {}",
            value.load(Ordering::Relaxed)
        );
    }
    let _ = writeln!(
        out,
        "# HELP sonde_inject_active 1 while traceparent injection is attached.\n\
         # TYPE sonde_inject_active gauge\nsonde_inject_active {}",
        u8::from(inject_active.load(Ordering::Relaxed))
    );
    bpf_program_metrics(
        &mut out,
        &bpf_programs.lock().unwrap_or_else(PoisonError::into_inner),
    );
    out
}

/// What the kernel says each of the agent's programs cost: it counts only while
/// `kernel.bpf_stats_enabled` is 1 (off by default: the counting itself costs).
fn bpf_program_metrics(out: &mut String, bpf: &crate::telemetry::BpfPrograms) {
    let _ = writeln!(
        out,
        "# HELP sonde_bpf_stats_enabled 1 while the kernel counts eBPF run time \
         (sysctl kernel.bpf_stats_enabled=1); the two metrics below grow only then.\n\
         # TYPE sonde_bpf_stats_enabled gauge\nsonde_bpf_stats_enabled {}",
        match bpf.stats_enabled {
            Some(true) => "1",
            Some(false) => "0",
            None => "NaN",
        }
    );
    let _ = writeln!(
        out,
        "# HELP sonde_bpf_program_run_seconds_total Time the kernel spent in each of the \
         agent's eBPF programs.\n\
         # TYPE sonde_bpf_program_run_seconds_total counter"
    );
    for p in &bpf.programs {
        let _ = writeln!(
            out,
            "sonde_bpf_program_run_seconds_total{{program=\"{}\"}} {}",
            p.name,
            p.run_ns as f64 / 1e9
        );
    }
    let _ = writeln!(
        out,
        "# HELP sonde_bpf_program_runs_total Times each of the agent's eBPF programs ran.\n\
         # TYPE sonde_bpf_program_runs_total counter"
    );
    for p in &bpf.programs {
        let _ = writeln!(
            out,
            "sonde_bpf_program_runs_total{{program=\"{}\"}} {}",
            p.name, p.runs
        );
    }
}

/// The sampling counters: one decision per order (or trace without an order id), by
/// kind and reason, the spans the decisions dropped, and the holds ended early.
fn sampling_metrics(out: &mut String, sampling: &crate::telemetry::Sampling) {
    use crate::telemetry::{DecisionKind, SampleWhy};
    let _ = writeln!(
        out,
        "# HELP sonde_sampling_decisions_total Orders (kind=order) and traces without an \
         order id (kind=trace) kept or dropped by sampling, by reason: ratio (the hash of \
         the id), parent (an incoming traceparent's sampled flag), error, stalled, slow \
         (kept whatever the ratio), limit (the spans-per-second limit was spent); late=true: \
         kept after its hold had already dropped some of its spans.\n\
         # TYPE sonde_sampling_decisions_total counter"
    );
    for kind in DecisionKind::ALL {
        for why in SampleWhy::ALL {
            let (kept, dropped, late) = sampling.get(kind, why);
            for (decision, late_label, n) in [
                ("kept", "false", kept),
                ("dropped", "false", dropped),
                ("kept", "true", late),
            ] {
                let _ = writeln!(
                    out,
                    "sonde_sampling_decisions_total{{kind=\"{}\",decision=\"{decision}\",reason=\"{}\",late=\"{late_label}\"}} {n}",
                    kind.label(),
                    why.label()
                );
            }
        }
    }
    let _ = writeln!(
        out,
        "# HELP sonde_sampling_spans_dropped_total Spans not exported because sampling \
         dropped their order or trace.\n# TYPE sonde_sampling_spans_dropped_total counter\n\
         sonde_sampling_spans_dropped_total {}",
        sampling.spans_dropped_total()
    );
    let _ = writeln!(
        out,
        "# HELP sonde_sampling_holds_cut_total Holds of orders not kept (yet) ended early \
         because too many spans waited.\n# TYPE sonde_sampling_holds_cut_total counter\n\
         sonde_sampling_holds_cut_total {}",
        sampling.hold_full_total()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get(addr: SocketAddr, request: &str) -> (u16, String) {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        let status = response[9..12].parse().unwrap();
        let body = response.split_once("\r\n\r\n").unwrap().1.to_owned();
        (status, body)
    }

    fn request(method: &str, path: &str) -> String {
        format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\n\r\n")
    }

    #[tokio::test]
    async fn answers_health_readiness_and_metrics() {
        let metrics = Arc::new(Metrics::default());
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve_on(listener, Arc::clone(&metrics)));

        assert_eq!(
            get(addr, &request("GET", "/healthz")).await,
            (200, "ok\n".to_owned())
        );
        assert_eq!(get(addr, &request("GET", "/readyz")).await.0, 503);
        metrics.ready.store(true, Ordering::Relaxed);
        assert_eq!(get(addr, &request("GET", "/readyz?verbose")).await.0, 200);

        Metrics::add(&metrics.spans_exported, 42);
        Metrics::add(&metrics.connections_tracked, 7);
        metrics.spans_dropped.add(DropReason::Expired, 3);
        let (status, body) = get(addr, &request("GET", "/metrics")).await;
        assert_eq!(status, 200);
        for line in [
            "# TYPE sonde_spans_exported_total counter",
            "sonde_spans_exported_total 42",
            "# TYPE sonde_connections_tracked gauge",
            "sonde_connections_tracked 7",
            "sonde_events_total 0",
            "sonde_bytes_total 0",
            "sonde_events_lost_total 0",
            "sonde_events_lost_by_cause_total{cause=\"ringbuf_full\"} 0",
            "sonde_events_lost_by_cause_total{cause=\"tls_no_socket\"} 0",
            "sonde_tls_sockets_guessed_total 0",
            "sonde_message_windows_total 0",
            "sonde_spans_built_total 0",
            "sonde_spans_dropped_total{reason=\"queue_full\"} 0",
            "sonde_spans_dropped_total{reason=\"expired\"} 3",
            "sonde_spans_dropped_total{reason=\"rejected\"} 0",
            "sonde_spans_dropped_total{reason=\"write_failed\"} 0",
            "sonde_spans_dropped_total{reason=\"shutdown\"} 0",
            "sonde_export_queue_spans 0",
            "sonde_export_queue_bytes 0",
            "sonde_export_failures_total 0",
            "sonde_parse_failures_total 0",
            "sonde_ready 1",
        ] {
            assert!(
                body.lines().any(|l| l == line),
                "missing {line:?} in\n{body}"
            );
        }
        // Every sample line belongs to a metric with HELP and TYPE lines.
        for sample in body.lines().filter(|l| !l.starts_with('#')) {
            let name = sample.split(['{', ' ']).next().unwrap();
            assert!(
                body.contains(&format!("# TYPE {name} ")),
                "{name} has no TYPE"
            );
            assert!(
                body.contains(&format!("# HELP {name} ")),
                "{name} has no HELP"
            );
        }

        assert_eq!(get(addr, &request("GET", "/nope")).await.0, 404);
        assert_eq!(get(addr, &request("POST", "/metrics")).await.0, 405);
        assert_eq!(get(addr, "garbage\r\n\r\n").await.0, 400);
        let (status, body) = get(addr, &request("HEAD", "/healthz")).await;
        assert_eq!((status, body.as_str()), (200, ""));
        server.abort();
    }

    #[tokio::test]
    async fn a_busy_port_is_reported_as_in_use() {
        let first = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let err = bind(first.local_addr().unwrap()).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
    }
}
