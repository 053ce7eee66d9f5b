//! Where and how OTLP goes: the standard `OTEL_EXPORTER_OTLP_*` and `OTEL_BSP_*`
//! variables, overridden by command-line values.
//!
//! [`OtlpConfig::resolve`] is pure (the environment comes in as a map) so every rule
//! here is unit-tested. Rules, following the OpenTelemetry exporter specification:
//!
//! - an empty variable counts as unset;
//! - a signal-specific variable (`OTEL_EXPORTER_OTLP_TRACES_*`) beats the generic one,
//!   and a command-line value beats both;
//! - `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is the exact URL to send to; the generic
//!   `OTEL_EXPORTER_OTLP_ENDPOINT` and `--otlp-endpoint` are base URLs to which
//!   HTTP/protobuf appends `/v1/traces` (unless the URL already ends with it);
//! - with no protocol given, an endpoint on port 4317 (OTLP's gRPC port) means gRPC and
//!   anything else HTTP/protobuf, the specification's default: sending protobuf over
//!   HTTP/1.1 to a gRPC port fails in ways that are hard to read at night;
//! - headers are `key=value` pairs separated by commas, percent-decoded, keys
//!   lower-cased (gRPC metadata keys must be); timeouts are milliseconds.
//!
//! [`QueueConfig`] bounds the export queue for every output: by encoded bytes and by
//! age from the command line, and by span count only when `OTEL_BSP_MAX_QUEUE_SIZE`
//! is set.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use super::ExportError;

/// OTLP's transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// OTLP/gRPC (`grpc`), default port 4317.
    Grpc,
    /// OTLP/HTTP with protobuf bodies (`http/protobuf`), default port 4318.
    HttpProtobuf,
}

impl Protocol {
    fn parse(value: &str) -> Result<Self, ExportError> {
        match value.trim() {
            "grpc" => Ok(Protocol::Grpc),
            "http/protobuf" => Ok(Protocol::HttpProtobuf),
            "http/json" => Err(ExportError::UnsupportedProtocol(value.to_owned())),
            other => Err(ExportError::UnknownProtocol(other.to_owned())),
        }
    }
}

/// Command-line values; each one set beats the environment.
#[derive(Clone, Debug, Default)]
pub struct OtlpOptions {
    /// Base URL, as `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub endpoint: Option<String>,
    /// `grpc` or `http/protobuf`.
    pub protocol: Option<String>,
    /// `key=value,key2=value2`, merged over the environment's headers.
    pub headers: Option<String>,
    pub timeout: Option<Duration>,
    /// PEM file of extra CA certificates to trust (an internal CA, say).
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate (chain) for mutual TLS, with `client_key`.
    pub client_cert: Option<PathBuf>,
    /// PEM private key of `client_cert`.
    pub client_key: Option<PathBuf>,
    /// The name the receiver's certificate must be valid for, when it is not the
    /// endpoint's host (an IP address, or a name behind a load balancer).
    pub server_name: Option<String>,
}

/// Batching, after the `OTEL_BSP_*` variables.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchConfig {
    /// Spans in one export request.
    pub max_export_batch_size: usize,
    /// Longest a span waits for its batch to fill.
    pub scheduled_delay: Duration,
}

impl Default for BatchConfig {
    /// The specification's batch size; a 1 s delay instead of its 5 s, because people
    /// looking for a request in Jaeger have usually just made it.
    fn default() -> Self {
        BatchConfig {
            max_export_batch_size: 512,
            scheduled_delay: Duration::from_millis(1000),
        }
    }
}

/// What the export queue holds at most: spans waiting for export and those in the
/// batch being sent (and retried). A span that would pass a bound is dropped and
/// counted (`queue_full`); a span older than `max_age` is dropped and counted
/// (`expired`). Nothing else drops a span while the receiver is down.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueConfig {
    /// The spans' protobuf-encoded size (as they go over the wire), in bytes.
    pub max_bytes: usize,
    /// Longest a span may wait for delivery, retries included.
    pub max_age: Duration,
    /// Spans, when `OTEL_BSP_MAX_QUEUE_SIZE` asks for a bound by count as well.
    pub max_spans: Option<usize>,
}

/// `--export-queue-mb`'s default.
pub const DEFAULT_QUEUE_MB: usize = 64;
/// `--export-max-age`'s default.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(300);

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            max_bytes: DEFAULT_QUEUE_MB << 20,
            max_age: DEFAULT_MAX_AGE,
            max_spans: None,
        }
    }
}

impl QueueConfig {
    /// The bounds from the command line (`--export-queue-mb`, `--export-max-age`) and
    /// `OTEL_BSP_MAX_QUEUE_SIZE` in `env`.
    pub fn resolve(
        env: &HashMap<String, String>,
        max_mb: usize,
        max_age: Duration,
    ) -> Result<Self, ExportError> {
        let get = |name: &str| env.get(name).map(|v| v.trim()).filter(|v| !v.is_empty());
        let max_bytes = max_mb
            .checked_mul(1 << 20)
            .filter(|&b| b > 0)
            .ok_or_else(|| ExportError::InvalidSetting {
                name: "--export-queue-mb",
                value: max_mb.to_string(),
                expected: "a positive number of MiB that fits in memory",
            })?;
        if max_age.is_zero() {
            return Err(ExportError::InvalidSetting {
                name: "--export-max-age",
                value: "0".to_owned(),
                expected: "a positive duration such as 30s or 5m",
            });
        }
        Ok(QueueConfig {
            max_bytes,
            max_age,
            max_spans: count_var(&get, "OTEL_BSP_MAX_QUEUE_SIZE")?,
        })
    }
}

/// Retries of transient failures: exponential backoff with jitter, capped, until the
/// spans are delivered, refused for good, or older than [`QueueConfig::max_age`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryConfig {
    /// The first wait; each further failure doubles it.
    pub initial_backoff: Duration,
    /// The longest wait between attempts (a receiver's Retry-After may ask for more).
    pub max_backoff: Duration,
}

impl Default for RetryConfig {
    /// A receiver back after an outage gets its spans within about 10 s.
    fn default() -> Self {
        RetryConfig {
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(10),
        }
    }
}

/// Everything the OTLP exporter needs. Its `Debug` shows header names only: header
/// values are usually credentials.
#[derive(Clone, PartialEq)]
pub struct OtlpConfig {
    pub protocol: Protocol,
    /// gRPC: the server's URL. HTTP: the full URL to POST to (ending in /v1/traces).
    pub endpoint: String,
    /// Sent with every export, as gRPC metadata or HTTP headers.
    pub headers: Vec<(String, String)>,
    /// Per export attempt.
    pub timeout: Duration,
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key for mutual TLS.
    pub client_auth: Option<ClientAuth>,
    /// Checked against the receiver's certificate instead of the endpoint's host.
    pub server_name: Option<String>,
    pub batch: BatchConfig,
    pub retry: RetryConfig,
}

impl std::fmt::Debug for OtlpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let header_names: Vec<&str> = self.headers.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("OtlpConfig")
            .field("protocol", &self.protocol)
            .field("endpoint", &self.endpoint)
            .field("header_names", &header_names)
            .field("timeout", &self.timeout)
            .field("ca_file", &self.ca_file)
            .field("client_auth", &self.client_auth)
            .field("server_name", &self.server_name)
            .field("batch", &self.batch)
            .field("retry", &self.retry)
            .finish()
    }
}

/// The files of a client certificate for mutual TLS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientAuth {
    pub cert: PathBuf,
    pub key: PathBuf,
}

const DEFAULT_GRPC_ENDPOINT: &str = "http://localhost:4317";
const DEFAULT_HTTP_ENDPOINT: &str = "http://localhost:4318";
const TRACES_PATH: &str = "/v1/traces";
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

impl OtlpConfig {
    /// The configuration from this process's environment and `cli`.
    pub fn from_env(cli: &OtlpOptions) -> Result<Self, ExportError> {
        Self::resolve(&std::env::vars().collect(), cli)
    }

    /// The configuration from `env` (variable name to value) and `cli`.
    pub fn resolve(env: &HashMap<String, String>, cli: &OtlpOptions) -> Result<Self, ExportError> {
        let get = |name: &str| env.get(name).map(|v| v.trim()).filter(|v| !v.is_empty());

        // Where first: with no protocol given, the endpoint's port chooses it.
        let base = cli
            .endpoint
            .as_deref()
            .map(str::trim)
            .filter(|v| !v.is_empty());
        let exact = get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT");
        let generic = get("OTEL_EXPORTER_OTLP_ENDPOINT");
        let given = match (base, exact, generic) {
            (Some(url), _, _) => Some((url, false)),
            (None, Some(url), _) => Some((url, true)),
            (None, None, Some(url)) => Some((url, false)),
            (None, None, None) => None,
        };
        let given = match given {
            Some((raw, exact)) => Some((raw, parse_url(raw)?, exact)),
            None => None,
        };

        let protocol = match cli
            .protocol
            .as_deref()
            .or_else(|| get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"))
            .or_else(|| get("OTEL_EXPORTER_OTLP_PROTOCOL"))
        {
            Some(p) => Protocol::parse(p)?,
            None => match &given {
                Some((_, url, _)) if url.port() == Some(4317) => Protocol::Grpc,
                _ => Protocol::HttpProtobuf,
            },
        };

        let endpoint = match (given, protocol) {
            (Some((raw, _, _)), Protocol::Grpc) => raw.to_owned(),
            (Some((raw, _, true)), Protocol::HttpProtobuf) => raw.to_owned(),
            (Some((_, url, false)), Protocol::HttpProtobuf) => with_traces_path(url),
            (None, Protocol::Grpc) => DEFAULT_GRPC_ENDPOINT.to_owned(),
            (None, Protocol::HttpProtobuf) => with_traces_path(parse_url(DEFAULT_HTTP_ENDPOINT)?),
        };

        let mut headers = Vec::new();
        for name in [
            "OTEL_EXPORTER_OTLP_HEADERS",
            "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
        ] {
            if let Some(list) = get(name) {
                merge_headers(&mut headers, parse_headers(list)?);
            }
        }
        if let Some(list) = &cli.headers {
            merge_headers(&mut headers, parse_headers(list)?);
        }

        let timeout = match cli.timeout {
            Some(t) => t,
            None => match millis_var(&get, "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT")? {
                Some(t) => t,
                None => millis_var(&get, "OTEL_EXPORTER_OTLP_TIMEOUT")?.unwrap_or(DEFAULT_TIMEOUT),
            },
        };
        if timeout.is_zero() {
            return Err(ExportError::InvalidSetting {
                name: "OTLP timeout",
                value: "0".to_owned(),
                expected: "a positive number of milliseconds",
            });
        }

        let ca_file = cli.ca_file.clone().or_else(|| {
            get("OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE")
                .or_else(|| get("OTEL_EXPORTER_OTLP_CERTIFICATE"))
                .map(PathBuf::from)
        });

        let path_var =
            |names: [&str; 2]| get(names[0]).or_else(|| get(names[1])).map(PathBuf::from);
        let client_cert = cli.client_cert.clone().or_else(|| {
            path_var([
                "OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE",
                "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
            ])
        });
        let client_key = cli.client_key.clone().or_else(|| {
            path_var([
                "OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY",
                "OTEL_EXPORTER_OTLP_CLIENT_KEY",
            ])
        });
        let client_auth = match (client_cert, client_key) {
            (Some(cert), Some(key)) => Some(ClientAuth { cert, key }),
            (None, None) => None,
            (Some(_), None) => return Err(ExportError::ClientAuthHalf("a client key")),
            (None, Some(_)) => return Err(ExportError::ClientAuthHalf("a client certificate")),
        };
        let server_name = cli
            .server_name
            .as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned);
        if !endpoint.starts_with("https:") {
            let tls_setting = [
                (ca_file.is_some(), "a CA file"),
                (client_auth.is_some(), "a client certificate"),
                (server_name.is_some(), "a server name"),
            ]
            .into_iter()
            .find_map(|(set, what)| set.then_some(what));
            if let Some(what) = tls_setting {
                return Err(ExportError::TlsWithoutHttps {
                    endpoint: endpoint.clone(),
                    setting: what,
                });
            }
        }

        let defaults = BatchConfig::default();
        let max_export_batch_size = count_var(&get, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE")?
            .unwrap_or(defaults.max_export_batch_size);
        let scheduled_delay =
            millis_var(&get, "OTEL_BSP_SCHEDULE_DELAY")?.unwrap_or(defaults.scheduled_delay);

        Ok(OtlpConfig {
            protocol,
            endpoint,
            headers,
            timeout,
            ca_file,
            client_auth,
            server_name,
            batch: BatchConfig {
                max_export_batch_size,
                scheduled_delay,
            },
            retry: RetryConfig::default(),
        })
    }
}

/// True when the user asked for OTLP by naming an endpoint, on the command line or in
/// the environment: the agent prints to stdout otherwise.
pub fn endpoint_configured(env: &HashMap<String, String>, cli: &OtlpOptions) -> bool {
    let set = |v: Option<&String>| v.is_some_and(|v| !v.trim().is_empty());
    set(cli.endpoint.as_ref())
        || set(env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
        || set(env.get("OTEL_EXPORTER_OTLP_ENDPOINT"))
}

fn parse_url(value: &str) -> Result<reqwest::Url, ExportError> {
    let invalid = |reason: String| ExportError::InvalidEndpoint {
        endpoint: value.to_owned(),
        reason,
    };
    let url = reqwest::Url::parse(value).map_err(|e| invalid(e.to_string()))?;
    match url.scheme() {
        "http" | "https" => {}
        other => {
            return Err(invalid(format!(
                "scheme {other:?} is neither http nor https"
            )));
        }
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(invalid("no host".to_owned()));
    }
    Ok(url)
}

fn with_traces_path(mut url: reqwest::Url) -> String {
    let path = url.path().trim_end_matches('/');
    if !path.ends_with(TRACES_PATH) {
        let joined = format!("{path}{TRACES_PATH}");
        url.set_path(&joined);
    }
    url.to_string()
}

/// `k=v,k2=v2`, both sides percent-decoded and trimmed, keys lower-cased. Each
/// header is checked here, once, against both HTTP's and gRPC's rules, so a typo is
/// an error at start-up rather than a failed export later.
fn parse_headers(list: &str) -> Result<Vec<(String, String)>, ExportError> {
    let mut headers = Vec::new();
    for entry in list.split(',').filter(|e| !e.trim().is_empty()) {
        let invalid = |reason: &str| ExportError::InvalidHeader {
            entry: entry.trim().to_owned(),
            reason: reason.to_owned(),
        };
        let (key, value) = entry.split_once('=').ok_or_else(|| invalid("no '='"))?;
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(s.trim())
                .decode_utf8()
                .map(|s| s.trim().to_owned())
                .map_err(|_| invalid("not UTF-8 once percent-decoded"))
        };
        let key = decode(key)?.to_ascii_lowercase();
        let value = decode(value)?;
        if key.is_empty() {
            return Err(invalid("empty name"));
        }
        if tonic::metadata::AsciiMetadataKey::from_bytes(key.as_bytes()).is_err()
            || reqwest::header::HeaderName::from_bytes(key.as_bytes()).is_err()
        {
            return Err(invalid("the name is not a valid header name"));
        }
        if tonic::metadata::AsciiMetadataValue::try_from(value.as_str()).is_err()
            || reqwest::header::HeaderValue::from_str(&value).is_err()
        {
            return Err(invalid("the value has characters a header cannot carry"));
        }
        headers.push((key, value));
    }
    Ok(headers)
}

fn merge_headers(into: &mut Vec<(String, String)>, from: Vec<(String, String)>) {
    for (key, value) in from {
        match into.iter_mut().find(|(k, _)| *k == key) {
            Some(existing) => existing.1 = value,
            None => into.push((key, value)),
        }
    }
}

fn millis_var<'a>(
    get: &impl Fn(&str) -> Option<&'a str>,
    name: &'static str,
) -> Result<Option<Duration>, ExportError> {
    get(name)
        .map(|v| {
            v.parse::<u64>()
                .map(Duration::from_millis)
                .map_err(|_| ExportError::InvalidSetting {
                    name,
                    value: v.to_owned(),
                    expected: "a whole number of milliseconds",
                })
        })
        .transpose()
}

fn count_var<'a>(
    get: &impl Fn(&str) -> Option<&'a str>,
    name: &'static str,
) -> Result<Option<usize>, ExportError> {
    get(name)
        .map(|v| match v.parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(ExportError::InvalidSetting {
                name,
                value: v.to_owned(),
                expected: "a positive whole number",
            }),
        })
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn resolve(pairs: &[(&str, &str)]) -> Result<OtlpConfig, ExportError> {
        OtlpConfig::resolve(&env(pairs), &OtlpOptions::default())
    }

    #[test]
    fn defaults_to_http_protobuf_on_localhost() {
        let c = resolve(&[]).unwrap();
        assert_eq!(c.protocol, Protocol::HttpProtobuf);
        assert_eq!(c.endpoint, "http://localhost:4318/v1/traces");
        assert_eq!(c.timeout, Duration::from_secs(10));
        assert!(c.headers.is_empty());
        assert_eq!(c.batch, BatchConfig::default());
    }

    #[test]
    fn grpc_protocol_defaults_to_port_4317() {
        let c = resolve(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")]).unwrap();
        assert_eq!(c.protocol, Protocol::Grpc);
        assert_eq!(c.endpoint, "http://localhost:4317");
    }

    #[test]
    fn port_4317_without_protocol_means_grpc() {
        let c = resolve(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "https://jaeger:4317")]).unwrap();
        assert_eq!(c.protocol, Protocol::Grpc);
        assert_eq!(c.endpoint, "https://jaeger:4317");
    }

    #[test]
    fn generic_endpoint_gets_traces_path_for_http() {
        let c = resolve(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")]).unwrap();
        assert_eq!(c.endpoint, "http://collector:4318/v1/traces");
        let c = resolve(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/otlp/")]).unwrap();
        assert_eq!(c.endpoint, "http://collector:4318/otlp/v1/traces");
        let c = resolve(&[(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "http://collector:4318/v1/traces",
        )])
        .unwrap();
        assert_eq!(c.endpoint, "http://collector:4318/v1/traces");
    }

    #[test]
    fn traces_endpoint_is_used_as_is_and_beats_generic() {
        let c = resolve(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://generic:4318"),
            (
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "http://traces:9999/custom",
            ),
        ])
        .unwrap();
        assert_eq!(c.endpoint, "http://traces:9999/custom");
    }

    #[test]
    fn cli_beats_environment() {
        let cli = OtlpOptions {
            endpoint: Some("https://cli:4317".to_owned()),
            protocol: Some("grpc".to_owned()),
            headers: Some("x-team=support".to_owned()),
            timeout: Some(Duration::from_secs(3)),
            ca_file: Some(PathBuf::from("/etc/sonde/ca.pem")),
            ..Default::default()
        };
        let e = env(&[
            (
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "http://env:4318/v1/traces",
            ),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            (
                "OTEL_EXPORTER_OTLP_HEADERS",
                "x-team=ops,authorization=Bearer%20abc",
            ),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "500"),
            ("OTEL_EXPORTER_OTLP_CERTIFICATE", "/env/ca.pem"),
        ]);
        let c = OtlpConfig::resolve(&e, &cli).unwrap();
        assert_eq!(c.protocol, Protocol::Grpc);
        assert_eq!(c.endpoint, "https://cli:4317");
        assert_eq!(
            c.headers,
            [
                ("x-team".to_owned(), "support".to_owned()),
                ("authorization".to_owned(), "Bearer abc".to_owned())
            ]
        );
        assert_eq!(c.timeout, Duration::from_secs(3));
        assert_eq!(c.ca_file, Some(PathBuf::from("/etc/sonde/ca.pem")));
    }

    #[test]
    fn mutual_tls_files_from_flags_or_the_environment() {
        let e = env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "https://jaeger:4317"),
            ("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", "/env/client.pem"),
            ("OTEL_EXPORTER_OTLP_CLIENT_KEY", "/env/client.key"),
        ]);
        let c = OtlpConfig::resolve(&e, &OtlpOptions::default()).unwrap();
        assert_eq!(
            c.client_auth,
            Some(ClientAuth {
                cert: "/env/client.pem".into(),
                key: "/env/client.key".into()
            })
        );
        let cli = OtlpOptions {
            client_cert: Some("/cli/c.pem".into()),
            client_key: Some("/cli/c.key".into()),
            server_name: Some(" otlp.internal ".into()),
            ..Default::default()
        };
        let c = OtlpConfig::resolve(&e, &cli).unwrap();
        assert_eq!(c.client_auth.unwrap().cert, PathBuf::from("/cli/c.pem"));
        assert_eq!(c.server_name.as_deref(), Some("otlp.internal"));
    }

    #[test]
    fn half_a_client_identity_or_tls_settings_for_plain_http_are_errors() {
        let half = resolve(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "https://jaeger:4317"),
            ("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", "/c.pem"),
        ])
        .unwrap_err()
        .to_string();
        assert!(half.contains("client key is missing"), "{half}");
        let plain = resolve(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://jaeger:4317"),
            ("OTEL_EXPORTER_OTLP_CERTIFICATE", "/ca.pem"),
        ])
        .unwrap_err()
        .to_string();
        assert!(
            plain.contains("not https") && plain.contains("CA file"),
            "{plain}"
        );
    }

    #[test]
    fn debug_output_hides_header_values() {
        let c = resolve(&[(
            "OTEL_EXPORTER_OTLP_HEADERS",
            "authorization=Bearer%20s3cret",
        )])
        .unwrap();
        let shown = format!("{c:?}");
        assert!(shown.contains("authorization"), "{shown}");
        assert!(!shown.contains("s3cret"), "{shown}");
    }

    #[test]
    fn headers_are_percent_decoded_trimmed_and_lower_cased() {
        let c = resolve(&[
            (
                "OTEL_EXPORTER_OTLP_HEADERS",
                " API-Key = a%3Db%2Cc , x-tenant=shop",
            ),
            ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "x-tenant=mes"),
        ])
        .unwrap();
        assert_eq!(
            c.headers,
            [
                ("api-key".to_owned(), "a=b,c".to_owned()),
                ("x-tenant".to_owned(), "mes".to_owned())
            ]
        );
    }

    #[test]
    fn bad_headers_name_the_entry() {
        let err = resolve(&[("OTEL_EXPORTER_OTLP_HEADERS", "novalue")]).unwrap_err();
        assert!(err.to_string().contains("\"novalue\""), "{err}");
        let err = resolve(&[("OTEL_EXPORTER_OTLP_HEADERS", "bad key=v")]).unwrap_err();
        assert!(matches!(err, ExportError::InvalidHeader { .. }), "{err}");
    }

    #[test]
    fn timeouts_are_milliseconds_and_signal_specific_wins() {
        let c = resolve(&[("OTEL_EXPORTER_OTLP_TIMEOUT", "2500")]).unwrap();
        assert_eq!(c.timeout, Duration::from_millis(2500));
        let c = resolve(&[
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
            ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "700"),
        ])
        .unwrap();
        assert_eq!(c.timeout, Duration::from_millis(700));
        let err = resolve(&[("OTEL_EXPORTER_OTLP_TIMEOUT", "10s")]).unwrap_err();
        assert!(
            err.to_string().contains("OTEL_EXPORTER_OTLP_TIMEOUT"),
            "{err}"
        );
    }

    #[test]
    fn protocols_other_than_grpc_and_protobuf_are_refused_clearly() {
        let err = resolve(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")]).unwrap_err();
        assert!(matches!(err, ExportError::UnsupportedProtocol(_)));
        assert!(err.to_string().contains("grpc or http/protobuf"), "{err}");
        let err = resolve(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "thrift")]).unwrap_err();
        assert!(matches!(err, ExportError::UnknownProtocol(_)));
    }

    #[test]
    fn bad_endpoints_are_refused_with_the_url() {
        for bad in ["localhost:4317", "ftp://collector", "not a url"] {
            let err = resolve(&[("OTEL_EXPORTER_OTLP_ENDPOINT", bad)]).unwrap_err();
            assert!(
                matches!(err, ExportError::InvalidEndpoint { .. }),
                "{bad}: {err}"
            );
            assert!(err.to_string().contains(bad), "{err}");
        }
    }

    #[test]
    fn empty_variables_count_as_unset() {
        let c = resolve(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", ""),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", " "),
        ])
        .unwrap();
        assert_eq!(c.endpoint, "http://localhost:4318/v1/traces");
        assert!(!endpoint_configured(
            &env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "")]),
            &OtlpOptions::default()
        ));
        assert!(endpoint_configured(
            &env(&[(
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "http://x:4318/v1/traces"
            )]),
            &OtlpOptions::default()
        ));
    }

    #[test]
    fn batch_variables_are_read() {
        let c = resolve(&[
            ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "500"),
            ("OTEL_BSP_SCHEDULE_DELAY", "250"),
        ])
        .unwrap();
        assert_eq!(c.batch.max_export_batch_size, 500);
        assert_eq!(c.batch.scheduled_delay, Duration::from_millis(250));
        assert!(resolve(&[("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "0")]).is_err());
    }

    #[test]
    fn queue_is_bounded_by_bytes_and_age_and_by_count_only_when_asked() {
        let q = QueueConfig::resolve(&env(&[]), 64, Duration::from_secs(300)).unwrap();
        assert_eq!(q, QueueConfig::default());
        assert_eq!(q.max_bytes, 64 * 1024 * 1024);
        assert_eq!(q.max_spans, None);

        let q = QueueConfig::resolve(
            &env(&[("OTEL_BSP_MAX_QUEUE_SIZE", "100")]),
            1,
            Duration::from_secs(2),
        )
        .unwrap();
        assert_eq!(q.max_bytes, 1 << 20);
        assert_eq!(q.max_age, Duration::from_secs(2));
        assert_eq!(q.max_spans, Some(100));
    }

    #[test]
    fn the_command_line_takes_queue_bounds_with_units() {
        use crate::config::{Cli, Command};
        use clap::Parser;
        let run = |args: &[&str]| -> Result<crate::config::OutputArgs, clap::Error> {
            let cli = Cli::try_parse_from(["sonde", "run"].iter().chain(args))?;
            match cli.command {
                Command::Run(run) => Ok(run.out),
                Command::Replay(_) | Command::Orders(_) => unreachable!("parsed a run"),
            }
        };
        let defaults = run(&[]).unwrap();
        assert_eq!(defaults.export_queue_mb, DEFAULT_QUEUE_MB);
        assert_eq!(defaults.export_max_age, DEFAULT_MAX_AGE);
        let set = run(&["--export-queue-mb", "8", "--export-max-age", "90s"]).unwrap();
        assert_eq!(set.export_queue_mb, 8);
        assert_eq!(set.export_max_age, Duration::from_secs(90));
        assert_eq!(
            run(&["--export-max-age", "1h 30m"]).unwrap().export_max_age,
            Duration::from_secs(5400)
        );
        let err = run(&["--export-max-age", "soon"]).unwrap_err().to_string();
        assert!(err.contains("--export-max-age"), "{err}");
    }

    #[test]
    fn unusable_queue_bounds_are_refused_by_name() {
        let zero_mb = QueueConfig::resolve(&env(&[]), 0, DEFAULT_MAX_AGE).unwrap_err();
        assert!(
            zero_mb.to_string().contains("--export-queue-mb"),
            "{zero_mb}"
        );
        let huge = QueueConfig::resolve(&env(&[]), usize::MAX, DEFAULT_MAX_AGE).unwrap_err();
        assert!(huge.to_string().contains("--export-queue-mb"), "{huge}");
        let no_age = QueueConfig::resolve(&env(&[]), 64, Duration::ZERO).unwrap_err();
        assert!(no_age.to_string().contains("--export-max-age"), "{no_age}");
        let bad_count = QueueConfig::resolve(
            &env(&[("OTEL_BSP_MAX_QUEUE_SIZE", "0")]),
            64,
            DEFAULT_MAX_AGE,
        )
        .unwrap_err();
        assert!(
            bad_count.to_string().contains("OTEL_BSP_MAX_QUEUE_SIZE"),
            "{bad_count}"
        );
    }
}
