//! Process registry: from a pid to the service it is (the span resource).
//!
//! service.name comes from the process's own OTEL_SERVICE_NAME (or service.name in
//! OTEL_RESOURCE_ATTRIBUTES), else, for interpreters, the script or module it runs
//! (python3 shop.py -> "shop", python3 -m http.server -> "http.server",
//! node crm.js -> "crm"), else the executable's name.

use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
    sync::Arc,
};

use crate::spans::{KeyValue, Resource};

/// Upper bound on remembered processes; the oldest lookups are dropped past it.
const MAX_PROCESSES: usize = 16384;

pub struct ProcessRegistry {
    proc_root: PathBuf,
    host_name: String,
    known: HashMap<u32, Arc<Resource>>,
}

impl ProcessRegistry {
    pub fn new() -> Self {
        Self::with_proc_root("/proc")
    }

    pub fn with_proc_root(root: impl Into<PathBuf>) -> Self {
        let host_name = fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| "unknown".into());
        ProcessRegistry {
            proc_root: root.into(),
            host_name,
            known: HashMap::new(),
        }
    }

    /// The resource of `pid`, read from /proc on first use.
    pub fn resource(&mut self, pid: u32) -> Arc<Resource> {
        if let Some(r) = self.known.get(&pid) {
            return r.clone();
        }
        if self.known.len() >= MAX_PROCESSES {
            self.known.clear();
        }
        let r = Arc::new(self.describe(pid, None));
        self.known.insert(pid, r.clone());
        r
    }

    /// The process ran execve: it is another program now. It is described at once,
    /// with the kernel's `comm` and command line standing in for /proc when the process
    /// is already gone (a curl that lived for 3 ms).
    pub fn exec(&mut self, pid: u32, comm: &str, args: &[String], env: &[String]) {
        if self.known.len() >= MAX_PROCESSES {
            self.known.clear();
        }
        let r = Arc::new(self.describe(pid, Some((comm, args, env))));
        self.known.insert(pid, r);
    }

    /// Names a process by hand (replayed captures have no /proc to read).
    pub fn insert(&mut self, pid: u32, resource: Resource) {
        self.known.insert(pid, Arc::new(resource));
    }

    /// The process exited.
    pub fn exit(&mut self, pid: u32) {
        self.known.remove(&pid);
    }

    fn describe(&self, pid: u32, exec_hint: Option<(&str, &[String], &[String])>) -> Resource {
        let dir = self.proc_root.join(pid.to_string());
        let mut env = read_nul_separated(&dir.join("environ"));
        let mut cmdline = read_nul_separated(&dir.join("cmdline"));
        let exe_path = fs::read_link(dir.join("exe")).ok();
        let mut comm = fs::read_to_string(dir.join("comm"))
            .map(|s| s.trim().to_owned())
            .ok();
        if let Some((hint_comm, hint_args, hint_env)) = exec_hint {
            if cmdline.is_empty() {
                cmdline = hint_args.to_vec();
            }
            if env.is_empty() {
                env = hint_env.to_vec();
            }
            if comm.is_none() && !hint_comm.is_empty() {
                comm = Some(hint_comm.to_owned());
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
        let service_name = service_name
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
        if let Some(id) = container_id(&dir.join("cgroup")) {
            attributes.push(KeyValue::new(res::CONTAINER_ID, id));
        }
        Resource {
            service_name,
            pid,
            executable_name,
            host_name: self.host_name.clone(),
            attributes,
        }
    }
}

impl Default for ProcessRegistry {
    fn default() -> Self {
        Self::new()
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
fn container_id(cgroup_file: &Path) -> Option<String> {
    let text = fs::read_to_string(cgroup_file).ok()?;
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
    use super::*;

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
}
