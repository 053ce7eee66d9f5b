//! A client of Jaeger's HTTP query API (the one its UI uses, served by Jaeger v1 and v2
//! alike): `/api/services`, `/api/traces?service=...&tags=...` and `/api/traces/{id}`.
//! A search needs a service, so an order is looked for in every service's traces.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde_json::Value;

use super::OrdersError;
use super::journey::{Kind, Span};

pub struct Jaeger {
    client: reqwest::Client,
    base: reqwest::Url,
}

/// A trace: its id and its spans.
pub type Trace = (String, Vec<Span>);

impl Jaeger {
    pub fn new(base: &str, ca_file: Option<&std::path::Path>) -> Result<Jaeger, OrdersError> {
        let invalid = |reason: String| OrdersError::BadUrl {
            url: base.to_owned(),
            reason,
        };
        let url = reqwest::Url::parse(base).map_err(|e| invalid(e.to_string()))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(invalid("the scheme must be http or https".to_owned()));
        }
        let roots = if url.scheme() == "https" {
            crate::export::root_store(ca_file).map_err(|e| OrdersError::Tls(e.to_string()))?
        } else {
            rustls::RootCertStore::empty()
        };
        let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| OrdersError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let client = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .timeout(Duration::from_secs(30))
            .connect_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| OrdersError::Tls(e.to_string()))?;
        Ok(Jaeger { client, base: url })
    }

    async fn get(&self, path: &str, query: &[(&str, String)]) -> Result<Value, OrdersError> {
        let mut url = self.base.clone();
        url.set_path(&format!("{}{path}", self.base.path().trim_end_matches('/')));
        url.query_pairs_mut().clear().extend_pairs(query);
        let failed = |reason: String| OrdersError::Query {
            url: url.to_string(),
            reason,
        };
        let resp = self
            .client
            .get(url.clone())
            .send()
            .await
            .map_err(|e| failed(error_chain(&e)))?;
        let status = resp.status();
        let body = resp.bytes().await.map_err(|e| failed(error_chain(&e)))?;
        let json: Value = serde_json::from_slice(&body).map_err(|e| {
            failed(format!(
                "HTTP {status}, not JSON ({e}): {}",
                String::from_utf8_lossy(&body[..body.len().min(200)])
            ))
        })?;
        if status.as_u16() == 404 {
            // Jaeger answers a trace it does not have with 404 and a JSON error.
            return Ok(Value::Null);
        }
        if !status.is_success() {
            return Err(failed(format!("HTTP {status}: {}", json_errors(&json))));
        }
        Ok(json)
    }

    /// The services Jaeger knows, its own left out.
    pub async fn services(&self) -> Result<Vec<String>, OrdersError> {
        let v = self.get("/api/services", &[]).await?;
        let mut out: Vec<String> = v
            .get("data")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .filter(|s| *s != "jaeger")
            .map(str::to_owned)
            .collect();
        out.sort();
        Ok(out)
    }

    /// Traces with a span of `service` in `[start_us, end_us]` (and with these tags),
    /// at most `limit`. The second value says the limit was reached.
    pub async fn search(
        &self,
        service: &str,
        tags: Option<&BTreeMap<&str, &str>>,
        start_us: u64,
        end_us: u64,
        limit: usize,
    ) -> Result<(Vec<Trace>, bool), OrdersError> {
        let mut q = vec![
            ("service", service.to_owned()),
            ("start", start_us.to_string()),
            ("end", end_us.to_string()),
            ("limit", limit.to_string()),
        ];
        if let Some(tags) = tags {
            q.push(("tags", serde_json::to_string(tags).unwrap_or_default()));
        }
        let v = self.get("/api/traces", &q).await?;
        let traces = parse_traces(&v);
        let full = traces.len() >= limit;
        Ok((traces, full))
    }

    /// One trace, whole.
    pub async fn trace(&self, trace_id: &str) -> Result<Option<Trace>, OrdersError> {
        let v = self.get(&format!("/api/traces/{trace_id}"), &[]).await?;
        Ok(parse_traces(&v).into_iter().next())
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}

fn json_errors(v: &Value) -> String {
    match v.get("errors").and_then(Value::as_array) {
        Some(errors) => errors
            .iter()
            .map(|e| {
                e.get("msg")
                    .and_then(Value::as_str)
                    .unwrap_or("?")
                    .to_owned()
            })
            .collect::<Vec<_>>()
            .join("; "),
        None => v.to_string().chars().take(200).collect(),
    }
}

/// The traces of a query answer (`{"data": [{"traceID", "spans", "processes"}]}`).
pub fn parse_traces(v: &Value) -> Vec<Trace> {
    let mut out = Vec::new();
    for t in v
        .get("data")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let Some(trace_id) = t.get("traceID").and_then(Value::as_str) else {
            continue;
        };
        let services: HashMap<&str, &str> = t
            .get("processes")
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
            .map(|(k, p)| {
                (
                    k.as_str(),
                    p.get("serviceName").and_then(Value::as_str).unwrap_or("?"),
                )
            })
            .collect();
        let spans = t
            .get("spans")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|s| parse_span(s, &services))
            .collect();
        out.push((trace_id.to_owned(), spans));
    }
    out
}

fn parse_span(s: &Value, services: &HashMap<&str, &str>) -> Option<Span> {
    let tags: BTreeMap<String, Value> = s
        .get("tags")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|t| Some((t.get("key")?.as_str()?.to_owned(), t.get("value")?.clone())))
        .collect();
    let parent = s
        .get("references")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .find(|r| r.get("refType").and_then(Value::as_str) == Some("CHILD_OF"))
        .and_then(|r| r.get("spanID")?.as_str())
        .map(str::to_owned);
    let kind = Kind::parse(tags.get("span.kind").and_then(Value::as_str).unwrap_or(""));
    Some(Span {
        trace_id: s.get("traceID")?.as_str()?.to_owned(),
        span_id: s.get("spanID")?.as_str()?.to_owned(),
        parent,
        service: services
            .get(s.get("processID").and_then(Value::as_str).unwrap_or(""))
            .copied()
            .unwrap_or("?")
            .to_owned(),
        name: s.get("operationName")?.as_str()?.to_owned(),
        kind,
        start_us: s.get("startTime")?.as_u64()?,
        duration_us: s.get("duration").and_then(Value::as_u64).unwrap_or(0),
        tags,
    })
}
