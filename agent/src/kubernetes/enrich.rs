//! The pod cache, and the sink stage that gives spans their pod's attributes.

use std::{
    collections::HashMap,
    sync::{
        Arc, RwLock,
        atomic::{AtomicU64, Ordering},
    },
};

use opentelemetry_semantic_conventions::resource as res;

use super::pods::PodMeta;
use crate::{
    FastMap,
    pipeline::Sink,
    spans::{KeyValue, Resource, Value},
    telemetry::Metrics,
};

/// Most resources remembered by the enricher; past it the memory starts over (each
/// process's resource is then enriched once more).
const MAX_REMEMBERED: usize = 16384;

/// The pods of this node by uid, replaced whole by each successful read.
#[derive(Debug, Default)]
pub struct PodCache {
    pods: RwLock<HashMap<String, Arc<PodMeta>>>,
    /// Bumped by each replacement: resources enriched from an older cache are looked at
    /// again.
    generation: AtomicU64,
    /// Told when a span's pod is not in the cache.
    pub(super) wanted: tokio::sync::Notify,
}

impl PodCache {
    /// Puts `pods` in place of what was there; returns how many uids are new.
    pub fn replace(&self, pods: HashMap<String, Arc<PodMeta>>) -> usize {
        let mut held = self.pods.write().unwrap_or_else(|p| p.into_inner());
        let new = pods.keys().filter(|uid| !held.contains_key(*uid)).count();
        *held = pods;
        self.generation.fetch_add(1, Ordering::Release);
        new
    }

    pub fn get(&self, uid: &str) -> Option<Arc<PodMeta>> {
        self.pods
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(uid)
            .cloned()
    }

    pub fn len(&self) -> usize {
        self.pods.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }
}

/// Gives each span's resource its pod's attributes, from the cache. A resource is
/// enriched once and the result reused for the process's later spans; one enriched
/// without its pod (or container) is looked at again after the cache changes.
pub struct Enricher {
    cache: Arc<PodCache>,
    metrics: Arc<Metrics>,
    /// By the address of the resource as the pipeline built it (the memo holds it, so
    /// the address is not reused while it is here).
    memo: FastMap<usize, Memo>,
}

struct Memo {
    _original: Arc<Resource>,
    enriched: Arc<Resource>,
    /// None: final. Some(generation): the pod or its container was missing in that
    /// generation of the cache.
    retry: Option<Retry>,
}

#[derive(Clone, Copy)]
struct Retry {
    generation: u64,
    pod_found: bool,
}

impl Enricher {
    pub fn new(cache: Arc<PodCache>, metrics: Arc<Metrics>) -> Self {
        Enricher {
            cache,
            metrics,
            memo: FastMap::default(),
        }
    }

    /// `next` behind this enricher.
    pub fn sink(mut self, mut next: Sink) -> Sink {
        Box::new(move |mut span| {
            span.resource = self.resource(&span.resource);
            next(span);
        })
    }

    /// The resource spans of `resource`'s process leave with.
    pub fn resource(&mut self, resource: &Arc<Resource>) -> Arc<Resource> {
        let key = Arc::as_ptr(resource) as usize;
        let generation = self.cache.generation();
        if let Some(m) = self.memo.get(&key) {
            match m.retry {
                None => return m.enriched.clone(),
                Some(r) if r.generation == generation => {
                    if !r.pod_found {
                        Metrics::inc(&self.metrics.kubernetes.spans_without_pod);
                    }
                    return m.enriched.clone();
                }
                Some(_) => {}
            }
        }
        let uid = resource.attributes.iter().find_map(|kv| match &kv.value {
            Value::Str(uid) if kv.key == res::K8S_POD_UID => Some(uid.as_str()),
            _ => None,
        });
        let (enriched, retry) = match uid {
            None => (resource.clone(), None),
            Some(uid) => match self.cache.get(uid) {
                None => {
                    Metrics::inc(&self.metrics.kubernetes.spans_without_pod);
                    self.cache.wanted.notify_one();
                    let retry = Retry {
                        generation,
                        pod_found: false,
                    };
                    (resource.clone(), Some(retry))
                }
                Some(pod) => {
                    let (enriched, container_found) = with_pod(resource, &pod);
                    let retry = (!container_found).then_some(Retry {
                        generation,
                        pod_found: true,
                    });
                    (Arc::new(enriched), retry)
                }
            },
        };
        if self.memo.len() >= MAX_REMEMBERED {
            self.memo.clear();
        }
        self.memo.insert(
            key,
            Memo {
                _original: resource.clone(),
                enriched: enriched.clone(),
                retry,
            },
        );
        enriched
    }
}

/// `resource` with `pod`'s attributes, and whether its container was found in the pod
/// (true when the process's cgroup names no container).
fn with_pod(resource: &Resource, pod: &PodMeta) -> (Resource, bool) {
    let mut out = resource.clone();
    for kv in &pod.attributes {
        if !out.attributes.iter().any(|a| a.key == kv.key) {
            out.attributes.push(kv.clone());
        }
    }
    let container_id = resource.attributes.iter().find_map(|kv| match &kv.value {
        Value::Str(id) if kv.key == res::CONTAINER_ID => Some(id.as_str()),
        _ => None,
    });
    let container = container_id.map(|id| pod.containers.get(id));
    if let Some(Some(name)) = container {
        out.attributes
            .push(KeyValue::new(res::K8S_CONTAINER_NAME, name.clone()));
    }
    if out.generic_name
        && let Some(workload) = &pod.workload_service_name
    {
        out.service_name = workload.clone();
        out.generic_name = false;
    }
    (out, !matches!(container, Some(None)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";
    const CID: &str = "3f4e5d6c7b8a99887766554433221100ffeeddccbbaa99887766554433221100";

    fn in_pod(generic: bool) -> Arc<Resource> {
        Arc::new(Resource {
            service_name: "python3".into(),
            pid: 7,
            executable_name: "python3".into(),
            host_name: "h".into(),
            attributes: vec![
                KeyValue::new(res::CONTAINER_ID, CID),
                KeyValue::new(res::K8S_POD_UID, UID),
            ],
            generic_name: generic,
        })
    }

    fn pod(container_id: &str) -> HashMap<String, Arc<PodMeta>> {
        let json = format!(
            r#"{{"metadata":{{"name":"shop-api-7d4b9c8f6d-x2k9p","namespace":"orders","uid":"{UID}",
            "labels":{{"pod-template-hash":"7d4b9c8f6d"}},
            "ownerReferences":[{{"kind":"ReplicaSet","name":"shop-api-7d4b9c8f6d","controller":true}}]}},
            "spec":{{"nodeName":"node-a"}},
            "status":{{"containerStatuses":[{{"name":"shop","containerID":"containerd://{container_id}"}}]}}}}"#
        );
        let pod: super::super::pods::Pod = serde_json::from_str(&json).unwrap();
        HashMap::from([(UID.to_owned(), Arc::new(PodMeta::new(&pod, "node-a")))])
    }

    fn attr<'a>(r: &'a Resource, key: &str) -> Option<&'a Value> {
        r.attributes
            .iter()
            .find(|kv| kv.key == key)
            .map(|kv| &kv.value)
    }

    fn s(v: &str) -> Value {
        Value::Str(v.into())
    }

    #[test]
    fn spans_get_their_pod_once_it_is_known_and_are_counted_until_then() {
        let cache = Arc::new(PodCache::default());
        let metrics = Arc::new(Metrics::default());
        let mut e = Enricher::new(cache.clone(), metrics.clone());
        let r = in_pod(true);
        // Not known yet: as it is, counted, and a refresh asked for.
        assert_eq!(e.resource(&r), r);
        assert_eq!(e.resource(&r), r);
        assert_eq!(
            metrics.kubernetes.spans_without_pod.load(Ordering::Relaxed),
            2
        );
        assert_eq!(cache.replace(pod(CID)), 1);
        let got = e.resource(&r);
        assert_eq!(attr(&got, "k8s.namespace.name"), Some(&s("orders")));
        assert_eq!(
            attr(&got, "k8s.pod.name"),
            Some(&s("shop-api-7d4b9c8f6d-x2k9p"))
        );
        assert_eq!(attr(&got, "k8s.container.name"), Some(&s("shop")));
        assert_eq!(attr(&got, "k8s.deployment.name"), Some(&s("shop-api")));
        assert_eq!(attr(&got, "k8s.node.name"), Some(&s("node-a")));
        assert_eq!(got.service_name, "shop-api");
        assert_eq!(
            got.attributes
                .iter()
                .filter(|kv| kv.key == "k8s.pod.uid")
                .count(),
            1
        );
        // Reused, and final: a later cache without the pod does not take it away.
        assert!(Arc::ptr_eq(&got, &e.resource(&r)));
        cache.replace(HashMap::new());
        assert!(Arc::ptr_eq(&got, &e.resource(&r)));
        assert_eq!(
            metrics.kubernetes.spans_without_pod.load(Ordering::Relaxed),
            2
        );
    }

    #[test]
    fn a_name_of_the_process_or_a_rule_is_kept_and_a_new_container_is_looked_for_again() {
        let cache = Arc::new(PodCache::default());
        let mut e = Enricher::new(cache.clone(), Arc::new(Metrics::default()));
        cache.replace(pod("another"));
        let named = in_pod(false);
        let got = e.resource(&named);
        assert_eq!(got.service_name, "python3");
        assert!(attr(&got, "k8s.pod.name").is_some());
        assert_eq!(attr(&got, "k8s.container.name"), None);
        // The container's status shows its id a moment after it started.
        cache.replace(pod(CID));
        assert_eq!(
            attr(&e.resource(&named), "k8s.container.name"),
            Some(&s("shop"))
        );
    }

    #[test]
    fn a_process_outside_pods_is_left_alone() {
        let cache = Arc::new(PodCache::default());
        let metrics = Arc::new(Metrics::default());
        let mut e = Enricher::new(cache, metrics.clone());
        let mut plain = (*in_pod(true)).clone();
        plain.attributes.clear();
        let plain = Arc::new(plain);
        assert!(Arc::ptr_eq(&e.resource(&plain), &plain));
        assert_eq!(
            metrics.kubernetes.spans_without_pod.load(Ordering::Relaxed),
            0
        );
    }
}
