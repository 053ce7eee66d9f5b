//! The background task that reads this node's pods into the cache: at start, every
//! refresh interval, and sooner when a span's pod is missing (at most once per
//! [`MISS_GAP_MIN`] at first, the gap doubling up to the refresh interval while reads
//! find no new pod). After a failure it waits [`BACKOFF_MIN`], doubling up to the
//! refresh interval. The token is read again for every request: projected service
//! account tokens are rotated.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use tokio::time::{Instant, sleep_until};
use tracing::{info, warn};

use super::{ErrorReason, Target, enrich::PodCache, pods::PodList, pods::PodMeta};
use crate::telemetry::Metrics;

const BACKOFF_MIN: Duration = Duration::from_secs(1);
const MISS_GAP_MIN: Duration = Duration::from_secs(1);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest pod list taken (a node runs at most a few hundred pods).
const MAX_BODY: usize = 64 << 20;

/// Why one read failed.
#[derive(Debug)]
struct Failure {
    reason: ErrorReason,
    message: String,
}

pub(super) async fn run(target: Target, cache: Arc<PodCache>, metrics: Arc<Metrics>) {
    let mut client = None;
    let mut warned: HashSet<ErrorReason> = HashSet::new();
    let mut failing_since_ok = true;
    let mut backoff = BACKOFF_MIN;
    let mut miss_gap = MISS_GAP_MIN;
    loop {
        let started = Instant::now();
        let result = match &client {
            Some(c) => read_pods(c, &target).await,
            None => match build_client(&target) {
                Ok(c) => {
                    let r = read_pods(&c, &target).await;
                    client = Some(c);
                    r
                }
                Err(f) => Err(f),
            },
        };
        let next = match result {
            Ok(list) => {
                let pods: HashMap<String, Arc<PodMeta>> = list
                    .items
                    .iter()
                    .filter(|p| !p.metadata.uid.is_empty())
                    .map(|p| {
                        (
                            p.metadata.uid.to_ascii_lowercase(),
                            Arc::new(PodMeta::new(p, &target.node)),
                        )
                    })
                    .collect();
                let count = pods.len();
                let new = cache.replace(pods);
                metrics
                    .kubernetes
                    .pods
                    .store(count as u64, Ordering::Relaxed);
                metrics.kubernetes.refreshes.fetch_add(1, Ordering::Relaxed);
                if failing_since_ok {
                    info!(pods = count, node = %target.node, "Kubernetes metadata: the node's pods are read");
                }
                failing_since_ok = false;
                warned.clear();
                backoff = BACKOFF_MIN;
                miss_gap = if new > 0 {
                    MISS_GAP_MIN
                } else {
                    (miss_gap * 2).min(target.refresh_interval)
                };
                Some(started + target.refresh_interval)
            }
            Err(f) => {
                metrics.kubernetes.error(f.reason);
                if warned.insert(f.reason) {
                    warn!(reason = f.reason.label(), url = %target.url, "{}; spans carry no Kubernetes metadata beyond k8s.pod.uid until a read succeeds (tried again with backoff); tracing goes on", f.message);
                }
                failing_since_ok = true;
                let wait = backoff;
                backoff = (backoff * 2).min(target.refresh_interval);
                // A refused TLS config is built again next time (the CA may be fixed).
                if f.reason == ErrorReason::Tls {
                    client = None;
                }
                // While failing, a missing pod does not bring the next try closer.
                sleep_until(started + wait).await;
                None
            }
        };
        if let Some(next) = next {
            tokio::select! {
                _ = sleep_until(next) => {}
                _ = cache.wanted.notified() => {
                    sleep_until((started + miss_gap).min(next)).await;
                }
            }
        }
    }
}

fn build_client(target: &Target) -> Result<reqwest::Client, Failure> {
    let tls_failure = |message: String| Failure {
        reason: ErrorReason::Tls,
        message,
    };
    let roots = super::read_ca(&target.ca_file).map_err(tls_failure)?;
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| tls_failure(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .user_agent(concat!("sonde/", env!("CARGO_PKG_VERSION")))
        .timeout(REQUEST_TIMEOUT)
        .connect_timeout(REQUEST_TIMEOUT)
        .build()
        .map_err(|e| tls_failure(e.to_string()))
}

async fn read_pods(client: &reqwest::Client, target: &Target) -> Result<PodList, Failure> {
    let token = std::fs::read_to_string(&target.token_file).map_err(|e| Failure {
        reason: ErrorReason::Token,
        message: format!(
            "cannot read the service account token {}: {e}",
            target.token_file.display()
        ),
    })?;
    let response = client
        .get(&target.url)
        .bearer_auth(token.trim())
        .header(reqwest::header::ACCEPT, "application/json")
        .send()
        .await
        .map_err(|e| classify(&e, target))?;
    let status = response.status();
    let body = response.bytes().await.map_err(|e| classify(&e, target))?;
    if !status.is_success() {
        return Err(status_failure(status.as_u16(), &body, target));
    }
    if body.len() > MAX_BODY {
        return Err(Failure {
            reason: ErrorReason::InvalidResponse,
            message: format!(
                "the pod list is {} bytes, more than sonde takes",
                body.len()
            ),
        });
    }
    // A node's pod list can be a few MB: parsed off the event loop's thread.
    tokio::task::spawn_blocking(move || serde_json::from_slice::<PodList>(&body))
        .await
        .map_err(|e| Failure {
            reason: ErrorReason::InvalidResponse,
            message: format!("parsing the pod list failed: {e}"),
        })?
        .map_err(|e| Failure {
            reason: ErrorReason::InvalidResponse,
            message: format!("the answer is not a Kubernetes PodList: {e}"),
        })
}

/// What a non-2xx answer means; the API server's Status message is quoted.
fn status_failure(status: u16, body: &[u8], target: &Target) -> Failure {
    let said = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("message")?.as_str().map(str::to_owned))
        .unwrap_or_else(|| String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned());
    let (reason, message) = match status {
        401 => (
            ErrorReason::Unauthorized,
            format!(
                "the Kubernetes API refused sonde's service account token {} (401 Unauthorized: {said}); check that the token is mounted (automountServiceAccountToken: true) and not expired",
                target.token_file.display()
            ),
        ),
        403 => (
            ErrorReason::Forbidden,
            format!(
                "the Kubernetes API forbids sonde's service account to list pods (403 Forbidden: {said}); apply the ClusterRole and ClusterRoleBinding of deploy/kubernetes/sonde-daemonset.yaml or the Helm chart (get, list and watch on pods{})",
                if target.source == super::Source::Kubelet {
                    ", get on nodes/proxy for the kubelet"
                } else {
                    ""
                }
            ),
        ),
        _ => (
            ErrorReason::HttpStatus,
            format!("the pod list answered HTTP {status}: {said}"),
        ),
    };
    Failure { reason, message }
}

fn classify(e: &reqwest::Error, target: &Target) -> Failure {
    let mut chain = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        chain.push_str(": ");
        chain.push_str(&s.to_string());
        source = s.source();
    }
    let lower = chain.to_ascii_lowercase();
    if lower.contains("certificate") || lower.contains("tls") || lower.contains("handshake") {
        Failure {
            reason: ErrorReason::Tls,
            message: format!(
                "TLS with the Kubernetes API failed ({chain}); its certificate must be signed by the CA in {}",
                target.ca_file.display()
            ),
        }
    } else if e.is_timeout() {
        Failure {
            reason: ErrorReason::Timeout,
            message: format!(
                "the Kubernetes API did not answer within {REQUEST_TIMEOUT:?} ({chain})"
            ),
        }
    } else {
        Failure {
            reason: ErrorReason::Unreachable,
            message: format!("cannot reach the Kubernetes API ({chain})"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(source: super::super::Source) -> Target {
        Target {
            source,
            url: "https://10.96.0.1:443/api/v1/pods".into(),
            token_file: "/sa/token".into(),
            ca_file: "/sa/ca.crt".into(),
            node: "n".into(),
            refresh_interval: Duration::from_secs(60),
        }
    }

    #[test]
    fn refusals_name_the_cause_and_the_fix() {
        let api = target(super::super::Source::ApiServer);
        let body = br#"{"kind":"Status","message":"pods is forbidden: User \"system:serviceaccount:sonde:sonde\" cannot list resource \"pods\"","code":403}"#;
        let f = status_failure(403, body, &api);
        assert_eq!(f.reason, ErrorReason::Forbidden);
        assert!(
            f.message.contains("cannot list resource")
                && f.message.contains("ClusterRole")
                && !f.message.contains("nodes/proxy"),
            "{}",
            f.message
        );
        let kubelet = target(super::super::Source::Kubelet);
        assert!(
            status_failure(403, b"Forbidden", &kubelet)
                .message
                .contains("nodes/proxy")
        );
        let f = status_failure(401, br#"{"message":"Unauthorized"}"#, &api);
        assert_eq!(f.reason, ErrorReason::Unauthorized);
        assert!(
            f.message.contains("/sa/token") && f.message.contains("automountServiceAccountToken"),
            "{}",
            f.message
        );
        let f = status_failure(503, b"upstream connect error", &api);
        assert_eq!(f.reason, ErrorReason::HttpStatus);
        assert!(f.message.contains("503") && f.message.contains("upstream connect error"));
    }
}
