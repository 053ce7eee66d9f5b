//! Process registry: from a pid to the service it is (the span resource).
//!
//! service.name comes from the process's own OTEL_SERVICE_NAME (or service.name in
//! OTEL_RESOURCE_ATTRIBUTES), else, for interpreters, the script or module it runs
//! (python3 shop.py -> "shop", python3 -m http.server -> "http.server",
//! node crm.js -> "crm"), else the executable's name.
//!
//! What a process is comes from /proc ([`Describer`]), and from its exec event when it
//! is gone before /proc is read (a curl that lived for 3 ms): the event carries its
//! comm, a prefix of its command line and the OTEL_* variables of a prefix of its
//! environment.
//!
//! In the live agent, /proc is read on the discovery thread ([`crate::discovery`]), not
//! on the pipeline's: the registry names a new process at once from what it has (the
//! exec event; for a process first seen without one, only its pid), queues a
//! [`ProcessQuery`], and takes the answer in [`ProcessRegistry::identified`]. Spans
//! built from such a provisional identity wait at the registry's gate until the answer
//! comes, at most [`IDENTITY_WAIT`], and leave with the identity /proc gave; so do spans
//! built from it later (connections opened before the answer keep the provisional one).
//! Spans that waited too long leave with the provisional identity and are counted
//! (`sonde_spans_identity_unconfirmed_total`). Each query carries a generation, so an
//! answer about a process that has since exec'd again, or exited and had its pid reused,
//! is not applied to the newer one; an answer read from /proc after the process
//! exec'd another program (its comm is not the exec event's) keeps the exec event's
//! identity. Replays and tests use [`ProcessRegistry::new`], which reads /proc itself.

use crate::FastMap;
use std::{
    fs,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use crate::{
    pipeline::Sink,
    selection::{ProcessFacts, ProcessRules},
    spans::{KeyValue, Resource, Span},
    telemetry::Metrics,
};

/// Upper bound on remembered processes; the oldest lookups are dropped past it.
const MAX_PROCESSES: usize = 16384;
/// Longest a span waits for its process's identity from /proc.
pub const IDENTITY_WAIT: Duration = Duration::from_secs(1);
/// Most spans waiting for their process's identity; past it they leave at once.
const MAX_WAITING_SPANS: usize = 10_000;
/// Most queries waiting for the discovery thread to take them.
const MAX_QUEUED_QUERIES: usize = 4096;

/// What an exec event says about the new program.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExecHint {
    pub comm: String,
    pub args: Vec<String>,
    pub env: Vec<String>,
}

/// A request to read a process's identity from /proc.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessQuery {
    pub pid: u32,
    /// Tells this identity of `pid` from earlier and later ones.
    pub generation: u64,
    /// The exec event, when the process was seen starting its program.
    pub exec: Option<ExecHint>,
}

/// The answer to a [`ProcessQuery`].
#[derive(Clone, Debug)]
pub struct Identified {
    pub pid: u32,
    pub generation: u64,
    /// None: /proc has no such process any more, or it runs another program by now.
    pub resource: Option<Resource>,
}

/// Reads processes' identities from a /proc tree.
#[derive(Clone, Debug)]
pub struct Describer {
    proc_root: PathBuf,
    host_name: String,
    /// The config file's identity rules.
    rules: Arc<ProcessRules>,
}

/// What /proc says about one process.
#[derive(Debug, Default)]
struct ProcFacts {
    env: Vec<String>,
    cmdline: Vec<String>,
    exe_path: Option<PathBuf>,
    comm: Option<String>,
    container_id: Option<String>,
    /// `k8s.pod.uid`, when the process is in a pod's cgroup.
    pod_uid: Option<String>,
    /// The executable is a Go program (it has a `.go.buildinfo` section).
    go: bool,
    cgroup: Option<String>,
}

/// sonde's resource attribute for a Go program, as the OpenTelemetry Go SDK spells it:
/// its threads do not follow its requests (goroutines move between them).
pub const RUNTIME_NAME: &str = "process.runtime.name";

/// Whether the ELF file at `path` is a Go program.
fn is_go_program(path: &Path) -> bool {
    use object::{Object, ReadCache};
    let Ok(file) = fs::File::open(path) else {
        return false;
    };
    let cache = ReadCache::new(file);
    object::File::parse(&cache).is_ok_and(|elf| elf.section_by_name(".go.buildinfo").is_some())
}

impl Describer {
    pub fn new(proc_root: impl Into<PathBuf>) -> Self {
        let proc_root = proc_root.into();
        let host_name = fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| "unknown".into());
        Describer {
            proc_root,
            host_name,
            rules: Arc::default(),
        }
    }

    /// Names processes by these identity rules too (after their own OTEL_SERVICE_NAME).
    pub fn with_rules(mut self, rules: Arc<ProcessRules>) -> Self {
        self.rules = rules;
        self
    }

    /// The process as /proc shows it now, completed by its exec event; None when /proc
    /// has no such process, or when it runs another program than `exec` says.
    pub fn describe(&self, pid: u32, exec: Option<&ExecHint>) -> Option<Resource> {
        let facts = self.facts(pid)?;
        if let (Some(exec), Some(comm)) = (exec, &facts.comm)
            && !exec.comm.is_empty()
            && *comm != exec.comm
        {
            return None;
        }
        Some(self.resource(pid, facts, exec))
    }

    /// The process as far as its exec event tells, without reading /proc.
    pub fn from_exec(&self, pid: u32, exec: Option<&ExecHint>) -> Resource {
        self.resource(pid, ProcFacts::default(), exec)
    }

    fn facts(&self, pid: u32) -> Option<ProcFacts> {
        let dir = self.proc_root.join(pid.to_string());
        if !dir.is_dir() {
            return None;
        }
        let cgroups = fs::read_to_string(dir.join("cgroup")).ok();
        Some(ProcFacts {
            env: read_nul_separated(&dir.join("environ")),
            cmdline: read_nul_separated(&dir.join("cmdline")),
            exe_path: fs::read_link(dir.join("exe")).ok(),
            comm: fs::read_to_string(dir.join("comm"))
                .map(|s| s.trim().to_owned())
                .ok(),
            container_id: cgroups.as_deref().and_then(container_id_of),
            pod_uid: cgroups.as_deref().and_then(pod_uid_of),
            go: is_go_program(&dir.join("exe")),
            cgroup: cgroups.as_deref().and_then(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix("0::"))
                    .map(str::to_owned)
            }),
        })
    }

    fn resource(&self, pid: u32, facts: ProcFacts, exec: Option<&ExecHint>) -> Resource {
        let ProcFacts {
            mut env,
            mut cmdline,
            exe_path,
            mut comm,
            container_id,
            pod_uid,
            go,
            cgroup,
        } = facts;
        if let Some(hint) = exec {
            if cmdline.is_empty() {
                cmdline = hint.args.clone();
            }
            if env.is_empty() {
                env = hint.env.clone();
            }
            if comm.is_none() && !hint.comm.is_empty() {
                comm = Some(hint.comm.clone());
            }
        }
        let executable_name = exe_path
            .as_deref()
            .and_then(Path::file_name)
            .map(|n| {
                n.to_string_lossy()
                    .trim_end_matches(" (deleted)")
                    .to_owned()
            })
            // Gone already: the program path it was started with beats the kernel's
            // comm, which is cut at 15 characters.
            .or_else(|| {
                let argv0 = cmdline.first()?;
                let name = Path::new(argv0).file_name()?.to_string_lossy().into_owned();
                comm.as_ref()
                    .is_some_and(|c| name.starts_with(c.as_str()))
                    .then_some(name)
            })
            .or(comm)
            .unwrap_or_else(|| format!("pid-{pid}"));

        let mut attributes = Vec::new();
        let mut service_name = None;
        for var in &env {
            if let Some(v) = var.strip_prefix("OTEL_SERVICE_NAME=")
                && !v.is_empty()
            {
                service_name = Some(v.to_owned());
            }
        }
        for var in &env {
            if let Some(list) = var.strip_prefix("OTEL_RESOURCE_ATTRIBUTES=") {
                for (k, v) in list.split(',').filter_map(|kv| kv.split_once('=')) {
                    let (k, v) = (k.trim(), v.trim());
                    if k == "service.name" {
                        service_name.get_or_insert_with(|| v.to_owned());
                    } else if let Some(key) = known_resource_key(k) {
                        attributes.push(KeyValue::new(key, v));
                    }
                }
            }
        }
        let (rule_name, rule_attributes) = self.rules.identity(&ProcessFacts {
            executable: exe_path.clone(),
            cmdline: cmdline.clone(),
            container_id: container_id.clone(),
            cgroup,
        });
        for kv in rule_attributes {
            if !attributes.iter().any(|a| a.key == kv.key) {
                attributes.push(kv);
            }
        }
        let chosen = service_name.or(rule_name);
        let generic_name = chosen.is_none();
        let service_name = chosen
            .or_else(|| script_name(&executable_name, &cmdline))
            .unwrap_or_else(|| executable_name.clone());

        use opentelemetry_semantic_conventions::resource as res;
        if let Some(p) = &exe_path {
            attributes.push(KeyValue::new(
                res::PROCESS_EXECUTABLE_PATH,
                p.to_string_lossy().into_owned(),
            ));
        }
        if !cmdline.is_empty() {
            attributes.push(KeyValue::new(res::PROCESS_COMMAND, cmdline[0].clone()));
        }
        if let Some(id) = container_id {
            attributes.push(KeyValue::new(res::CONTAINER_ID, id));
        }
        if let Some(uid) = pod_uid {
            attributes.push(KeyValue::new(res::K8S_POD_UID, uid));
        }
        if go {
            attributes.push(KeyValue::new(RUNTIME_NAME, "go"));
        }
        Resource {
            service_name,
            pid,
            executable_name,
            host_name: self.host_name.clone(),
            attributes,
            generic_name,
        }
    }
}

/// What the pipeline knows of one process.
struct Known {
    resource: Arc<Resource>,
    generation: u64,
}

pub struct ProcessRegistry {
    describer: Describer,
    known: FastMap<u32, Known>,
    next_generation: u64,
    /// Set when /proc is read on the discovery thread.
    off_thread: Option<OffThread>,
}

struct OffThread {
    queries: Vec<ProcessQuery>,
    gate: Arc<Mutex<Gate>>,
}

impl ProcessRegistry {
    /// A registry that reads /proc itself, on the caller's thread (replays, tests).
    pub fn new() -> Self {
        Self::with_proc_root("/proc")
    }

    /// Names processes by these identity rules too ([`Describer::with_rules`]).
    pub fn set_process_rules(&mut self, rules: Arc<ProcessRules>) {
        self.describer.rules = rules;
    }

    pub fn with_proc_root(root: impl Into<PathBuf>) -> Self {
        ProcessRegistry {
            describer: Describer::new(root),
            known: FastMap::default(),
            next_generation: 0,
            off_thread: None,
        }
    }

    /// A registry that leaves /proc to the discovery thread: it queues
    /// [`ProcessQuery`]s ([`Self::take_queries`]) and takes their answers
    /// ([`Self::identified`]). Returns the sink to give spans to: it holds the spans of
    /// processes whose identity is on its way, then hands them to `sink`.
    pub fn off_thread(sink: Sink, metrics: Arc<Metrics>) -> (Self, Sink) {
        let gate = Arc::new(Mutex::new(Gate {
            sink,
            by_pid: FastMap::default(),
            waiting_spans: 0,
            metrics,
        }));
        let mut registry = Self::new();
        registry.off_thread = Some(OffThread {
            queries: Vec::new(),
            gate: Arc::clone(&gate),
        });
        let gated: Sink = Box::new(move |span| lock(&gate).offer(span));
        (registry, gated)
    }

    /// The resource of `pid`; a process seen for the first time is described now (from
    /// /proc, or provisionally while discovery reads /proc).
    pub fn resource(&mut self, pid: u32) -> Arc<Resource> {
        if let Some(k) = self.known.get(&pid) {
            return k.resource.clone();
        }
        self.learn(pid, None)
    }

    /// The process ran execve: it is another program now.
    pub fn exec(&mut self, pid: u32, comm: &str, args: &[String], env: &[String]) {
        let hint = ExecHint {
            comm: comm.to_owned(),
            args: args.to_vec(),
            env: env.to_vec(),
        };
        self.learn(pid, Some(hint));
    }

    fn learn(&mut self, pid: u32, exec: Option<ExecHint>) -> Arc<Resource> {
        if self.known.len() >= MAX_PROCESSES {
            self.known.clear();
        }
        let generation = self.next_generation;
        self.next_generation += 1;
        let resource = match &mut self.off_thread {
            None => {
                let described = self.describer.describe(pid, exec.as_ref());
                Arc::new(described.unwrap_or_else(|| self.describer.from_exec(pid, exec.as_ref())))
            }
            Some(off) => {
                let provisional = Arc::new(self.describer.from_exec(pid, exec.as_ref()));
                lock(&off.gate).expect(pid, generation, provisional.clone());
                if off.queries.len() < MAX_QUEUED_QUERIES {
                    off.queries.push(ProcessQuery {
                        pid,
                        generation,
                        exec,
                    });
                } else {
                    // Its spans leave with the provisional identity after IDENTITY_WAIT,
                    // counted there too.
                    Metrics::inc(&lock(&off.gate).metrics.discovery_requests_dropped);
                }
                provisional
            }
        };
        self.known.insert(
            pid,
            Known {
                resource: resource.clone(),
                generation,
            },
        );
        resource
    }

    /// Queries for the discovery thread queued since the last call.
    pub fn take_queries(&mut self) -> Vec<ProcessQuery> {
        self.off_thread
            .as_mut()
            .map(|off| std::mem::take(&mut off.queries))
            .unwrap_or_default()
    }

    /// The discovery thread's answer to a query: the spans waiting for it leave with it.
    pub fn identified(&mut self, answer: Identified) {
        let Some(off) = &self.off_thread else {
            return;
        };
        let resource = answer.resource.map(Arc::new);
        if let (Some(known), Some(r)) = (self.known.get_mut(&answer.pid), &resource)
            && known.generation == answer.generation
        {
            known.resource = r.clone();
        }
        lock(&off.gate).resolve(answer.pid, answer.generation, resource);
    }

    /// Lets go of spans that waited [`IDENTITY_WAIT`] for their identity.
    pub fn tick(&mut self) {
        if let Some(off) = &self.off_thread {
            lock(&off.gate).expire(Instant::now(), IDENTITY_WAIT);
        }
    }

    /// Lets go of every waiting span (at shutdown).
    pub fn finish(&mut self) {
        if let Some(off) = &self.off_thread {
            lock(&off.gate).expire(Instant::now(), Duration::ZERO);
        }
    }

    /// Names a process by hand (replayed captures have no /proc to read).
    pub fn insert(&mut self, pid: u32, resource: Resource) {
        let generation = self.next_generation;
        self.next_generation += 1;
        self.known.insert(
            pid,
            Known {
                resource: Arc::new(resource),
                generation,
            },
        );
    }

    /// The process exited.
    pub fn exit(&mut self, pid: u32) {
        self.known.remove(&pid);
    }
}

impl Default for ProcessRegistry {
    fn default() -> Self {
        Self::new()
    }
}

/// The gate is only ever locked by the pipeline's own thread (the sink and the registry
/// both belong to it); the mutex makes the sink `Send`. A panic while it was held left
/// nothing half-done that matters more than the spans, so a poisoned lock is used anyway.
fn lock(gate: &Mutex<Gate>) -> std::sync::MutexGuard<'_, Gate> {
    gate.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Holds the spans of processes whose identity discovery is reading, and gives spans
/// built from a provisional identity the one /proc gave.
struct Gate {
    sink: Sink,
    by_pid: FastMap<u32, Vec<Identity>>,
    waiting_spans: usize,
    metrics: Arc<Metrics>,
}

/// One provisional identity of a process.
struct Identity {
    generation: u64,
    provisional: Arc<Resource>,
    state: IdentityState,
}

enum IdentityState {
    Waiting {
        since: Instant,
        spans: Vec<Span>,
    },
    /// What spans built from `provisional` leave with.
    Known(Arc<Resource>),
}

impl Gate {
    fn expect(&mut self, pid: u32, generation: u64, provisional: Arc<Resource>) {
        self.by_pid.entry(pid).or_default().push(Identity {
            generation,
            provisional,
            state: IdentityState::Waiting {
                since: Instant::now(),
                spans: Vec::new(),
            },
        });
    }

    fn offer(&mut self, mut span: Span) {
        let identity = self.by_pid.get_mut(&span.resource.pid).and_then(|ids| {
            ids.iter_mut()
                .find(|i| Arc::ptr_eq(&i.provisional, &span.resource))
        });
        match identity.map(|i| &mut i.state) {
            Some(IdentityState::Known(resource)) => span.resource = resource.clone(),
            Some(IdentityState::Waiting { spans, .. }) => {
                if self.waiting_spans < MAX_WAITING_SPANS {
                    spans.push(span);
                    self.waiting_spans += 1;
                    return;
                }
                Metrics::inc(&self.metrics.spans_identity_unconfirmed);
            }
            None => {}
        }
        (self.sink)(span);
    }

    fn resolve(&mut self, pid: u32, generation: u64, resource: Option<Arc<Resource>>) {
        let Some(ids) = self.by_pid.get_mut(&pid) else {
            return;
        };
        let Some(at) = ids.iter().position(|i| i.generation == generation) else {
            return;
        };
        let before = match &resource {
            Some(r) => std::mem::replace(&mut ids[at].state, IdentityState::Known(r.clone())),
            // Nothing better is coming: spans built from the provisional identity keep it.
            None => ids.remove(at).state,
        };
        if let IdentityState::Waiting { spans, .. } = before {
            self.waiting_spans -= spans.len();
            for mut span in spans {
                if let Some(r) = &resource {
                    span.resource = r.clone();
                }
                (self.sink)(span);
            }
        }
    }

    /// Releases spans that waited `wait`, and forgets identities nothing refers to any
    /// more (the gate's own reference is the last).
    fn expire(&mut self, now: Instant, wait: Duration) {
        let mut late = Vec::new();
        for ids in self.by_pid.values_mut() {
            ids.retain_mut(|i| match &mut i.state {
                IdentityState::Waiting { since, spans } => {
                    if now.duration_since(*since) < wait {
                        return true;
                    }
                    late.append(spans);
                    false
                }
                IdentityState::Known(_) => Arc::strong_count(&i.provisional) > 1,
            });
        }
        self.by_pid.retain(|_, ids| !ids.is_empty());
        self.waiting_spans -= late.len();
        Metrics::add(&self.metrics.spans_identity_unconfirmed, late.len() as u64);
        for span in late {
            (self.sink)(span);
        }
    }
}

fn read_nul_separated(path: &Path) -> Vec<String> {
    fs::read(path)
        .map(|b| {
            b.split(|&c| c == 0)
                .filter(|s| !s.is_empty())
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Resource keys a process may set for itself through OTEL_RESOURCE_ATTRIBUTES.
fn known_resource_key(k: &str) -> Option<&'static str> {
    use opentelemetry_semantic_conventions::resource as res;
    Some(match k {
        "service.namespace" => res::SERVICE_NAMESPACE,
        "service.version" => res::SERVICE_VERSION,
        "service.instance.id" => res::SERVICE_INSTANCE_ID,
        "deployment.environment.name" => res::DEPLOYMENT_ENVIRONMENT_NAME,
        _ => return None,
    })
}

fn is_interpreter(exe: &str) -> bool {
    let base = exe.trim_end_matches(|c: char| c.is_ascii_digit() || c == '.');
    matches!(
        base,
        "python" | "node" | "nodejs" | "ruby" | "perl" | "php" | "bash" | "sh" | "deno" | "bun"
    )
}

/// For an interpreter, the script or module it runs, without directory or extension.
fn script_name(exe: &str, cmdline: &[String]) -> Option<String> {
    if !is_interpreter(exe) {
        return None;
    }
    let mut args = cmdline.iter().skip(1);
    while let Some(a) = args.next() {
        if a == "-m" {
            return args.next().cloned();
        }
        if a == "-c" || a == "-e" || a == "--eval" {
            return None;
        }
        if a.starts_with('-') {
            continue;
        }
        let file = Path::new(a).file_name()?.to_string_lossy().into_owned();
        const SCRIPT_EXTENSIONS: &[&str] =
            &["py", "js", "mjs", "cjs", "ts", "rb", "pl", "php", "sh"];
        let stem = match file.rsplit_once('.') {
            Some((stem, ext)) if SCRIPT_EXTENSIONS.contains(&ext) => stem.to_owned(),
            _ => file,
        };
        return Some(stem);
    }
    None
}

/// A 64-hex-digit container id in the process's cgroup path (docker, containerd, cri-o).
/// The uid of the Kubernetes pod whose cgroup holds the process, from the text of its
/// /proc/PID/cgroup file: the kubelet names the pod's cgroup `pod<uid>` (cgroupfs
/// driver, `/kubepods/burstable/pod<uid>/<container>`) or
/// `kubepods-<qos>-pod<uid with _ for ->.slice` (systemd driver).
pub(crate) fn pod_uid_of(text: &str) -> Option<String> {
    for line in text.lines() {
        let path = line.rsplit(':').next().unwrap_or("");
        for part in path.split('/') {
            let part = part.strip_suffix(".slice").unwrap_or(part);
            let Some(at) = part.rfind("pod") else {
                continue;
            };
            let uid = part[at + 3..].replace('_', "-");
            let groups: Vec<&str> = uid.split('-').collect();
            let shape = groups.iter().map(|g| g.len()).collect::<Vec<_>>() == [8, 4, 4, 4, 12];
            if shape
                && groups
                    .iter()
                    .all(|g| g.bytes().all(|b| b.is_ascii_hexdigit()))
            {
                return Some(uid.to_ascii_lowercase());
            }
        }
    }
    None
}

/// The container id in the text of a /proc/PID/cgroup file.
pub(crate) fn container_id_of(text: &str) -> Option<String> {
    for line in text.lines() {
        let path = line.rsplit(':').next().unwrap_or("");
        for part in path.split(['/', '-', '.']) {
            if part.len() == 64 && part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Some(part.to_owned());
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;

    /// /proc/PID/cgroup of containers in pods, as kubelets with each cgroup driver and
    /// runtime write them (cgroup v2 unified, and a v1 hierarchy line).
    #[test]
    fn pod_uid_and_container_id_from_kubernetes_cgroups() {
        let id = "3f4e5d6c7b8a99887766554433221100ffeeddccbbaa99887766554433221100";
        let cases = [
            format!(
                "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0f1e2d3c_4b5a_6978_8796_a5b4c3d2e1f0.slice/cri-containerd-{id}.scope\n"
            ),
            format!(
                "0::/kubepods.slice/kubepods-pod0f1e2d3c_4b5a_6978_8796_a5b4c3d2e1f0.slice/crio-{id}.scope\n"
            ),
            format!("0::/kubepods/besteffort/pod0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0/{id}\n"),
            format!(
                "12:memory:/kubepods/burstable/pod0F1E2D3C-4B5A-6978-8796-A5B4C3D2E1F0/{id}\n11:cpu:/\n"
            ),
            // dockershim / cri-dockerd under the systemd driver.
            format!(
                "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod0f1e2d3c_4b5a_6978_8796_a5b4c3d2e1f0.slice/docker-{id}.scope\n"
            ),
            // cgroup v1 with the systemd driver, the unified line empty (hybrid layout).
            format!(
                "11:pids:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0f1e2d3c_4b5a_6978_8796_a5b4c3d2e1f0.slice/cri-containerd-{id}.scope\n1:name=systemd:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0f1e2d3c_4b5a_6978_8796_a5b4c3d2e1f0.slice/cri-containerd-{id}.scope\n0::/\n"
            ),
            // A guaranteed pod (no QoS level in the path), cgroupfs driver, v1.
            format!("4:cpu,cpuacct:/kubepods/pod0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0/{id}\n"),
        ];
        for text in &cases {
            assert_eq!(
                pod_uid_of(text).as_deref(),
                Some("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"),
                "{text}"
            );
            assert_eq!(container_id_of(text).as_deref(), Some(id), "{text}");
        }
        for text in [
            "0::/system.slice/nginx.service\n",
            "0::/user.slice/user-0.slice/session-3.scope\n",
            "0::/kubepods.slice/kubepods-burstable.slice\n",
            // Not a uid: a pod<...> part of the wrong shape.
            "0::/kubepods/podcast-player/x\n",
        ] {
            assert_eq!(pod_uid_of(text), None, "{text}");
        }
        // A container outside Kubernetes has an id and no pod.
        let docker = format!("0::/system.slice/docker-{id}.scope\n");
        assert_eq!(container_id_of(&docker).as_deref(), Some(id));
        assert_eq!(pod_uid_of(&docker), None);
    }

    fn cmd(args: &[&str]) -> Vec<String> {
        args.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn interpreters_are_named_after_their_script() {
        assert_eq!(
            script_name("python3", &cmd(&["python3", "-u", "/srv/shop.py"])),
            Some("shop".into())
        );
        assert_eq!(
            script_name(
                "python3.11",
                &cmd(&["python3", "-m", "http.server", "8000"])
            ),
            Some("http.server".into())
        );
        assert_eq!(
            script_name("node", &cmd(&["node", "crm.js"])),
            Some("crm".into())
        );
        assert_eq!(
            script_name("python3", &cmd(&["python3", "-c", "print(1)"])),
            None
        );
        assert_eq!(
            script_name("nginx", &cmd(&["nginx", "-g", "daemon off;"])),
            None
        );
    }

    #[test]
    fn process_with_otel_service_name_uses_it() {
        let root = std::env::temp_dir().join(format!("sonde-proc-{}", std::process::id()));
        let dir = root.join("4242");
        fs::create_dir_all(&dir).unwrap();
        fs::write(
            dir.join("environ"),
            b"PATH=/bin\0OTEL_SERVICE_NAME=shop-api\0",
        )
        .unwrap();
        fs::write(dir.join("cmdline"), b"python3\0shop.py\0").unwrap();
        fs::write(dir.join("comm"), b"python3\n").unwrap();
        fs::write(
            dir.join("cgroup"),
            format!(
                "0::/kubepods/pod1/cri-containerd-{}.scope\n",
                "ab".repeat(32)
            ),
        )
        .unwrap();
        let mut reg = ProcessRegistry::with_proc_root(&root);
        let r = reg.resource(4242);
        assert_eq!(r.service_name, "shop-api");
        assert_eq!(r.executable_name, "python3");
        assert!(r.attributes.iter().any(|kv| kv.key == "container.id"));
        fs::write(dir.join("environ"), b"PATH=/bin\0").unwrap();
        reg.exec(4242, "python3", &[], &[]);
        assert_eq!(reg.resource(4242).service_name, "shop");
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn process_gone_before_lookup_is_named_from_its_exec_event() {
        let root = std::env::temp_dir().join(format!("sonde-proc-gone-{}", std::process::id()));
        fs::create_dir_all(&root).unwrap();
        let mut reg = ProcessRegistry::with_proc_root(&root);
        reg.exec(
            77,
            "python3",
            &cmd(&["python3", "/tmp/client.py", "--n", "3"]),
            &[],
        );
        let r = reg.resource(77);
        assert_eq!(r.service_name, "client");
        assert_eq!(r.executable_name, "python3");
        reg.exec(
            76,
            "sonde-go-client",
            &cmd(&["/srv/.tools/sonde-go-clients", "tls-client"]),
            &[],
        );
        assert_eq!(reg.resource(76).service_name, "sonde-go-clients");
        reg.exec(78, "curl", &cmd(&["curl", "-s", "http://x/"]), &[]);
        assert_eq!(reg.resource(78).service_name, "curl");
        reg.exec(
            79,
            "curl",
            &cmd(&["curl", "http://x/"]),
            &cmd(&["OTEL_SERVICE_NAME=shop-poller"]),
        );
        assert_eq!(reg.resource(79).service_name, "shop-poller");
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn this_process_is_described_from_proc() {
        let mut reg = ProcessRegistry::new();
        let me = reg.resource(std::process::id());
        assert_eq!(me.pid, std::process::id());
        assert!(!me.executable_name.is_empty());
        assert!(!me.host_name.is_empty());
    }

    fn collecting_sink() -> (Sink, Arc<Mutex<Vec<Span>>>) {
        let out = Arc::new(Mutex::new(Vec::new()));
        let o = out.clone();
        (Box::new(move |span| o.lock().unwrap().push(span)), out)
    }

    fn span_of(resource: Arc<Resource>) -> Span {
        use crate::spans::{SpanKind, Status, new_span_id, new_trace_id};
        Span {
            trace_id: new_trace_id(),
            span_id: new_span_id(),
            parent_span_id: None,
            name: "GET /".into(),
            kind: SpanKind::Server,
            start_unix_nanos: 1,
            end_unix_nanos: 2,
            attributes: vec![],
            status: Status::Unset,
            resource,
        }
    }

    fn named(pid: u32, service: &str) -> Resource {
        Resource {
            service_name: service.into(),
            pid,
            executable_name: "python3.11".into(),
            host_name: "h".into(),
            attributes: vec![],
            generic_name: false,
        }
    }

    fn services(out: &Mutex<Vec<Span>>) -> Vec<String> {
        out.lock()
            .unwrap()
            .iter()
            .map(|s| s.resource.service_name.clone())
            .collect()
    }

    #[test]
    fn spans_wait_for_the_identity_discovery_reads_from_proc() {
        let (sink, out) = collecting_sink();
        let metrics = Arc::new(Metrics::default());
        let (mut reg, mut gated) = ProcessRegistry::off_thread(sink, metrics.clone());
        reg.exec(
            50,
            "python3",
            &cmd(&["python3", "shop.py"]),
            &cmd(&["OTEL_RESOURCE_ATTRIBUTES=deployment.environment.name=prod"]),
        );
        let queries = reg.take_queries();
        assert_eq!(queries.len(), 1);
        assert_eq!(queries[0].pid, 50);
        assert_eq!(queries[0].exec.as_ref().unwrap().comm, "python3");
        assert!(reg.take_queries().is_empty());

        // Until /proc is read, the exec event names it; its spans wait.
        let provisional = reg.resource(50);
        assert_eq!(provisional.service_name, "shop");
        gated(span_of(provisional.clone()));
        assert!(out.lock().unwrap().is_empty());

        // /proc says more (its OTEL_SERVICE_NAME was past the exec event's prefix).
        reg.identified(Identified {
            pid: 50,
            generation: queries[0].generation,
            resource: Some(named(50, "shop-api")),
        });
        assert_eq!(services(&out), ["shop-api"]);
        assert_eq!(reg.resource(50).service_name, "shop-api");
        // A span built later from a connection opened before the answer: the same name.
        gated(span_of(provisional));
        assert_eq!(services(&out), ["shop-api", "shop-api"]);
        assert_eq!(
            metrics.spans_identity_unconfirmed.load(Ordering::Relaxed),
            0
        );
    }

    #[test]
    fn an_answer_about_an_earlier_program_or_process_is_not_applied_to_a_later_one() {
        let (sink, out) = collecting_sink();
        let metrics = Arc::new(Metrics::default());
        let (mut reg, mut gated) = ProcessRegistry::off_thread(sink, metrics.clone());
        // sh exec's curl under the same pid before the answer about sh comes.
        reg.exec(60, "sh", &cmd(&["sh", "-c", "exec curl x"]), &[]);
        let sh = reg.resource(60);
        reg.exec(60, "curl", &cmd(&["curl", "x"]), &[]);
        let curl = reg.resource(60);
        let q = reg.take_queries();
        assert_eq!(q.len(), 2);
        assert_ne!(q[0].generation, q[1].generation);
        gated(span_of(sh));
        gated(span_of(curl.clone()));
        reg.identified(Identified {
            pid: 60,
            generation: q[0].generation,
            resource: Some(named(60, "sh-from-proc")),
        });
        assert_eq!(services(&out), ["sh-from-proc"]);
        assert_eq!(reg.resource(60).service_name, "curl");
        // curl was gone by the time /proc was read: its exec event's name stays.
        reg.identified(Identified {
            pid: 60,
            generation: q[1].generation,
            resource: None,
        });
        assert_eq!(services(&out), ["sh-from-proc", "curl"]);

        // The pid is reused by a process first seen without its exec event.
        reg.exit(60);
        let unknown = reg.resource(60);
        assert_eq!(unknown.service_name, "pid-60");
        let q = reg.take_queries();
        reg.identified(Identified {
            pid: 60,
            generation: q[0].generation - 1,
            resource: Some(named(60, "stale")),
        });
        assert_eq!(reg.resource(60).service_name, "pid-60");
        gated(span_of(unknown));
        // At shutdown a span still waiting leaves as it is, counted.
        reg.finish();
        assert_eq!(services(&out), ["sh-from-proc", "curl", "pid-60"]);
        assert_eq!(
            metrics.spans_identity_unconfirmed.load(Ordering::Relaxed),
            1
        );
    }

    #[test]
    fn spans_wait_at_most_the_identity_wait() {
        let (sink, out) = collecting_sink();
        let metrics = Arc::new(Metrics::default());
        let (mut reg, mut gated) = ProcessRegistry::off_thread(sink, metrics.clone());
        let r = reg.resource(70);
        gated(span_of(r));
        let gate = reg.off_thread.as_ref().unwrap().gate.clone();
        lock(&gate).expire(Instant::now(), IDENTITY_WAIT);
        assert!(out.lock().unwrap().is_empty());
        lock(&gate).expire(Instant::now() + IDENTITY_WAIT, IDENTITY_WAIT);
        assert_eq!(services(&out), ["pid-70"]);
        assert_eq!(
            metrics.spans_identity_unconfirmed.load(Ordering::Relaxed),
            1
        );
        // Spans of processes with a known identity do not wait.
        reg.insert(71, named(71, "known"));
        gated(span_of(reg.resource(71)));
        assert_eq!(services(&out), ["pid-70", "known"]);
    }

    #[test]
    fn queries_past_the_queue_bound_are_counted() {
        let (sink, _out) = collecting_sink();
        let metrics = Arc::new(Metrics::default());
        let (mut reg, _gated) = ProcessRegistry::off_thread(sink, metrics.clone());
        for pid in 0..=MAX_QUEUED_QUERIES as u32 {
            reg.resource(pid);
        }
        assert_eq!(reg.take_queries().len(), MAX_QUEUED_QUERIES);
        assert_eq!(
            metrics.discovery_requests_dropped.load(Ordering::Relaxed),
            1
        );
    }

    #[test]
    fn a_process_is_not_taken_for_another_program() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("80");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("comm"), b"nginx\n").unwrap();
        fs::write(dir.join("cmdline"), b"nginx\0-g\0daemon off;\0").unwrap();
        let d = Describer::new(root.path());
        let hint = |comm: &str| ExecHint {
            comm: comm.into(),
            ..Default::default()
        };
        assert_eq!(
            d.describe(80, Some(&hint("nginx"))).unwrap().service_name,
            "nginx"
        );
        assert!(d.describe(80, Some(&hint("bash"))).is_none());
        assert!(d.describe(81, None).is_none());
        assert_eq!(d.from_exec(81, Some(&hint("bash"))).service_name, "bash");
    }
}
