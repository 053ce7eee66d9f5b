//! The exporters end to end at the unit level: spans in through an
//! [`ExporterHandle`], out to a file or to an OTLP receiver on 127.0.0.1.
//!
//! The receivers here are stand-ins: a minimal tonic TraceService and a minimal
//! HTTP/1.1 server, enough to see what arrives and to script failures. They check
//! sonde's side of the protocol only; export to the real Jaeger is tested end to end
//! elsewhere.

use std::collections::HashSet;
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
    let resource = Arc::new(Resource {
        service_name: "shop-api".to_owned(),
        pid: 1234,
        executable_name: "python3".to_owned(),
        host_name: "node-1".to_owned(),
        attributes: vec![],
    });
    (1..=n)
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
        batch: BatchConfig {
            max_queue_size: 64,
            max_export_batch_size: 64,
            scheduled_delay: Duration::from_millis(20),
        },
        retry: RetryConfig {
            max_attempts: 4,
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(50),
        },
    }
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

/// What the stand-in gRPC receiver saw, and the partial success it answers with.
#[derive(Default)]
struct GrpcReceiver {
    requests: Mutex<Vec<ExportTraceServiceRequest>>,
    tenants: Mutex<Vec<String>>,
    reject: i64,
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
    let scheme = if tls { "https" } else { "http" };
    let endpoint = format!("{scheme}://{}", listener.local_addr().unwrap());
    let service = TraceServiceServer::from_arc(Arc::clone(&receiver));
    let mut server = tonic::transport::Server::builder();
    if tls {
        let identity = tonic::transport::Identity::from_pem(
            std::fs::read(testdata("server.pem")).unwrap(),
            std::fs::read(testdata("server.key")).unwrap(),
        );
        server = server
            .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
            .unwrap();
    }
    tokio::spawn(server.serve_with_incoming(
        service,
        tonic::transport::server::TcpIncoming::from(listener),
    ));
    (receiver, endpoint)
}

#[tokio::test]
async fn grpc_delivers_spans_with_headers() {
    let (receiver, endpoint) = grpc_receiver(0).await;
    let metrics = Arc::new(Metrics::default());
    let (handle, exporter) = spawn(
        Output::Otlp(otlp_config(Protocol::Grpc, endpoint)),
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
    assert_eq!(count(&metrics.spans_dropped), 0);
    assert_eq!(count(&metrics.export_failures), 0);
}

#[tokio::test]
async fn spans_the_receiver_refuses_count_as_dropped() {
    let (_receiver, endpoint) = grpc_receiver(1).await;
    let metrics = Arc::new(Metrics::default());
    let (handle, exporter) = spawn(
        Output::Otlp(otlp_config(Protocol::Grpc, endpoint)),
        Arc::clone(&metrics),
    )
    .unwrap();
    for span in spans(3) {
        handle.export(span);
    }
    exporter.shutdown(Duration::from_secs(10)).await;
    assert_eq!(count(&metrics.spans_exported), 2);
    assert_eq!(count(&metrics.spans_dropped), 1);
}

/// One POST the stand-in HTTP receiver saw.
struct Post {
    path: String,
    content_type: String,
    tenant: String,
    body: ExportTraceServiceRequest,
}

/// A stand-in OTLP/HTTP receiver answering each POST with the next status of
/// `script` (200 once it runs out); status 0 means never answer. With `tls`, it
/// speaks HTTPS with the test certificate in testdata/.
async fn http_receiver(script: Vec<u16>, tls: bool) -> (Arc<Mutex<Vec<Post>>>, String) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let scheme = if tls { "https" } else { "http" };
    let base = format!("{scheme}://{}", listener.local_addr().unwrap());
    let acceptor = tls.then(|| tokio_rustls::TlsAcceptor::from(Arc::new(server_tls_config())));
    let posts = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&posts);
    tokio::spawn(async move {
        let mut script = script.into_iter();
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let status = script.next().unwrap_or(200);
            match &acceptor {
                // A client that does not trust the certificate gives up mid-handshake.
                Some(acceptor) => match acceptor.accept(stream).await {
                    Ok(stream) => answer_post(stream, status, &seen).await,
                    Err(_) => continue,
                },
                None => answer_post(stream, status, &seen).await,
            }
        }
    });
    (posts, base)
}

async fn answer_post<S>(mut stream: S, status: u16, seen: &Mutex<Vec<Post>>)
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
    if status == 0 {
        // Hold the connection open without answering.
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            drop(stream);
        });
        return;
    }
    let response = format!(
        "HTTP/1.1 {status} X\r\nContent-Type: application/x-protobuf\r\n\
         Content-Length: 0\r\nConnection: close\r\n\r\n"
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
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(testdata("server.pem"))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(testdata("server.key")).unwrap();
    rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap()
}

#[tokio::test]
async fn http_retries_503_and_delivers_the_batch_once() {
    let (posts, base) = http_receiver(vec![503, 503], false).await;
    let metrics = Arc::new(Metrics::default());
    let config = otlp_config(Protocol::HttpProtobuf, format!("{base}/v1/traces"));
    let (handle, exporter) = spawn(Output::Otlp(config), Arc::clone(&metrics)).unwrap();
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
    assert_eq!(count(&metrics.spans_dropped), 0);
}

#[tokio::test]
async fn http_does_not_retry_a_bad_request() {
    let (posts, base) = http_receiver(vec![400], false).await;
    let metrics = Arc::new(Metrics::default());
    let config = otlp_config(Protocol::HttpProtobuf, format!("{base}/v1/traces"));
    let (handle, exporter) = spawn(Output::Otlp(config), Arc::clone(&metrics)).unwrap();
    for span in spans(2) {
        handle.export(span);
    }
    exporter.shutdown(Duration::from_secs(10)).await;
    assert_eq!(posts.lock().unwrap().len(), 1);
    assert_eq!(count(&metrics.export_failures), 1);
    assert_eq!(count(&metrics.spans_dropped), 2);
    assert_eq!(count(&metrics.spans_exported), 0);
}

#[tokio::test]
async fn an_unreachable_receiver_is_retried_a_bounded_number_of_times() {
    // A port that was just free: connecting is refused.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}/v1/traces", listener.local_addr().unwrap());
    drop(listener);
    let metrics = Arc::new(Metrics::default());
    let config = otlp_config(Protocol::HttpProtobuf, endpoint);
    let attempts = u64::from(config.retry.max_attempts);
    let (handle, exporter) = spawn(Output::Otlp(config), Arc::clone(&metrics)).unwrap();
    handle.export(spans(1).remove(0));
    exporter.shutdown(Duration::from_secs(10)).await;
    assert_eq!(count(&metrics.export_failures), attempts);
    assert_eq!(count(&metrics.spans_dropped), 1);
}

#[tokio::test]
async fn a_full_queue_drops_and_counts_without_blocking() {
    let (posts, base) = http_receiver(vec![], false).await;
    let metrics = Arc::new(Metrics::default());
    let mut config = otlp_config(Protocol::HttpProtobuf, format!("{base}/v1/traces"));
    config.batch.max_queue_size = 4;
    let (handle, exporter) = spawn(Output::Otlp(config), Arc::clone(&metrics)).unwrap();
    // The test runtime has one thread: the export task cannot run until this loop
    // yields, so the queue takes 4 spans and the other 16 must be dropped at once.
    for span in spans(20) {
        handle.export(span);
    }
    assert_eq!(count(&metrics.spans_dropped), 16);
    exporter.shutdown(Duration::from_secs(10)).await;
    assert_eq!(count(&metrics.spans_exported), 4);
    assert_eq!(
        span_ids(
            &posts
                .lock()
                .unwrap()
                .iter()
                .map(|p| p.body.clone())
                .collect::<Vec<_>>()
        )
        .len(),
        4
    );
    // After shutdown the handle still accepts calls, and counts them as dropped.
    handle.export(spans(1).remove(0));
    assert_eq!(count(&metrics.spans_dropped), 17);
}

#[tokio::test]
async fn shutdown_gives_up_at_the_deadline_and_counts_what_is_lost() {
    let (_posts, base) = http_receiver(vec![0], false).await;
    let metrics = Arc::new(Metrics::default());
    let config = otlp_config(Protocol::HttpProtobuf, format!("{base}/v1/traces"));
    let (handle, exporter) = spawn(Output::Otlp(config), Arc::clone(&metrics)).unwrap();
    for span in spans(5) {
        handle.export(span);
    }
    let started = std::time::Instant::now();
    exporter.shutdown(Duration::from_millis(300)).await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "shutdown overran its deadline"
    );
    assert_eq!(count(&metrics.spans_dropped), 5);
    assert_eq!(count(&metrics.spans_exported), 0);
}

/// Exports 3 spans to an https receiver, trusting the test CA or not; answers
/// (spans exported, spans dropped).
async fn export_over_tls(protocol: Protocol, endpoint: String, trust_test_ca: bool) -> (u64, u64) {
    let metrics = Arc::new(Metrics::default());
    let mut config = otlp_config(protocol, endpoint);
    config.ca_file = trust_test_ca.then(|| testdata("ca.pem"));
    config.retry.max_attempts = 1;
    let (handle, exporter) = spawn(Output::Otlp(config), Arc::clone(&metrics)).unwrap();
    for span in spans(3) {
        handle.export(span);
    }
    exporter.shutdown(Duration::from_secs(10)).await;
    (
        count(&metrics.spans_exported),
        count(&metrics.spans_dropped),
    )
}

#[tokio::test]
async fn grpc_over_tls_verifies_the_server_against_the_configured_roots() {
    let (receiver, endpoint) = grpc_receiver_with(0, true).await;
    assert_eq!(
        export_over_tls(Protocol::Grpc, endpoint.clone(), false).await,
        (0, 3)
    );
    assert!(
        receiver.requests.lock().unwrap().is_empty(),
        "an untrusted server got spans"
    );
    assert_eq!(
        export_over_tls(Protocol::Grpc, endpoint, true).await,
        (3, 0)
    );
    assert_eq!(span_ids(&receiver.requests.lock().unwrap()).len(), 3);
}

#[tokio::test]
async fn http_over_tls_verifies_the_server_against_the_configured_roots() {
    let (posts, base) = http_receiver(vec![], true).await;
    let endpoint = format!("{base}/v1/traces");
    assert_eq!(
        export_over_tls(Protocol::HttpProtobuf, endpoint.clone(), false).await,
        (0, 3)
    );
    assert!(
        posts.lock().unwrap().is_empty(),
        "an untrusted server got spans"
    );
    assert_eq!(
        export_over_tls(Protocol::HttpProtobuf, endpoint, true).await,
        (3, 0)
    );
    assert_eq!(posts.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn otlp_json_file_gets_one_request_per_line_and_is_appended_to() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spans.jsonl");
    for round in 0..2 {
        let metrics = Arc::new(Metrics::default());
        let (handle, exporter) = spawn(
            Output::OtlpJson { path: path.clone() },
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
        Output::OtlpJson {
            path: PathBuf::from("/nonexistent-dir/spans.jsonl"),
        },
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
    let err = spawn(Output::Stdout, Arc::new(Metrics::default()))
        .err()
        .unwrap();
    assert!(matches!(err, ExportError::NoRuntime));
}
