//! Sending one `ExportTraceServiceRequest`, already encoded: OTLP/gRPC on tonic (the
//! call opentelemetry-proto's generated client makes, with the bytes passed through
//! as they are), or OTLP/HTTP protobuf with reqwest. Both over rustls (ring
//! provider) with the roots, client certificate and server name [`super::tls`] reads.
//!
//! A send answers whether a failure is worth retrying, as the OTLP specification
//! says: gRPC `CANCELLED`, `DEADLINE_EXCEEDED`, `ABORTED`, `OUT_OF_RANGE`,
//! `UNAVAILABLE` and `DATA_LOSS`, and `RESOURCE_EXHAUSTED` only when the server sends
//! `RetryInfo`; HTTP 429, 502, 503 and 504, and failures to connect or to get an
//! answer in time. The delay a receiver asks for (`RetryInfo`, `Retry-After` in
//! seconds or as a date) comes along. Retrying is the caller's.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::{Buf, BufMut, Bytes};
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
use prost::Message;
use rustls::RootCertStore;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tonic::codegen::http::Uri;
use tonic::metadata::{AsciiMetadataKey, AsciiMetadataValue};
use tonic::transport::{Channel, Endpoint};
use tonic_types::StatusExt;

use super::ExportError;
use super::config::{OtlpConfig, Protocol};
use super::tls::{self, ClientCert, Identity};

const USER_AGENT: &str = concat!("sonde/", env!("CARGO_PKG_VERSION"));
/// The OTLP trace service's one method.
const GRPC_EXPORT_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

/// A message already encoded, which tonic's prost codec sends as it is. Only ever
/// encoded: decoding one skips every field.
#[derive(Clone, Debug, Default)]
struct Encoded(Bytes);

impl Message for Encoded {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        buf.put_slice(&self.0);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: prost::encoding::WireType,
        buf: &mut impl Buf,
        ctx: prost::encoding::DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        prost::encoding::skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        self.0.len()
    }

    fn clear(&mut self) {
        self.0.clear();
    }
}

/// What a delivered request came back with.
#[derive(Debug, Default, PartialEq)]
pub(super) struct Delivered {
    /// Spans the receiver accepted the request but refused (OTLP partial success).
    pub rejected: u64,
    pub message: String,
}

/// Why a send failed.
#[derive(Debug)]
pub(super) enum SendError {
    /// Worth another attempt: the receiver is down, overloaded or unreachable.
    Transient {
        reason: String,
        retry_after: Option<Duration>,
    },
    /// Would fail again: the request or the configuration is wrong.
    Permanent(String),
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::Transient { reason, .. } | SendError::Permanent(reason) => {
                f.write_str(reason)
            }
        }
    }
}

pub(super) struct Transport {
    protocol: Sender,
    /// The client certificate TLS handshakes offer, and how often they were asked for
    /// one (https only).
    cert: Option<Arc<ClientCert>>,
}

enum Sender {
    Grpc {
        client: tonic::client::Grpc<Channel>,
        metadata: Vec<(AsciiMetadataKey, AsciiMetadataValue)>,
    },
    Http {
        client: reqwest::Client,
        url: reqwest::Url,
    },
}

/// Connects the gRPC channel to an https endpoint: TCP, then TLS on the rustls config
/// OTLP/HTTP uses too (offering `h2`), so both protocols verify alike and count the
/// handshakes that asked for a client certificate.
#[derive(Clone)]
struct TlsConnector {
    tls: tokio_rustls::TlsConnector,
    /// `--otlp-server-name`, sent as SNI; the endpoint's host otherwise.
    name: Option<ServerName<'static>>,
}

impl tower_service::Service<Uri> for TlsConnector {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let tls = self.tls.clone();
        let name = self.name.clone();
        Box::pin(async move {
            let invalid = |what: String| {
                std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{uri}: {what}"))
            };
            let host = uri
                .host()
                .ok_or_else(|| invalid("no host".to_owned()))?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            let port = uri.port_u16().unwrap_or(443);
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let name = match name {
                Some(name) => name,
                None => ServerName::try_from(host).map_err(|e| invalid(e.to_string()))?,
            };
            Ok(TokioIo::new(tls.connect(name, tcp).await?))
        })
    }
}

impl Transport {
    /// A transport for `config`. Connects lazily: a collector that is down at start-up
    /// is a failed (and retried) export, not a failed start.
    pub fn new(config: &OtlpConfig) -> Result<Self, ExportError> {
        let invalid = |reason: String| ExportError::InvalidEndpoint {
            endpoint: config.endpoint.clone(),
            reason,
        };
        let https = config.endpoint.starts_with("https:");
        let roots = if https {
            tls::root_store(config.ca_file.as_deref())?
        } else {
            RootCertStore::empty()
        };
        let identity = match (&config.client_auth, https) {
            (Some(auth), true) => Some(Identity::load(auth)?),
            _ => None,
        };
        let cert = https.then(|| ClientCert::new(identity.as_ref()));
        let protocol = match config.protocol {
            Protocol::Grpc => {
                let endpoint = Endpoint::from_shared(config.endpoint.clone())
                    .map_err(|e| invalid(e.to_string()))?
                    .user_agent(USER_AGENT)
                    .map_err(|e| invalid(e.to_string()))?
                    .timeout(config.timeout)
                    .connect_timeout(config.timeout);
                let metadata = config
                    .headers
                    .iter()
                    .map(|(k, v)| {
                        let key = AsciiMetadataKey::from_bytes(k.as_bytes());
                        let value = AsciiMetadataValue::try_from(v.as_str());
                        match (key, value) {
                            (Ok(key), Ok(value)) => Ok((key, value)),
                            _ => Err(ExportError::InvalidHeader {
                                entry: format!("{k}={v}"),
                                reason: "not valid gRPC metadata".to_owned(),
                            }),
                        }
                    })
                    .collect::<Result<_, _>>()?;
                let channel = match &cert {
                    Some(cert) => {
                        let tls = tls::client_config(config, roots, Arc::clone(cert), &[b"h2"])?;
                        endpoint.connect_with_connector_lazy(TlsConnector {
                            tls: tokio_rustls::TlsConnector::from(Arc::new(tls)),
                            name: config
                                .server_name
                                .as_deref()
                                .map(tls::server_name)
                                .transpose()?,
                        })
                    }
                    None => endpoint.connect_lazy(),
                };
                Sender::Grpc {
                    client: tonic::client::Grpc::new(channel),
                    metadata,
                }
            }
            Protocol::HttpProtobuf => {
                let url =
                    reqwest::Url::parse(&config.endpoint).map_err(|e| invalid(e.to_string()))?;
                let mut headers = reqwest::header::HeaderMap::new();
                for (k, v) in &config.headers {
                    let name = reqwest::header::HeaderName::from_bytes(k.as_bytes());
                    let value = reqwest::header::HeaderValue::from_str(v);
                    match (name, value) {
                        (Ok(name), Ok(value)) => {
                            headers.insert(name, value);
                        }
                        _ => {
                            return Err(ExportError::InvalidHeader {
                                entry: format!("{k}={v}"),
                                reason: "not a valid HTTP header".to_owned(),
                            });
                        }
                    }
                }
                let cert = cert.clone().unwrap_or_else(|| ClientCert::new(None));
                let tls = tls::client_config(config, roots, cert, &[])?;
                let client = reqwest::Client::builder()
                    .tls_backend_preconfigured(tls)
                    .user_agent(USER_AGENT)
                    .default_headers(headers)
                    .timeout(config.timeout)
                    .connect_timeout(config.timeout)
                    .build()
                    .map_err(|e| ExportError::Tls(e.to_string()))?;
                Sender::Http { client, url }
            }
        };
        Ok(Transport { protocol, cert })
    }

    /// Sends `body`, an encoded `ExportTraceServiceRequest`.
    pub async fn send(&mut self, body: &Bytes) -> Result<Delivered, SendError> {
        let Some(cert) = &self.cert else {
            return self.protocol.send(body).await;
        };
        let asked = cert.asked();
        let mut result = self.protocol.send(body).await;
        if let Err(SendError::Transient { reason, .. } | SendError::Permanent(reason)) = &mut result
            && cert.asked() > asked
            && tls::TlsFailure::classify(reason).is_none()
            && closed(reason)
        {
            reason.push_str(": ");
            reason.push_str(cert.refusal());
        }
        result
    }
}

/// Whether a failure's text says the connection was closed under the request.
fn closed(reason: &str) -> bool {
    let r = reason.to_ascii_lowercase();
    ["broken pipe", "connection reset", "closed", "eof"]
        .iter()
        .any(|w| r.contains(w))
}

impl Sender {
    async fn send(&mut self, body: &Bytes) -> Result<Delivered, SendError> {
        match self {
            Sender::Grpc { client, metadata } => {
                let mut call = tonic::Request::new(Encoded(body.clone()));
                for (key, value) in metadata.iter() {
                    call.metadata_mut().insert(key.clone(), value.clone());
                }
                // A channel that cannot connect says so here, as UNAVAILABLE.
                if let Err(error) = client.ready().await {
                    return Err(grpc_error(&tonic::Status::unavailable(error_chain(&error))));
                }
                let codec =
                    tonic_prost::ProstCodec::<Encoded, ExportTraceServiceResponse>::default();
                match client
                    .unary(
                        call,
                        tonic::codegen::http::uri::PathAndQuery::from_static(GRPC_EXPORT_PATH),
                        codec,
                    )
                    .await
                {
                    Ok(response) => Ok(delivered(response.into_inner())),
                    Err(status) => Err(grpc_error(&status)),
                }
            }
            Sender::Http { client, url } => {
                let response = client
                    .post(url.clone())
                    .header(reqwest::header::CONTENT_TYPE, "application/x-protobuf")
                    .body(body.clone())
                    .send()
                    .await
                    .map_err(|e| SendError::Transient {
                        reason: format!("POST {url}: {}", error_chain(&e)),
                        retry_after: None,
                    })?;
                let status = response.status();
                let retry_after = response
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| parse_retry_after(v, SystemTime::now()));
                // A failed read of the body after a 2xx still means delivered.
                let body = response.bytes().await.unwrap_or_default();
                if status.is_success() {
                    return Ok(ExportTraceServiceResponse::decode(body)
                        .map(delivered)
                        .unwrap_or_default());
                }
                let reason = format!(
                    "POST {url}: HTTP {status}: {}",
                    String::from_utf8_lossy(&body[..body.len().min(200)]).trim()
                );
                match status.as_u16() {
                    429 | 502 | 503 | 504 => Err(SendError::Transient {
                        reason,
                        retry_after,
                    }),
                    _ => Err(SendError::Permanent(reason)),
                }
            }
        }
    }
}

fn delivered(response: ExportTraceServiceResponse) -> Delivered {
    match response.partial_success {
        Some(partial) => Delivered {
            rejected: u64::try_from(partial.rejected_spans).unwrap_or(0),
            message: partial.error_message,
        },
        None => Delivered::default(),
    }
}

/// The codes the OTLP specification calls retryable, with the server's `RetryInfo`.
/// Connection failures reach us as `Unavailable`; a TLS failure after the handshake
/// (a client certificate the receiver refuses, which TLS 1.3 reports only then) comes
/// as `Unknown: transport error` with the cause below it, and is retried too, like a
/// receiver that cannot be reached.
fn grpc_error(status: &tonic::Status) -> SendError {
    use tonic::Code;
    let mut reason = format!("gRPC {:?}: {}", status.code(), status.message());
    if let Some(source) = std::error::Error::source(status) {
        reason.push_str(": ");
        reason.push_str(&error_chain(source));
    }
    if super::tls::TlsFailure::classify(&reason).is_some() {
        return SendError::Transient {
            reason,
            retry_after: None,
        };
    }
    // A status made on this side, with the cause below it (the connection closed or
    // reset, an HTTP/2 error, the TLS layer), was not sent by the receiver: it never took
    // the batch, so the batch is retried rather than dropped as refused. A receiver that
    // refuses a missing client certificate under TLS 1.3 may just reset the connection.
    if std::error::Error::source(status).is_some()
        && matches!(status.code(), Code::Unknown | Code::Internal)
    {
        return SendError::Transient {
            reason,
            retry_after: None,
        };
    }
    let retry_after = status
        .get_details_retry_info()
        .and_then(|info| info.retry_delay);
    match status.code() {
        Code::Cancelled
        | Code::DeadlineExceeded
        | Code::Aborted
        | Code::OutOfRange
        | Code::Unavailable
        | Code::DataLoss => SendError::Transient {
            reason,
            retry_after,
        },
        // Retryable only when the server says recovery is possible.
        Code::ResourceExhausted if retry_after.is_some() => SendError::Transient {
            reason,
            retry_after,
        },
        _ => SendError::Permanent(reason),
    }
}

/// `Retry-After`: a number of seconds, or an HTTP date (a date already past means now).
fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// reqwest's top-level message is "error sending request"; the cause says which.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transient_after(error: SendError) -> Option<Option<Duration>> {
        match error {
            SendError::Transient { retry_after, .. } => Some(retry_after),
            SendError::Permanent(_) => None,
        }
    }

    #[test]
    fn retryable_grpc_codes_are_transient() {
        use tonic::Code;
        for code in [
            Code::Cancelled,
            Code::DeadlineExceeded,
            Code::Aborted,
            Code::OutOfRange,
            Code::Unavailable,
            Code::DataLoss,
        ] {
            let status = tonic::Status::new(code, "down");
            assert_eq!(transient_after(grpc_error(&status)), Some(None), "{code:?}");
        }
        for code in [
            Code::InvalidArgument,
            Code::Unauthenticated,
            Code::PermissionDenied,
            Code::NotFound,
            Code::Unimplemented,
            Code::Internal,
            Code::ResourceExhausted,
        ] {
            let status = tonic::Status::new(code, "no");
            assert_eq!(transient_after(grpc_error(&status)), None, "{code:?}");
        }
    }

    #[test]
    fn a_connection_that_breaks_on_this_side_is_retried_not_refused() {
        // What tonic makes of a reset connection: Unknown, with the io error below it.
        let reset = std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "connection reset by peer",
        );
        let status = tonic::Status::from_error(Box::new(reset));
        assert_eq!(status.code(), tonic::Code::Unknown);
        assert_eq!(transient_after(grpc_error(&status)), Some(None));
        // The same code sent by the receiver (no cause below it) is a refusal.
        let sent = tonic::Status::new(tonic::Code::Unknown, "bad batch");
        assert_eq!(transient_after(grpc_error(&sent)), None);
    }

    #[test]
    fn retry_info_makes_resource_exhausted_retryable_and_gives_the_delay() {
        use tonic::Code;
        use tonic_types::ErrorDetails;
        let delay = Duration::from_millis(1500);
        for code in [Code::ResourceExhausted, Code::Unavailable] {
            let status = tonic::Status::with_error_details(
                code,
                "slow down",
                ErrorDetails::with_retry_info(Some(delay)),
            );
            assert_eq!(
                transient_after(grpc_error(&status)),
                Some(Some(delay)),
                "{code:?}"
            );
        }
    }

    #[test]
    fn retry_after_is_seconds_or_an_http_date() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(parse_retry_after(" 7 ", now), Some(Duration::from_secs(7)));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(
            parse_retry_after(&later, now),
            Some(Duration::from_secs(30))
        );
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(30));
        assert_eq!(parse_retry_after(&earlier, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
    }
}
