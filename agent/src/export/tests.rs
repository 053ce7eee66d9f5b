//! The exporters end to end at the unit level: spans in through an
//! [`ExporterHandle`], out to a file or to an OTLP receiver on 127.0.0.1.
//!
//! The receivers here are stand-ins: a minimal tonic TraceService and a minimal
//! HTTP/1.1 server, enough to see what arrives and to script failures. They check
//! sonde's side of the protocol only; export to the real Jaeger is tested end to end
//! elsewhere.

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTracePartialSuccess, ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::*;
use crate::spans::{KeyValue, Resource, SpanKind, Status};

fn spans(n: u8) -> Vec<Span> {
    spans_from(1, n)
}

/// Spans with ids `first..first + n`, all of one process.
fn spans_from(first: u8, n: u8) -> Vec<Span> {
    let resource = Arc::new(Resource {
        service_name: "shop-api".to_owned(),
        pid: 1234,
        executable_name: "python3".to_owned(),
        host_name: "node-1".to_owned(),
        attributes: vec![],
        generic_name: false,
    });
    (first..first + n)
        .map(|i| Span {
            trace_id: [7; 16],
            span_id: [i; 8],
            parent_span_id: None,
            name: "GET /orders/{id}".to_owned(),
            kind: SpanKind::Server,
            start_unix_nanos: 1_700_000_000_000_000_000,
            end_unix_nanos: 1_700_000_000_010_000_000,
            attributes: vec![KeyValue::new("order.id", format!("o-{i}"))],
            status: Status::Unset,
            resource: Arc::clone(&resource),
        })
        .collect()
}

fn otlp_config(protocol: Protocol, endpoint: String) -> OtlpConfig {
    OtlpConfig {
        protocol,
        endpoint,
        headers: vec![("x-tenant".to_owned(), "shop".to_owned())],
        timeout: Duration::from_secs(5),
        ca_file: None,
        client_auth: None,
        server_name: None,
        batch: BatchConfig {
            max_export_batch_size: 64,
            scheduled_delay: Duration::from_millis(20),
        },
        retry: RetryConfig {
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(50),
        },
    }
}

/// A queue large and patient enough that only what a test sets drops anything.
fn roomy() -> QueueConfig {
    QueueConfig {
        max_bytes: 1 << 20,
        max_age: Duration::from_secs(60),
        max_spans: None,
    }
}

fn to(destination: Destination) -> Output {
    Output {
        tee: None,
        destination,
        queue: roomy(),
    }
}

fn otlp(config: OtlpConfig) -> Output {
    to(Destination::Otlp(config))
}

fn dropped(metrics: &Metrics, reason: DropReason) -> u64 {
    metrics.spans_dropped.get(reason)
}

/// Polls `done` until it holds, failing the test after 20 s with `what`.
async fn eventually(what: &str, done: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// An address nothing listens on (connections are refused) until a test starts a
/// receiver there.
async fn unused_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

fn span_ids(requests: &[ExportTraceServiceRequest]) -> Vec<Vec<u8>> {
    requests
        .iter()
        .flat_map(|r| &r.resource_spans)
        .flat_map(|rs| &rs.scope_spans)
        .flat_map(|ss| &ss.spans)
        .map(|s| s.span_id.clone())
        .collect()
}

fn count(counter: &std::sync::atomic::AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

/// What the stand-in gRPC receiver saw, and how it answers: the next scripted error
/// while there is one, then success (with `reject` spans refused as a partial success).
#[derive(Default)]
struct GrpcReceiver {
    /// Requests it accepted.
    requests: Mutex<Vec<ExportTraceServiceRequest>>,
    /// Requests it answered with an error.
    refused: Mutex<Vec<ExportTraceServiceRequest>>,
    tenants: Mutex<Vec<String>>,
    reject: i64,
    errors: Mutex<VecDeque<tonic::Status>>,
}

#[tonic::async_trait]
impl TraceService for GrpcReceiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        if let Some(tenant) = request.metadata().get("x-tenant") {
            self.tenants
                .lock()
                .unwrap()
                .push(tenant.to_str().unwrap().to_owned());
        }
        if let Some(error) = self.errors.lock().unwrap().pop_front() {
            self.refused.lock().unwrap().push(request.into_inner());
            return Err(error);
        }
        self.requests.lock().unwrap().push(request.into_inner());
        let partial_success = (self.reject > 0).then(|| ExportTracePartialSuccess {
            rejected_spans: self.reject,
            error_message: "span too old".to_owned(),
        });
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success,
        }))
    }
}

async fn grpc_receiver(reject: i64) -> (Arc<GrpcReceiver>, String) {
    grpc_receiver_with(reject, false).await
}

/// With `tls`, the receiver speaks TLS with the test certificate in testdata/.
async fn grpc_receiver_with(reject: i64, tls: bool) -> (Arc<GrpcReceiver>, String) {
    let receiver = Arc::new(GrpcReceiver {
        reject,
        ..Default::default()
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = serve_grpc(Arc::clone(&receiver), listener, tls);
    (receiver, endpoint)
}

/// A plain gRPC receiver on `addr`, answering with `errors` first.
async fn grpc_receiver_on(addr: SocketAddr, errors: Vec<tonic::Status>) -> Arc<GrpcReceiver> {
    let receiver = Arc::new(GrpcReceiver {
        errors: Mutex::new(errors.into()),
        ..Default::default()
    });
    let listener = TcpListener::bind(addr).await.unwrap();
    serve_grpc(Arc::clone(&receiver), listener, false);
    receiver
}

fn serve_grpc(receiver: Arc<GrpcReceiver>, listener: TcpListener, tls: bool) -> String {
    let scheme = if tls { "https" } else { "http" };
    let endpoint = format!("{scheme}://{}", listener.local_addr().unwrap());
    let service = TraceServiceServer::from_arc(receiver);
    let server = tonic::transport::Server::builder();
    if !tls {
        tokio::spawn(server.serve_with_incoming(
            service,
            tonic::transport::server::TcpIncoming::from(listener),
        ));
        return endpoint;
    }
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_tls_config()));
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            // A client that does not trust the certificate gives up mid-handshake.
            if let Ok(stream) = acceptor.accept(stream).await {
                let _ = tx.send(Ok::<_, std::io::Error>(TlsIo(stream))).await;
            }
        }
    });
    tokio::spawn(
        server.serve_with_incoming(service, tokio_stream::wrappers::ReceiverStream::new(rx)),
    );
    endpoint
}

/// A TLS connection for tonic's server, which asks what it knows of the peer.
struct TlsIo(tokio_rustls::server::TlsStream<tokio::net::TcpStream>);

impl tonic::transport::server::Connected for TlsIo {
    type ConnectInfo = ();

    fn connect_info(&self) {}
}

impl tokio::io::AsyncRead for TlsIo {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for TlsIo {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

#[tokio::test]
async fn grpc_delivers_spans_with_headers() {
    let (receiver, endpoint) = grpc_receiver(0).await;
    let metrics = Arc::new(Metrics::default());
    let (handle, exporter) = spawn(
        otlp(otlp_config(Protocol::Grpc, endpoint)),
        Arc::clone(&metrics),
    )
    .unwrap();
    for span in spans(3) {
        handle.export(span);
    }
    exporter.shutdown(Duration::from_secs(10)).await;

    let requests = receiver.requests.lock().unwrap();
    assert_eq!(span_ids(&requests), [vec![1; 8], vec![2; 8], vec![3; 8]]);
    assert!(receiver.tenants.lock().unwrap().iter().all(|t| t == "shop"));
    assert_eq!(receiver.tenants.lock().unwrap().len(), requests.len());
    assert_eq!(count(&metrics.spans_exported), 3);
    assert_eq!(metrics.spans_dropped.total(), 0);
    assert_eq!(count(&metrics.export_failures), 0);
    assert_eq!(count(&metrics.export_queue_spans), 0);
    assert_eq!(count(&metrics.export_queue_bytes), 0);
}

#[tokio::test]
async fn spans_a_partial_success_refuses_count_as_rejected() {
    let (_receiver, endpoint) = grpc_receiver(1).await;
    let metrics = Arc::new(Metrics::default());
    let (handle, exporter) = spawn(
        otlp(otlp_config(Protocol::Grpc, endpoint)),
        Arc::clone(&metrics),
    )
    .unwrap();
    for span in spans(3) {
        handle.export(span);
    }
    exporter.shutdown(Duration::from_secs(10)).await;
    assert_eq!(count(&metrics.spans_exported), 2);
    assert_eq!(dropped(&metrics, DropReason::Rejected), 1);
    assert_eq!(metrics.spans_dropped.total(), 1);
}

/// The waits the exporter asked for between attempts, recorded instead of slept.
fn recorded_pauses() -> (Pause, Arc<Mutex<Vec<Duration>>>) {
    let waits = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&waits);
    let pause: Pause = Arc::new(move |wait| {
        seen.lock().unwrap().push(wait);
        Box::pin(std::future::ready(()))
    });
    (pause, waits)
}

/// The receiver goes down and comes back: the spans made meanwhile wait in the queue,
/// are retried, and each arrives exactly once.
async fn outage_then_recovery(protocol: Protocol) {
    let addr = unused_addr().await;
    let endpoint = match protocol {
        Protocol::Grpc => format!("http://{addr}"),
        Protocol::HttpProtobuf => format!("http://{addr}/v1/traces"),
    };
    let metrics = Arc::new(Metrics::default());
    let mut config = otlp_config(protocol, endpoint);
    config.batch.max_export_batch_size = 4;
    let (handle, exporter) = spawn(otlp(config), Arc::clone(&metrics)).unwrap();
    for span in spans_from(1, 6) {
        handle.export(span);
    }
    eventually("a few failed attempts", || {
        count(&metrics.export_failures) >= 3
    })
    .await;
    // More spans come while the receiver is still down.
    for span in spans_from(7, 6) {
        handle.export(span);
    }
    eventually("more failed attempts", || {
        count(&metrics.export_failures) >= 6
    })
    .await;
    assert_eq!(count(&metrics.spans_exported), 0);
    assert_eq!(
        metrics.spans_dropped.total(),
        0,
        "nothing dropped while down"
    );
    assert_eq!(count(&metrics.export_queue_spans), 12);
    assert!(count(&metrics.export_queue_bytes) > 12 * 20);

    let ids: Vec<Vec<u8>> = match protocol {
        Protocol::Grpc => {
            let receiver = grpc_receiver_on(addr, vec![]).await;
            eventually("all 12 spans delivered", || {
                count(&metrics.spans_exported) == 12
            })
            .await;
            exporter.shutdown(Duration::from_secs(10)).await;
            span_ids(&receiver.requests.lock().unwrap())
        }
        Protocol::HttpProtobuf => {
            let posts = http_receiver_on(addr, vec![], false).await;
            eventually("all 12 spans delivered", || {
                count(&metrics.spans_exported) == 12
            })
            .await;
            exporter.shutdown(Duration::from_secs(10)).await;
            let bodies: Vec<_> = posts
                .lock()
                .unwrap()
                .iter()
                .map(|p| p.body.clone())
                .collect();
            span_ids(&bodies)
        }
    };
    let expected: Vec<Vec<u8>> = (1..=12).map(|i| vec![i; 8]).collect();
    assert_eq!(
        ids, expected,
        "every span once, in the order they were made"
    );
    assert_eq!(count(&metrics.spans_exported), 12);
    assert_eq!(metrics.spans_dropped.total(), 0);
    assert_eq!(count(&metrics.export_queue_spans), 0);
}

#[tokio::test]
async fn grpc_spans_made_while_the_receiver_is_down_arrive_once_it_is_back() {
    outage_then_recovery(Protocol::Grpc).await;
}

#[tokio::test]
async fn http_spans_made_while_the_receiver_is_down_arrive_once_it_is_back() {
    outage_then_recovery(Protocol::HttpProtobuf).await;
}

#[tokio::test]
async fn spans_past_the_age_bound_are_dropped_as_expired_and_the_rest_delivered() {
    let addr = unused_addr().await;
    let metrics = Arc::new(Metrics::default());
    let output = Output {
        tee: None,
        destination: Destination::Otlp(otlp_config(
            Protocol::HttpProtobuf,
            format!("http://{addr}/v1/traces"),
        )),
        queue: QueueConfig {
            max_age: Duration::from_millis(300),
            ..roomy()
        },
    };
    let (handle, exporter) = spawn(output, Arc::clone(&metrics)).unwrap();
    for span in spans(5) {
        handle.export(span);
    }
    eventually("5 spans expired", || {
        dropped(&metrics, DropReason::Expired) == 5
    })
    .await;
    assert_eq!(count(&metrics.export_queue_spans), 0);
    assert_eq!(count(&metrics.export_queue_bytes), 0);

    let posts = http_receiver_on(addr, vec![], false).await;
    for span in spans_from(6, 2) {
        handle.export(span);
    }
    exporter.shutdown(Duration::from_secs(10)).await;
    let bodies: Vec<_> = posts
        .lock()
        .unwrap()
        .iter()
        .map(|p| p.body.clone())
        .collect();
    assert_eq!(span_ids(&bodies), [vec![6; 8], vec![7; 8]]);
    assert_eq!(count(&metrics.spans_exported), 2);
    assert_eq!(metrics.spans_dropped.total(), 5);
}

#[tokio::test]
async fn the_byte_bound_drops_and_counts_what_does_not_fit_without_blocking() {
    let addr = unused_addr().await;
    let size = OtlpItem::prepare(spans(1).remove(0)).1;
    let metrics = Arc::new(Metrics::default());
    let output = Output {
        tee: None,
        destination: Destination::Otlp(otlp_config(
            Protocol::HttpProtobuf,
            format!("http://{addr}/v1/traces"),
        )),
        queue: QueueConfig {
            max_bytes: 3 * size,
            ..roomy()
        },
    };
    let (handle, exporter) = spawn(output, Arc::clone(&metrics)).unwrap();
    // The test runtime has one thread: the export task cannot run until this loop
    // yields, so the queue takes 3 spans and the other 7 must be dropped at once.
    for span in spans(10) {
        handle.export(span);
    }
    assert_eq!(dropped(&metrics, DropReason::QueueFull), 7);
    assert_eq!(count(&metrics.export_queue_bytes), 3 * size as u64);
    eventually("a failed attempt", || count(&metrics.export_failures) >= 1).await;
    // Still full while the receiver is down: the batch being retried holds its room.
    handle.export(spans_from(11, 1).remove(0));
    assert_eq!(dropped(&metrics, DropReason::QueueFull), 8);

    let posts = http_receiver_on(addr, vec![], false).await;
    eventually("3 spans delivered", || count(&metrics.spans_exported) == 3).await;
    exporter.shutdown(Duration::from_secs(10)).await;
    let bodies: Vec<_> = posts
        .lock()
        .unwrap()
        .iter()
        .map(|p| p.body.clone())
        .collect();
    assert_eq!(span_ids(&bodies), [vec![1; 8], vec![2; 8], vec![3; 8]]);
    assert_eq!(metrics.spans_dropped.total(), 8);
    // After shutdown the handle still takes calls, and counts them as dropped.
    handle.export(spans(1).remove(0));
    assert_eq!(dropped(&metrics, DropReason::Shutdown), 1);
}

#[tokio::test]
async fn a_producer_that_can_wait_loses_nothing_to_a_small_queue() {
    let (posts, base) = http_receiver(vec![Reply::status(503)], false).await;
    let size = OtlpItem::prepare(spans(1).remove(0)).1;
    let metrics = Arc::new(Metrics::default());
    let mut config = otlp_config(Protocol::HttpProtobuf, format!("{base}/v1/traces"));
    config.batch.max_export_batch_size = 2;
    let output = Output {
        tee: None,
        destination: Destination::Otlp(config),
        queue: QueueConfig {
            max_bytes: 3 * size,
            ..roomy()
        },
    };
    let (handle, exporter) = spawn(output, Arc::clone(&metrics)).unwrap();
    // As `sonde replay` does: a thread of its own, faster than the receiver.
    let producer = std::thread::spawn(move || {
        for span in spans(20) {
            handle.export_waiting(span);
        }
    });
    tokio::task::spawn_blocking(move || producer.join().unwrap())
        .await
        .unwrap();
    exporter.shutdown(Duration::from_secs(10)).await;
    let bodies: Vec<_> = posts
        .lock()
        .unwrap()
        .iter()
        .skip(1)
        .map(|p| p.body.clone())
        .collect();
    let expected: Vec<Vec<u8>> = (1..=20).map(|i| vec![i; 8]).collect();
    assert_eq!(span_ids(&bodies), expected);
    assert_eq!(count(&metrics.spans_exported), 20);
    assert_eq!(metrics.spans_dropped.total(), 0);
}

#[tokio::test]
async fn retries_wait_longer_each_time_and_keep_the_batch_order() {
    let (posts, base) = http_receiver(
        vec![
            Reply::status(503),
            Reply::status(502),
            Reply::status(504),
            Reply::status(429),
        ],
        false,
    )
    .await;
    let metrics = Arc::new(Metrics::default());
    let mut config = otlp_config(Protocol::HttpProtobuf, format!("{base}/v1/traces"));
    config.batch.max_export_batch_size = 3;
    config.retry = RetryConfig {
        initial_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_millis(300),
    };
    let (pause, waits) = recorded_pauses();
    let (handle, exporter) = spawn_pausing_with(otlp(config), Arc::clone(&metrics), pause).unwrap();
    // Two full batches: 1-3, then 4-6.
    for span in spans(6) {
        handle.export(span);
    }
    exporter.shutdown(Duration::from_secs(10)).await;

    let posts = posts.lock().unwrap();
    let batches: Vec<Vec<Vec<u8>>> = posts
        .iter()
        .map(|p| span_ids(std::slice::from_ref(&p.body)))
        .collect();
    let first: Vec<Vec<u8>> = (1..=3).map(|i| vec![i; 8]).collect();
    let second: Vec<Vec<u8>> = (4..=6).map(|i| vec![i; 8]).collect();
    assert_eq!(
        batches,
        [
            first.clone(),
            first.clone(),
            first.clone(),
            first.clone(),
            first,
            second
        ],
        "the first batch is retried until delivered, and only then the second goes"
    );
    let waits = waits.lock().unwrap();
    assert_eq!(waits.len(), 4, "{waits:?}");
    let steps = [100, 200, 300, 300].map(Duration::from_millis);
    for (wait, step) in waits.iter().zip(steps) {
        assert!(
            *wait >= step / 2 && *wait <= step,
            "waits {waits:?} do not follow the steps {steps:?}"
        );
    }
    assert_eq!(count(&metrics.export_failures), 4);
    assert_eq!(count(&metrics.spans_exported), 6);
    assert_eq!(metrics.spans_dropped.total(), 0);
}

#[tokio::test]
async fn retry_after_from_the_receiver_is_honoured() {
    let (posts, base) = http_receiver(
        vec![
            Reply::status(503).retry_after("7"),
            Reply::status(429).retry_after(&httpdate::fmt_http_date(
                std::time::SystemTime::now() + Duration::from_secs(40),
            )),
        ],
        false,
    )
    .await;
    let metrics = Arc::new(Metrics::default());
    let config = otlp_config(Protocol::HttpProtobuf, format!("{base}/v1/traces"));
    let (pause, waits) = recorded_pauses();
    let (handle, exporter) = spawn_pausing_with(otlp(config), Arc::clone(&metrics), pause).unwrap();
    handle.export(spans(1).remove(0));
    exporter.shutdown(Duration::from_secs(10)).await;
    let waits = waits.lock().unwrap();
    assert_eq!(waits.len(), 2);
    assert_eq!(waits[0], Duration::from_secs(7));
    // An HTTP date has a resolution of one second.
    assert!(
        waits[1] > Duration::from_secs(38) && waits[1] <= Duration::from_secs(40),
        "{waits:?}"
    );
    assert_eq!(posts.lock().unwrap().len(), 3);
    assert_eq!(count(&metrics.spans_exported), 1);
}

#[tokio::test]
async fn grpc_resource_exhausted_is_retried_only_with_retry_info() {
    use tonic_types::{ErrorDetails, StatusExt};
    let addr = unused_addr().await;
    let asked = Duration::from_millis(1500);
    let receiver = grpc_receiver_on(
        addr,
        vec![
            tonic::Status::unavailable("restarting"),
            tonic::Status::with_error_details(
                tonic::Code::ResourceExhausted,
                "slow down",
                ErrorDetails::with_retry_info(Some(asked)),
            ),
            tonic::Status::resource_exhausted("out of memory, for good"),
        ],
    )
    .await;
    let metrics = Arc::new(Metrics::default());
    let mut config = otlp_config(Protocol::Grpc, format!("http://{addr}"));
    config.batch.max_export_batch_size = 2;
    let (pause, waits) = recorded_pauses();
    let (handle, exporter) = spawn_pausing_with(otlp(config), Arc::clone(&metrics), pause).unwrap();
    for span in spans(4) {
        handle.export(span);
    }
    exporter.shutdown(Duration::from_secs(10)).await;

    // Batch 1-2: UNAVAILABLE (retried), RESOURCE_EXHAUSTED with RetryInfo (retried
    // after the delay asked), then plain RESOURCE_EXHAUSTED: refused for good.
    let waits = waits.lock().unwrap();
    assert_eq!(waits.len(), 2, "{waits:?}");
    assert_eq!(waits[1], asked);
    assert_eq!(receiver.refused.lock().unwrap().len(), 3);
    assert_eq!(dropped(&metrics, DropReason::Rejected), 2);
    // Batch 3-4 is delivered.
    assert_eq!(
        span_ids(&receiver.requests.lock().unwrap()),
        [vec![3; 8], vec![4; 8]]
    );
    assert_eq!(count(&metrics.spans_exported), 2);
    assert_eq!(count(&metrics.export_failures), 3);
}

#[tokio::test]
async fn grpc_invalid_argument_is_rejected_at_once() {
    let addr = unused_addr().await;
    let receiver = grpc_receiver_on(addr, vec![tonic::Status::invalid_argument("bad span")]).await;
    let metrics = Arc::new(Metrics::default());
    let (pause, waits) = recorded_pauses();
    let (handle, exporter) = spawn_pausing_with(
        otlp(otlp_config(Protocol::Grpc, format!("http://{addr}"))),
        Arc::clone(&metrics),
        pause,
    )
    .unwrap();
    for span in spans(3) {
        handle.export(span);
    }
    exporter.shutdown(Duration::from_secs(10)).await;
    assert!(waits.lock().unwrap().is_empty(), "no retry");
    assert_eq!(receiver.refused.lock().unwrap().len(), 1);
    assert_eq!(dropped(&metrics, DropReason::Rejected), 3);
    assert_eq!(count(&metrics.spans_exported), 0);
}

/// How the stand-in HTTP receiver answers one POST.
#[derive(Clone)]
struct Reply {
    /// 0: never answer.
    status: u16,
    retry_after: Option<String>,
}

impl Reply {
    fn status(status: u16) -> Self {
        Reply {
            status,
            retry_after: None,
        }
    }

    fn retry_after(mut self, value: &str) -> Self {
        self.retry_after = Some(value.to_owned());
        self
    }
}

struct Post {
    path: String,
    content_type: String,
    tenant: String,
    body: ExportTraceServiceRequest,
}

/// A stand-in OTLP/HTTP receiver answering each POST with the next reply of
/// `script` (200 once it runs out). With `tls`, it speaks HTTPS with the test
/// certificate in testdata/.
async fn http_receiver(script: Vec<Reply>, tls: bool) -> (Arc<Mutex<Vec<Post>>>, String) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let scheme = if tls { "https" } else { "http" };
    let base = format!("{scheme}://{}", listener.local_addr().unwrap());
    (serve_http(listener, script, tls), base)
}

/// The same, on `addr`.
async fn http_receiver_on(
    addr: SocketAddr,
    script: Vec<Reply>,
    tls: bool,
) -> Arc<Mutex<Vec<Post>>> {
    serve_http(TcpListener::bind(addr).await.unwrap(), script, tls)
}

fn serve_http(listener: TcpListener, script: Vec<Reply>, tls: bool) -> Arc<Mutex<Vec<Post>>> {
    let acceptor = tls.then(|| tokio_rustls::TlsAcceptor::from(Arc::new(server_tls_config())));
    let posts = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&posts);
    tokio::spawn(async move {
        let mut script = script.into_iter();
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            match &acceptor {
                // A client that does not trust the certificate gives up mid-handshake.
                Some(acceptor) => match acceptor.accept(stream).await {
                    Ok(stream) => {
                        let reply = script.next().unwrap_or(Reply::status(200));
                        answer_post(stream, reply, &seen).await
                    }
                    Err(_) => continue,
                },
                None => {
                    let reply = script.next().unwrap_or(Reply::status(200));
                    answer_post(stream, reply, &seen).await
                }
            }
        }
    });
    posts
}

async fn answer_post<S>(mut stream: S, reply: Reply, seen: &Mutex<Vec<Post>>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let mut buf = Vec::new();
    let (head_len, post) = loop {
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.unwrap();
        assert!(n > 0, "client closed before sending a full request");
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut request = httparse::Request::new(&mut headers);
        if let httparse::Status::Complete(len) = request.parse(&buf).unwrap() {
            let header = |name: &str| {
                request
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case(name))
                    .map(|h| String::from_utf8_lossy(h.value).into_owned())
                    .unwrap_or_default()
            };
            let length: usize = header("content-length").parse().unwrap();
            break (
                len,
                (
                    request.path.unwrap().to_owned(),
                    header("content-type"),
                    header("x-tenant"),
                    length,
                ),
            );
        }
    };
    let (path, content_type, tenant, length) = post;
    while buf.len() < head_len + length {
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.unwrap();
        assert!(n > 0, "client closed mid-body");
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = ExportTraceServiceRequest::decode(&buf[head_len..head_len + length]).unwrap();
    seen.lock().unwrap().push(Post {
        path,
        content_type,
        tenant,
        body,
    });
    if reply.status == 0 {
        // Hold the connection open without answering.
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            drop(stream);
        });
        return;
    }
    let retry_after = reply
        .retry_after
        .map(|v| format!("Retry-After: {v}\r\n"))
        .unwrap_or_default();
    let response = format!(
        "HTTP/1.1 {} X\r\nContent-Type: application/x-protobuf\r\n{retry_after}\
         Content-Length: 0\r\nConnection: close\r\n\r\n",
        reply.status
    );
    stream.write_all(response.as_bytes()).await.unwrap();
    stream.shutdown().await.unwrap();
}

fn testdata(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("src/export/testdata")
        .join(name)
}

fn server_tls_config() -> rustls::ServerConfig {
    rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(pem_certs("server.pem"), server_key())
        .unwrap()
}

/// The certificates of a PEM file in testdata/ (server.pem is signed by ca.pem).
fn pem_certs(name: &str) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_file_iter(testdata(name))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap()
}

fn server_key() -> rustls::pki_types::PrivateKeyDer<'static> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::PrivateKeyDer::from_pem_file(testdata("server.key")).unwrap()
}

#[tokio::test]
async fn http_retries_503_and_delivers_the_batch_once() {
    let (posts, base) = http_receiver(vec![Reply::status(503), Reply::status(503)], false).await;
    let metrics = Arc::new(Metrics::default());
    let config = otlp_config(Protocol::HttpProtobuf, format!("{base}/v1/traces"));
    let (handle, exporter) = spawn(otlp(config), Arc::clone(&metrics)).unwrap();
    for span in spans(3) {
        handle.export(span);
    }
    exporter.shutdown(Duration::from_secs(10)).await;

    let posts = posts.lock().unwrap();
    assert_eq!(posts.len(), 3, "two refused attempts, then the delivery");
    for post in posts.iter() {
        assert_eq!(post.path, "/v1/traces");
        assert_eq!(post.content_type, "application/x-protobuf");
        assert_eq!(post.tenant, "shop");
        assert_eq!(
            post.body, posts[0].body,
            "every attempt carries the same batch"
        );
    }
    assert_eq!(span_ids(std::slice::from_ref(&posts[2].body)).len(), 3);
    assert_eq!(count(&metrics.export_failures), 2);
    assert_eq!(count(&metrics.spans_exported), 3);
    assert_eq!(metrics.spans_dropped.total(), 0);
}

#[tokio::test]
async fn http_does_not_retry_a_bad_request_and_counts_it_rejected() {
    let (posts, base) = http_receiver(vec![Reply::status(400)], false).await;
    let metrics = Arc::new(Metrics::default());
    let config = otlp_config(Protocol::HttpProtobuf, format!("{base}/v1/traces"));
    let (handle, exporter) = spawn(otlp(config), Arc::clone(&metrics)).unwrap();
    for span in spans(2) {
        handle.export(span);
    }
    exporter.shutdown(Duration::from_secs(10)).await;
    assert_eq!(posts.lock().unwrap().len(), 1);
    assert_eq!(count(&metrics.export_failures), 1);
    assert_eq!(dropped(&metrics, DropReason::Rejected), 2);
    assert_eq!(metrics.spans_dropped.total(), 2);
    assert_eq!(count(&metrics.spans_exported), 0);
}

#[tokio::test]
async fn shutdown_gives_up_at_the_deadline_and_counts_what_is_lost() {
    let (_posts, base) = http_receiver(vec![Reply::status(0)], false).await;
    let metrics = Arc::new(Metrics::default());
    let config = otlp_config(Protocol::HttpProtobuf, format!("{base}/v1/traces"));
    let (handle, exporter) = spawn(otlp(config), Arc::clone(&metrics)).unwrap();
    for span in spans(5) {
        handle.export(span);
    }
    let started = std::time::Instant::now();
    exporter.shutdown(Duration::from_millis(300)).await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "shutdown overran its deadline"
    );
    assert_eq!(dropped(&metrics, DropReason::Shutdown), 5);
    assert_eq!(metrics.spans_dropped.total(), 5);
    assert_eq!(count(&metrics.spans_exported), 0);
    assert_eq!(count(&metrics.export_queue_spans), 0);
}

#[tokio::test]
async fn shutdown_with_the_receiver_down_keeps_retrying_until_the_deadline() {
    let addr = unused_addr().await;
    let metrics = Arc::new(Metrics::default());
    let config = otlp_config(Protocol::HttpProtobuf, format!("http://{addr}/v1/traces"));
    let (handle, exporter) = spawn(otlp(config), Arc::clone(&metrics)).unwrap();
    for span in spans(4) {
        handle.export(span);
    }
    let shutdown = tokio::spawn(exporter.shutdown(Duration::from_secs(10)));
    eventually("a failed attempt", || count(&metrics.export_failures) >= 2).await;
    // The receiver comes back before the deadline: nothing is lost.
    let posts = http_receiver_on(addr, vec![], false).await;
    shutdown.await.unwrap();
    assert_eq!(posts.lock().unwrap().len(), 1);
    assert_eq!(count(&metrics.spans_exported), 4);
    assert_eq!(metrics.spans_dropped.total(), 0);
}

/// Exports 3 spans to an https receiver, trusting the test CA or not; answers
/// (spans exported, spans dropped as expired, failures counted as an unknown issuer).
async fn export_over_tls(
    protocol: Protocol,
    endpoint: String,
    trust_test_ca: bool,
) -> (u64, u64, bool) {
    let metrics = Arc::new(Metrics::default());
    let mut config = otlp_config(protocol, endpoint);
    config.ca_file = trust_test_ca.then(|| testdata("ca.pem"));
    // An untrusted server is retried like one that is down, until the spans expire.
    let output = Output {
        tee: None,
        destination: Destination::Otlp(config),
        queue: QueueConfig {
            max_age: Duration::from_millis(300),
            ..roomy()
        },
    };
    let (handle, exporter) = spawn(output, Arc::clone(&metrics)).unwrap();
    for span in spans(3) {
        handle.export(span);
    }
    exporter.shutdown(Duration::from_secs(10)).await;
    assert_eq!(
        metrics.spans_dropped.total(),
        dropped(&metrics, DropReason::Expired)
    );
    let unknown_issuer = crate::export::tls::TlsFailure::UnknownIssuer as usize;
    (
        count(&metrics.spans_exported),
        dropped(&metrics, DropReason::Expired),
        count(&metrics.export_tls_failures[unknown_issuer]) > 0,
    )
}

#[tokio::test]
async fn grpc_over_tls_verifies_the_server_against_the_configured_roots() {
    let (receiver, endpoint) = grpc_receiver_with(0, true).await;
    assert_eq!(
        export_over_tls(Protocol::Grpc, endpoint.clone(), false).await,
        (0, 3, true)
    );
    assert!(
        receiver.requests.lock().unwrap().is_empty(),
        "an untrusted server got spans"
    );
    assert_eq!(
        export_over_tls(Protocol::Grpc, endpoint, true).await,
        (3, 0, false)
    );
    assert_eq!(span_ids(&receiver.requests.lock().unwrap()).len(), 3);
}

#[tokio::test]
async fn http_over_tls_verifies_the_server_against_the_configured_roots() {
    let (posts, base) = http_receiver(vec![], true).await;
    let endpoint = format!("{base}/v1/traces");
    assert_eq!(
        export_over_tls(Protocol::HttpProtobuf, endpoint.clone(), false).await,
        (0, 3, true)
    );
    assert!(
        posts.lock().unwrap().is_empty(),
        "an untrusted server got spans"
    );
    assert_eq!(
        export_over_tls(Protocol::HttpProtobuf, endpoint, true).await,
        (3, 0, false)
    );
    assert_eq!(posts.lock().unwrap().len(), 1);
}

/// An https receiver that finishes each handshake (asking for a client certificate if
/// `asks`, and taking none) and then resets the connection without a word: what a TLS
/// 1.3 receiver that refuses the client's certificate looks like to the client when its
/// alert is lost under the client's first request (the reset throws the alert away).
async fn resetting_receiver(asks: bool) -> SocketAddr {
    let mut config = server_tls_config();
    if asks {
        let mut roots = rustls::RootCertStore::empty();
        roots.add_parsable_certificates(pem_certs("ca.pem"));
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .allow_unauthenticated()
        .build()
        .unwrap();
        config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(pem_certs("server.pem"), server_key())
        .unwrap();
    }
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            if let Ok(mut tls) = acceptor.accept(stream).await {
                // Wait for the client's first bytes, then reset.
                let mut byte = [0u8; 1];
                let _ = tls.read(&mut byte).await;
                let (tcp, _) = tls.into_inner();
                tcp.set_zero_linger().unwrap();
                drop(tcp);
            }
        }
    });
    addr
}

/// Exports to `endpoint` until a failure is counted; answers the TLS failure causes
/// counted by then.
async fn tls_failures_exporting_to(protocol: Protocol, endpoint: String) -> Vec<&'static str> {
    use crate::export::tls::TlsFailure;
    let metrics = Arc::new(Metrics::default());
    let mut config = otlp_config(protocol, endpoint);
    config.ca_file = Some(testdata("ca.pem"));
    let (handle, exporter) = spawn(to(Destination::Otlp(config)), Arc::clone(&metrics)).unwrap();
    for span in spans(3) {
        handle.export(span);
    }
    eventually("a failed export", || count(&metrics.export_failures) >= 1).await;
    drop(exporter);
    TlsFailure::ALL
        .iter()
        .filter(|&&cause| count(&metrics.export_tls_failures[cause as usize]) > 0)
        .map(|cause| cause.label())
        .collect()
}

#[tokio::test]
async fn a_receiver_that_asked_for_a_client_certificate_and_reset_is_counted_as_refusing_it() {
    for protocol in [Protocol::Grpc, Protocol::HttpProtobuf] {
        let asks = resetting_receiver(true).await;
        let causes = tls_failures_exporting_to(protocol, format!("https://{asks}")).await;
        assert_eq!(causes, ["client_certificate_rejected"], "{protocol:?}");
        // A reset from a receiver that never asked is no certificate's fault.
        let silent = resetting_receiver(false).await;
        let causes = tls_failures_exporting_to(protocol, format!("https://{silent}")).await;
        assert!(causes.is_empty(), "{protocol:?}: {causes:?}");
    }
}

#[tokio::test]
async fn a_failed_file_write_is_counted_as_write_failed() {
    let metrics = Arc::new(Metrics::default());
    // Every write to /dev/full fails with ENOSPC, like a full disk.
    let (handle, exporter) = spawn(
        to(Destination::OtlpJson {
            path: PathBuf::from("/dev/full"),
        }),
        Arc::clone(&metrics),
    )
    .unwrap();
    for span in spans(3) {
        handle.export(span);
    }
    exporter.shutdown(Duration::from_secs(10)).await;
    assert_eq!(dropped(&metrics, DropReason::WriteFailed), 3);
    assert_eq!(count(&metrics.export_failures), 1);
    assert_eq!(count(&metrics.spans_exported), 0);
}

#[tokio::test]
async fn otlp_json_file_gets_one_request_per_line_and_is_appended_to() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spans.jsonl");
    for round in 0..2 {
        let metrics = Arc::new(Metrics::default());
        let (handle, exporter) = spawn(
            to(Destination::OtlpJson { path: path.clone() }),
            Arc::clone(&metrics),
        )
        .unwrap();
        for span in spans(2) {
            handle.export(span);
        }
        exporter.shutdown(Duration::from_secs(10)).await;
        assert_eq!(count(&metrics.spans_exported), 2, "round {round}");
    }
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.ends_with('\n'));
    let mut ids = HashSet::new();
    let mut total = 0;
    for line in text.lines() {
        let request: ExportTraceServiceRequest = serde_json::from_str(line).unwrap();
        let value: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(
            value["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["traceId"],
            "07".repeat(16)
        );
        for id in span_ids(std::slice::from_ref(&request)) {
            ids.insert(id);
            total += 1;
        }
    }
    assert_eq!(total, 4, "both rounds' spans are in the file:\n{text}");
    assert_eq!(ids.len(), 2);
}

#[tokio::test]
async fn an_unwritable_output_file_is_a_clear_error() {
    let err = spawn(
        to(Destination::OtlpJson {
            path: PathBuf::from("/nonexistent-dir/spans.jsonl"),
        }),
        Arc::new(Metrics::default()),
    )
    .err()
    .expect("opening a file in a missing directory must fail");
    let message = err.to_string();
    assert!(
        message.contains("/nonexistent-dir/spans.jsonl"),
        "{message}"
    );
    assert!(message.contains("directory exists"), "{message}");
}

#[test]
fn spawning_outside_a_runtime_says_so() {
    let err = spawn(to(Destination::Stdout), Arc::new(Metrics::default()))
        .err()
        .unwrap();
    assert!(matches!(err, ExportError::NoRuntime));
}

fn span_ids_in(path: &std::path::Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap();
    let requests: Vec<ExportTraceServiceRequest> = text
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let mut ids: Vec<String> = span_ids(&requests)
        .into_iter()
        .map(|id| format!("{id:?}"))
        .collect();
    ids.sort();
    ids
}

#[tokio::test]
async fn a_tee_file_gets_every_span_the_main_output_gets_each_counted_once() {
    let dir = tempfile::tempdir().unwrap();
    let (main, copy) = (dir.path().join("main.jsonl"), dir.path().join("copy.jsonl"));
    let metrics = Arc::new(Metrics::default());
    let mut output = to(Destination::OtlpJson { path: main.clone() });
    output.tee = Some(copy.clone());
    let (handle, exporter) = spawn(output, Arc::clone(&metrics)).unwrap();
    for span in spans(5) {
        handle.export(span);
    }
    exporter.shutdown(Duration::from_secs(10)).await;
    assert_eq!(count(&metrics.spans_exported), 5);
    let tee = metrics
        .tee
        .get()
        .expect("the tee's counters are registered");
    assert_eq!(count(&tee.spans_exported), 5);
    assert_eq!(span_ids_in(&main).len(), 5);
    assert_eq!(span_ids_in(&main), span_ids_in(&copy));
}

#[tokio::test]
async fn a_failing_tee_file_loses_nothing_of_the_main_output_and_counts_its_drops() {
    let dir = tempfile::tempdir().unwrap();
    let main = dir.path().join("main.jsonl");
    let metrics = Arc::new(Metrics::default());
    let mut output = to(Destination::OtlpJson { path: main.clone() });
    output.tee = Some(PathBuf::from("/dev/full"));
    let (handle, exporter) = spawn(output, Arc::clone(&metrics)).unwrap();
    for span in spans(3) {
        handle.export(span);
    }
    exporter.shutdown(Duration::from_secs(10)).await;
    assert_eq!(count(&metrics.spans_exported), 3);
    assert_eq!(dropped(&metrics, DropReason::WriteFailed), 0);
    let tee = metrics.tee.get().unwrap();
    assert_eq!(dropped(tee, DropReason::WriteFailed), 3);
    assert_eq!(span_ids_in(&main).len(), 3);
}

#[test]
fn an_unopenable_tee_file_is_a_clear_error() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _guard = rt.enter();
    let mut output = to(Destination::Stdout);
    output.tee = Some(PathBuf::from("/nonexistent-dir/copy.jsonl"));
    let err = spawn(output, Arc::new(Metrics::default()))
        .err()
        .expect("refused");
    assert!(
        err.to_string().contains("/nonexistent-dir/copy.jsonl"),
        "{err}"
    );
}
