//! What a pod is, from the Kubernetes API's PodList (the API server's
//! `/api/v1/pods?fieldSelector=spec.nodeName=N` and the kubelet's `/pods` answer the
//! same shape): its names, its containers by id, and its workload.
//!
//! The workload comes from the pod's own controller ownerReference and the naming rules
//! of the controllers that make pods, so that reading pods is the only permission the
//! agent needs (no get on replicasets or jobs):
//! - a ReplicaSet made by a Deployment is named `<deployment>-<pod-template-hash>`, and
//!   the pod carries that hash in its `pod-template-hash` label;
//! - a Job made by a CronJob is named `<cronjob>-<scheduled time in minutes>`;
//! - StatefulSets and DaemonSets own their pods directly.
//!
//! A ReplicaSet or a Job made by hand with a name of that shape is taken for a
//! Deployment's or a CronJob's: the names alone cannot tell them apart.

use std::collections::HashMap;

use opentelemetry_semantic_conventions::resource as res;
use serde::Deserialize;

use crate::spans::KeyValue;

/// A PodList, with only the fields sonde reads.
#[derive(Debug, Default, Deserialize)]
pub struct PodList {
    #[serde(default)]
    pub items: Vec<Pod>,
}

#[derive(Debug, Default, Deserialize)]
pub struct Pod {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: PodSpec,
    #[serde(default)]
    pub status: PodStatus,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub namespace: String,
    #[serde(default)]
    pub uid: String,
    #[serde(default)]
    pub labels: HashMap<String, String>,
    #[serde(default)]
    pub owner_references: Vec<OwnerReference>,
}

#[derive(Debug, Default, Deserialize)]
pub struct OwnerReference {
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub controller: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    #[serde(default)]
    pub node_name: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStatus {
    #[serde(default)]
    pub container_statuses: Vec<ContainerStatus>,
    #[serde(default)]
    pub init_container_statuses: Vec<ContainerStatus>,
    #[serde(default)]
    pub ephemeral_container_statuses: Vec<ContainerStatus>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerStatus {
    #[serde(default)]
    pub name: String,
    /// `<runtime>://<id>`, e.g. `containerd://3f4e...`; absent until it started.
    #[serde(default, rename = "containerID")]
    pub container_id: Option<String>,
}

/// The workload a pod belongs to, as resource attributes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Workload {
    pub attributes: Vec<(&'static str, String)>,
    /// The name `service.name` takes when sonde would otherwise guess one.
    pub service_name: Option<String>,
}

/// One pod as spans get it.
#[derive(Clone, Debug, PartialEq)]
pub struct PodMeta {
    /// Namespace, pod name and uid, node, workload.
    pub attributes: Vec<KeyValue>,
    /// Container id (without the runtime's `<runtime>://`) to container name.
    pub containers: HashMap<String, String>,
    pub workload_service_name: Option<String>,
}

impl PodMeta {
    /// `node` is the node sonde runs on, for pods whose spec does not say (none should).
    pub fn new(pod: &Pod, node: &str) -> Self {
        let meta = &pod.metadata;
        let mut attributes = vec![
            KeyValue::new(res::K8S_NAMESPACE_NAME, meta.namespace.clone()),
            KeyValue::new(res::K8S_POD_NAME, meta.name.clone()),
            KeyValue::new(
                res::K8S_NODE_NAME,
                pod.spec
                    .node_name
                    .clone()
                    .unwrap_or_else(|| node.to_owned()),
            ),
        ];
        let workload = workload(meta);
        attributes.extend(
            workload
                .attributes
                .into_iter()
                .map(|(k, v)| KeyValue::new(k, v)),
        );
        let status = &pod.status;
        let containers = status
            .container_statuses
            .iter()
            .chain(&status.init_container_statuses)
            .chain(&status.ephemeral_container_statuses)
            .filter_map(|c| {
                let id = c.container_id.as_deref()?;
                let id = id.split_once("://").map_or(id, |(_, id)| id);
                (!id.is_empty()).then(|| (id.to_owned(), c.name.clone()))
            })
            .collect();
        PodMeta {
            attributes,
            containers,
            workload_service_name: workload.service_name,
        }
    }
}

/// The pod's workload, from its controller's ownerReference and the controllers'
/// naming rules (see the module comment).
pub fn workload(meta: &ObjectMeta) -> Workload {
    let Some(owner) = meta
        .owner_references
        .iter()
        .find(|o| o.controller == Some(true))
        .or_else(|| meta.owner_references.first())
    else {
        return Workload::default();
    };
    let name = owner.name.clone();
    let mut w = Workload::default();
    match owner.kind.as_str() {
        "ReplicaSet" => {
            let deployment = deployment_of(&name, meta.labels.get("pod-template-hash"));
            w.service_name = Some(deployment.clone().unwrap_or_else(|| name.clone()));
            if let Some(d) = deployment {
                w.attributes.push((res::K8S_DEPLOYMENT_NAME, d));
            }
            w.attributes.push((res::K8S_REPLICASET_NAME, name));
        }
        "StatefulSet" => {
            w.service_name = Some(name.clone());
            w.attributes.push((res::K8S_STATEFULSET_NAME, name));
        }
        "DaemonSet" => {
            w.service_name = Some(name.clone());
            w.attributes.push((res::K8S_DAEMONSET_NAME, name));
        }
        "Job" => {
            let cronjob = cronjob_of(&name);
            w.service_name = Some(cronjob.clone().unwrap_or_else(|| name.clone()));
            if let Some(c) = cronjob {
                w.attributes.push((res::K8S_CRONJOB_NAME, c));
            }
            w.attributes.push((res::K8S_JOB_NAME, name));
        }
        _ => {}
    }
    w
}

/// The Deployment whose ReplicaSet `rs` is: `rs` without its `-<pod-template-hash>`.
/// The pod's `pod-template-hash` label says which hash; without the label, a last part
/// made of the characters Kubernetes spells hashes with (no vowels, no 0, 1 or 3) is
/// taken for it.
pub fn deployment_of(rs: &str, template_hash: Option<&String>) -> Option<String> {
    let (base, suffix) = rs.rsplit_once('-')?;
    if base.is_empty() {
        return None;
    }
    let is_hash = match template_hash {
        Some(hash) => suffix == hash,
        None => {
            (5..=10).contains(&suffix.len())
                && suffix
                    .bytes()
                    .all(|b| b"bcdfghjklmnpqrstvwxz2456789".contains(&b))
        }
    };
    is_hash.then(|| base.to_owned())
}

/// The CronJob whose Job `job` is: `job` without its `-<minutes since the epoch>`.
pub fn cronjob_of(job: &str) -> Option<String> {
    let (base, suffix) = job.rsplit_once('-')?;
    (!base.is_empty() && suffix.len() >= 8 && suffix.bytes().all(|b| b.is_ascii_digit()))
        .then(|| base.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owned_by(kind: &str, name: &str, hash: Option<&str>) -> ObjectMeta {
        ObjectMeta {
            name: "p".into(),
            namespace: "ns".into(),
            uid: "u".into(),
            labels: hash
                .map(|h| HashMap::from([("pod-template-hash".to_owned(), h.to_owned())]))
                .unwrap_or_default(),
            owner_references: vec![OwnerReference {
                kind: kind.into(),
                name: name.into(),
                controller: Some(true),
            }],
        }
    }

    fn attrs(w: &Workload) -> Vec<(&str, &str)> {
        w.attributes.iter().map(|(k, v)| (*k, v.as_str())).collect()
    }

    #[test]
    fn a_replicaset_of_a_deployment_names_the_deployment() {
        let w = workload(&owned_by(
            "ReplicaSet",
            "shop-api-7d4b9c8f6d",
            Some("7d4b9c8f6d"),
        ));
        assert_eq!(
            attrs(&w),
            [
                ("k8s.deployment.name", "shop-api"),
                ("k8s.replicaset.name", "shop-api-7d4b9c8f6d")
            ]
        );
        assert_eq!(w.service_name.as_deref(), Some("shop-api"));
        // The label decides: a suffix that is not the pod's template hash stays.
        let w = workload(&owned_by("ReplicaSet", "mes-blue", Some("5f6d7c8b9")));
        assert_eq!(attrs(&w), [("k8s.replicaset.name", "mes-blue")]);
        assert_eq!(w.service_name.as_deref(), Some("mes-blue"));
        // Without the label, the hash alphabet does.
        assert_eq!(
            deployment_of("crm-api-5c9fbd6b7", None).as_deref(),
            Some("crm-api")
        );
        assert_eq!(deployment_of("crm-api-blue", None), None);
        assert_eq!(deployment_of("standalone", None), None);
        assert_eq!(
            deployment_of("-7d4b9c8f6d", Some(&"7d4b9c8f6d".into())),
            None
        );
    }

    #[test]
    fn statefulsets_daemonsets_jobs_and_cronjobs() {
        let w = workload(&owned_by("StatefulSet", "rabbitmq", None));
        assert_eq!(attrs(&w), [("k8s.statefulset.name", "rabbitmq")]);
        assert_eq!(w.service_name.as_deref(), Some("rabbitmq"));
        let w = workload(&owned_by("DaemonSet", "sonde", None));
        assert_eq!(attrs(&w), [("k8s.daemonset.name", "sonde")]);
        let w = workload(&owned_by("Job", "nightly-report-29412360", None));
        assert_eq!(
            attrs(&w),
            [
                ("k8s.cronjob.name", "nightly-report"),
                ("k8s.job.name", "nightly-report-29412360")
            ]
        );
        assert_eq!(w.service_name.as_deref(), Some("nightly-report"));
        let w = workload(&owned_by("Job", "migrate-42", None));
        assert_eq!(attrs(&w), [("k8s.job.name", "migrate-42")]);
        assert_eq!(w.service_name.as_deref(), Some("migrate-42"));
    }

    #[test]
    fn a_bare_pod_or_an_unknown_owner_has_no_workload() {
        let mut bare = owned_by("ReplicaSet", "x", None);
        bare.owner_references.clear();
        assert_eq!(workload(&bare), Workload::default());
        assert_eq!(
            workload(&owned_by("Node", "node-1", None)),
            Workload::default()
        );
        // The controller reference wins over other owners.
        let mut two = owned_by("StatefulSet", "db", None);
        two.owner_references.insert(
            0,
            OwnerReference {
                kind: "ConfigMap".into(),
                name: "c".into(),
                controller: None,
            },
        );
        assert_eq!(attrs(&workload(&two)), [("k8s.statefulset.name", "db")]);
    }

    /// The shape of a real API server's answer (trimmed), with the fields sonde reads.
    #[test]
    fn a_pod_list_gives_names_containers_and_workload() {
        let json = r#"{"kind":"PodList","apiVersion":"v1","metadata":{"resourceVersion":"4711"},
          "items":[{"metadata":{"name":"shop-api-7d4b9c8f6d-x2k9p","generateName":"shop-api-7d4b9c8f6d-",
            "namespace":"orders","uid":"0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0",
            "labels":{"app":"shop-api","pod-template-hash":"7d4b9c8f6d"},
            "ownerReferences":[{"apiVersion":"apps/v1","kind":"ReplicaSet","name":"shop-api-7d4b9c8f6d",
              "uid":"9a8b7c6d-0000-1111-2222-333344445555","controller":true,"blockOwnerDeletion":true}]},
            "spec":{"nodeName":"node-a","containers":[{"name":"shop","image":"shop:1"}]},
            "status":{"phase":"Running",
              "initContainerStatuses":[{"name":"migrate","containerID":"containerd://aaaa","ready":false}],
              "containerStatuses":[{"name":"shop","containerID":"containerd://3f4e","ready":true},
                                   {"name":"sidecar","ready":false}]}}]}"#;
        let list: PodList = serde_json::from_str(json).unwrap();
        let meta = PodMeta::new(&list.items[0], "fallback");
        let got: Vec<(&str, String)> = meta
            .attributes
            .iter()
            .map(|kv| (kv.key, format!("{:?}", kv.value)))
            .collect();
        let keys: Vec<&str> = got.iter().map(|(k, _)| *k).collect();
        assert_eq!(
            keys,
            [
                "k8s.namespace.name",
                "k8s.pod.name",
                "k8s.node.name",
                "k8s.deployment.name",
                "k8s.replicaset.name"
            ]
        );
        assert!(got[2].1.contains("node-a"), "{got:?}");
        assert_eq!(
            meta.containers.get("3f4e").map(String::as_str),
            Some("shop")
        );
        assert_eq!(
            meta.containers.get("aaaa").map(String::as_str),
            Some("migrate")
        );
        assert_eq!(meta.containers.len(), 2);
        assert_eq!(meta.workload_service_name.as_deref(), Some("shop-api"));
    }
}
