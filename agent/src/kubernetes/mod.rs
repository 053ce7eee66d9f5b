//! Kubernetes metadata on spans: which namespace, pod, container and workload a traced
//! process belongs to.
//!
//! The process's cgroup gives its pod's uid and its container's id
//! ([`crate::process`]); the API server (or the node's kubelet) gives what those are:
//! a list of the pods on this node, read by a background task ([`client`]) into a cache
//! by pod uid ([`enrich::PodCache`]), at start, every `refresh_interval`, and sooner when
//! a span's pod is not in it yet. Spans take the pod's attributes on their way out
//! ([`Enricher`]); a span whose pod is not known yet leaves without them, counted
//! (`sonde_k8s_spans_without_pod_metadata_total`), and its process's later spans get
//! them once the pod is found. Nothing here ever waits on the network in the event
//! loop.
//!
//! Outside a cluster (no service account token) this is off, said once at info level.
//! Errors from the API (401, 403, TLS, unreachable) are one warning per kind until a
//! read succeeds again, each counted in `sonde_k8s_metadata_errors_total{reason}`;
//! tracing goes on without the metadata.

mod client;
mod enrich;
pub mod pods;

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use serde::Deserialize;
use tracing::{info, warn};

pub use enrich::{Enricher, PodCache};

use crate::telemetry::Metrics;

/// Where a pod's service account token and CA are mounted.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
const DEFAULT_REFRESH: Duration = Duration::from_secs(60);

/// The config file's `kubernetes:` section.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesConfig {
    /// auto (on when a service account token is mounted), true or false.
    #[serde(default)]
    pub enabled: Enabled,
    #[serde(default)]
    pub source: Source,
    /// How often the node's pods are read again (besides when a span's pod is unknown).
    #[serde(
        default = "default_refresh",
        deserialize_with = "crate::kubernetes::duration"
    )]
    pub refresh_interval: Duration,
    /// The API server's URL; default `https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT`.
    #[serde(default)]
    pub api_server: Option<String>,
    /// The kubelet's URL for `source: kubelet`; default `https://$NODE_IP:10250`
    /// (127.0.0.1 without NODE_IP).
    #[serde(default)]
    pub kubelet_url: Option<String>,
    /// Where the token and ca.crt are; default the pod's service account mount.
    #[serde(default)]
    pub service_account_dir: Option<PathBuf>,
    /// This node's name; default `$NODE_NAME` (the downward API), then the host name.
    #[serde(default)]
    pub node_name: Option<String>,
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        KubernetesConfig {
            enabled: Enabled::Auto,
            source: Source::ApiServer,
            refresh_interval: DEFAULT_REFRESH,
            api_server: None,
            kubelet_url: None,
            service_account_dir: None,
            node_name: None,
        }
    }
}

fn default_refresh() -> Duration {
    DEFAULT_REFRESH
}

fn duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    let value = humantime::parse_duration(text.trim())
        .map_err(|e| serde::de::Error::custom(format!("{text:?} is not a duration: {e}")))?;
    if value < Duration::from_secs(1) {
        return Err(serde::de::Error::custom(format!(
            "refresh_interval {text:?} is below 1s: every node would list its pods that often"
        )));
    }
    Ok(value)
}

/// `enabled:` auto, true or false.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Enabled {
    #[default]
    Auto,
    On,
    Off,
}

impl<'de> Deserialize<'de> for Enabled {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Enabled;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("auto, true or false")
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Enabled, E> {
                Ok(if v { Enabled::On } else { Enabled::Off })
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Enabled, E> {
                match v {
                    "auto" => Ok(Enabled::Auto),
                    "true" => Ok(Enabled::On),
                    "false" => Ok(Enabled::Off),
                    _ => Err(E::custom(format!(
                        "enabled: {v:?} is not auto, true or false"
                    ))),
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// Where pods are read from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// `GET /api/v1/pods?fieldSelector=spec.nodeName=<node>` on the API server (needs
    /// list on pods).
    #[default]
    ApiServer,
    /// `GET /pods` on this node's kubelet (needs get on nodes/proxy).
    Kubelet,
}

impl Source {
    fn label(self) -> &'static str {
        match self {
            Source::ApiServer => "apiserver",
            Source::Kubelet => "kubelet",
        }
    }
}

/// Why reading pods failed: the `reason` label of `sonde_k8s_metadata_errors_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorReason {
    /// 401: the token was refused.
    Unauthorized,
    /// 403: the service account may not list pods (RBAC).
    Forbidden,
    /// The server's certificate is not signed by the service account's CA, or the
    /// handshake failed otherwise.
    Tls,
    /// No connection (refused, no route, DNS).
    Unreachable,
    /// No answer in time.
    Timeout,
    /// Another HTTP status.
    HttpStatus,
    /// An answer that is not a PodList.
    InvalidResponse,
    /// The token file could not be read.
    Token,
    /// `enabled: true`, but the agent is not set up to reach the cluster.
    Config,
}

impl ErrorReason {
    pub const ALL: [ErrorReason; 9] = [
        ErrorReason::Unauthorized,
        ErrorReason::Forbidden,
        ErrorReason::Tls,
        ErrorReason::Unreachable,
        ErrorReason::Timeout,
        ErrorReason::HttpStatus,
        ErrorReason::InvalidResponse,
        ErrorReason::Token,
        ErrorReason::Config,
    ];

    pub fn label(self) -> &'static str {
        match self {
            ErrorReason::Unauthorized => "unauthorized",
            ErrorReason::Forbidden => "forbidden",
            ErrorReason::Tls => "tls",
            ErrorReason::Unreachable => "unreachable",
            ErrorReason::Timeout => "timeout",
            ErrorReason::HttpStatus => "http_status",
            ErrorReason::InvalidResponse => "invalid_response",
            ErrorReason::Token => "token",
            ErrorReason::Config => "config",
        }
    }
}

/// The counters of this module, on /metrics.
#[derive(Debug, Default)]
pub struct K8sMetrics {
    /// Failed reads of the node's pods, by [`ErrorReason`].
    pub errors: [AtomicU64; ErrorReason::ALL.len()],
    /// Successful reads of the node's pods.
    pub refreshes: AtomicU64,
    /// Pods in the cache (a gauge).
    pub pods: AtomicU64,
    /// Spans of a process in a pod's cgroup that left without the pod's metadata (the
    /// pod was not found yet).
    pub spans_without_pod: AtomicU64,
}

impl K8sMetrics {
    pub fn error(&self, reason: ErrorReason) {
        self.errors[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn errors(&self, reason: ErrorReason) -> u64 {
        self.errors[reason as usize].load(Ordering::Relaxed)
    }
}

/// What the background task reads, resolved from the config and the environment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub source: Source,
    /// The full URL of the pod list.
    pub url: String,
    pub token_file: PathBuf,
    pub ca_file: PathBuf,
    pub node: String,
    pub refresh_interval: Duration,
}

/// Why the metadata is off.
#[derive(Debug, PartialEq, Eq)]
pub enum Off {
    /// Turned off in the config file.
    Disabled,
    /// Not in a cluster (auto): said at info level.
    NotInCluster(String),
    /// Asked for (`enabled: true`) but not reachable: a warning, counted.
    Misconfigured(String),
}

/// Decides whether the metadata is on and where it comes from; `env` reads an
/// environment variable.
pub fn resolve(
    config: &KubernetesConfig,
    env: &dyn Fn(&str) -> Option<String>,
    host_name: &str,
) -> Result<Target, Off> {
    if config.enabled == Enabled::Off {
        return Err(Off::Disabled);
    }
    let dir = config
        .service_account_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(SERVICE_ACCOUNT_DIR));
    let token_file = dir.join("token");
    let ca_file = dir.join("ca.crt");
    let missing = |what: String| {
        if config.enabled == Enabled::Auto {
            Off::NotInCluster(what)
        } else {
            Off::Misconfigured(what)
        }
    };
    if !token_file.is_file() {
        return Err(missing(format!(
            "no service account token at {}",
            token_file.display()
        )));
    }
    let nonempty = |name: &str| env(name).filter(|v| !v.trim().is_empty());
    let node = config
        .node_name
        .clone()
        .or_else(|| nonempty("NODE_NAME"))
        .unwrap_or_else(|| {
            warn!(node = host_name, "NODE_NAME is not set (give the DaemonSet `env: NODE_NAME` from the downward API, fieldRef spec.nodeName): taking the host name for the node's name");
            host_name.to_owned()
        });
    let base = match config.source {
        Source::ApiServer => match &config.api_server {
            Some(url) => url.trim_end_matches('/').to_owned(),
            None => {
                let (Some(host), Some(port)) = (
                    nonempty("KUBERNETES_SERVICE_HOST"),
                    nonempty("KUBERNETES_SERVICE_PORT"),
                ) else {
                    return Err(missing(
                        "KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT are not set (and no kubernetes.api_server in the config file)".to_owned(),
                    ));
                };
                format!("https://{}:{port}", bracketed(&host))
            }
        },
        Source::Kubelet => match &config.kubelet_url {
            Some(url) => url.trim_end_matches('/').to_owned(),
            None => format!(
                "https://{}:10250",
                bracketed(&nonempty("NODE_IP").unwrap_or_else(|| "127.0.0.1".to_owned()))
            ),
        },
    };
    let url = match config.source {
        Source::ApiServer => {
            let node_q: String =
                percent_encoding::utf8_percent_encode(&node, QUERY_VALUE).collect();
            format!("{base}/api/v1/pods?fieldSelector=spec.nodeName%3D{node_q}")
        }
        Source::Kubelet => format!("{base}/pods"),
    };
    Ok(Target {
        source: config.source,
        url,
        token_file,
        ca_file,
        node,
        refresh_interval: config.refresh_interval,
    })
}

/// What a query value must escape: everything but RFC 3986's unreserved characters
/// (node names, DNS subdomains, need none).
const QUERY_VALUE: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// An IPv6 address in brackets, for a URL.
fn bracketed(host: &str) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_owned()
    }
}

/// Starts the background task that reads the node's pods, on the current tokio
/// runtime; None when the metadata is off (said why in the log).
pub fn start(config: &KubernetesConfig, metrics: Arc<Metrics>) -> Option<Enricher> {
    let host_name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let env = |name: &str| std::env::var(name).ok();
    let target = match resolve(config, &env, &host_name) {
        Ok(t) => t,
        Err(Off::Disabled) => {
            info!("Kubernetes metadata is off (kubernetes.enabled: false)");
            return None;
        }
        Err(Off::NotInCluster(why)) => {
            info!(
                "not in a Kubernetes cluster ({why}): spans carry no Kubernetes metadata beyond k8s.pod.uid"
            );
            return None;
        }
        Err(Off::Misconfigured(why)) => {
            metrics.kubernetes.error(ErrorReason::Config);
            warn!(
                reason = ErrorReason::Config.label(),
                "kubernetes.enabled is true but {why}: spans carry no Kubernetes metadata beyond k8s.pod.uid; tracing goes on"
            );
            return None;
        }
    };
    info!(source = target.source.label(), url = %target.url, node = %target.node, refresh = ?target.refresh_interval, "Kubernetes metadata: reading this node's pods");
    let cache = Arc::new(PodCache::default());
    tokio::spawn(client::run(target, cache.clone(), metrics.clone()));
    Some(Enricher::new(cache, metrics))
}

/// The CA file's certificates, for the TLS config of the pod reads.
fn read_ca(path: &Path) -> Result<rustls::RootCertStore, String> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read the CA file {}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("the CA file {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "no PEM certificate in the CA file {}",
            path.display()
        ));
    }
    let mut store = rustls::RootCertStore::empty();
    for cert in certs {
        store
            .add(cert)
            .map_err(|e| format!("the CA file {}: {e}", path.display()))?;
    }
    Ok(store)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn env_of(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn outside_a_cluster_auto_is_off_and_true_is_a_warning() {
        let dir = tempfile::tempdir().unwrap();
        let config = KubernetesConfig {
            service_account_dir: Some(dir.path().to_owned()),
            ..Default::default()
        };
        let env = env_of(&[]);
        assert!(matches!(
            resolve(&config, &env, "h"),
            Err(Off::NotInCluster(why)) if why.contains("no service account token")
        ));
        let on = KubernetesConfig {
            enabled: Enabled::On,
            ..config.clone()
        };
        assert!(matches!(
            resolve(&on, &env, "h"),
            Err(Off::Misconfigured(_))
        ));
        let off = KubernetesConfig {
            enabled: Enabled::Off,
            ..config
        };
        assert_eq!(resolve(&off, &env, "h"), Err(Off::Disabled));
    }

    #[test]
    fn in_a_pod_the_api_server_and_node_come_from_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token"), "t").unwrap();
        let config = KubernetesConfig {
            service_account_dir: Some(dir.path().to_owned()),
            ..Default::default()
        };
        let env = env_of(&[
            ("KUBERNETES_SERVICE_HOST", "fd00::1"),
            ("KUBERNETES_SERVICE_PORT", "443"),
            ("NODE_NAME", "node-a.example"),
        ]);
        let t = resolve(&config, &env, "h").unwrap();
        assert_eq!(
            t.url,
            "https://[fd00::1]:443/api/v1/pods?fieldSelector=spec.nodeName%3Dnode-a.example"
        );
        assert_eq!(t.node, "node-a.example");
        assert_eq!(t.ca_file, dir.path().join("ca.crt"));
        // No service host: not in a cluster after all.
        assert!(matches!(
            resolve(&config, &env_of(&[("NODE_NAME", "n")]), "h"),
            Err(Off::NotInCluster(why)) if why.contains("KUBERNETES_SERVICE_HOST")
        ));
        let kubelet = KubernetesConfig {
            source: Source::Kubelet,
            ..config
        };
        let t = resolve(&kubelet, &env_of(&[("NODE_IP", "10.0.0.7")]), "host-7").unwrap();
        assert_eq!(t.url, "https://10.0.0.7:10250/pods");
        assert_eq!(t.node, "host-7");
    }

    #[test]
    fn the_config_section_parses_and_refuses_bad_values() {
        let s = crate::settings::Settings::parse(
            "kubernetes:\n  enabled: true\n  source: kubelet\n  refresh_interval: 30s\n",
        )
        .unwrap();
        assert_eq!(s.kubernetes.enabled, Enabled::On);
        assert_eq!(s.kubernetes.source, Source::Kubelet);
        assert_eq!(s.kubernetes.refresh_interval, Duration::from_secs(30));
        let s = crate::settings::Settings::parse("kubernetes:\n  enabled: auto\n").unwrap();
        assert_eq!(s.kubernetes.enabled, Enabled::Auto);
        assert_eq!(s.kubernetes.refresh_interval, DEFAULT_REFRESH);
        let s = crate::settings::Settings::parse("kubernetes: {enabled: false}\n").unwrap();
        assert_eq!(s.kubernetes.enabled, Enabled::Off);
        for (text, what) in [
            ("kubernetes:\n  enabled: maybe\n", "auto, true or false"),
            ("kubernetes:\n  source: etcd\n", "etcd"),
            ("kubernetes:\n  refresh_interval: 10ms\n", "below 1s"),
            ("kubernetes:\n  refresh: 10s\n", "unknown field `refresh`"),
        ] {
            let err = crate::settings::Settings::parse(text).unwrap_err();
            assert!(
                err.contains("line 2") && err.contains(what),
                "{text:?}: {err}"
            );
        }
    }
}
