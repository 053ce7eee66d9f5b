//! Which processes are traced, and who they are: the `selection:` and `identity:`
//! sections of the config file, and `--exclude-comm` / `--cgroup`.
//!
//! The kernel applies what it can tell by itself (the command name, the cgroup) and a
//! set of excluded processes that user space fills in; an excluded process then costs
//! one map lookup per hooked call. User space decides the rules on executable, command
//! line, container id and cgroup path when it reads a process's /proc entry (at start-up
//! for the processes already running, after exec for the others) and puts the process
//! into that set. Ports are told apart only in user space, when the spans are made.
//!
//! Identity rules set `service.name` and resource attributes of matching processes.
//! A process's own OTEL_SERVICE_NAME (or service.name in OTEL_RESOURCE_ATTRIBUTES) wins
//! over a rule's `service_name`.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use regex::Regex;
use serde::Deserialize;

use opentelemetry_semantic_conventions::attribute as semconv;

use crate::{
    pipeline::Sink,
    spans::{KeyValue, Span, Value},
};

/// The `selection:` section.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SelectionConfig {
    /// Command names (the kernel's comm, at most 15 bytes) never traced: as
    /// `--exclude-comm`.
    #[serde(default)]
    pub exclude_comm: Vec<String>,
    /// cgroup v2 directories: when any is given, only processes in one of them (or
    /// below) are traced. As `--cgroup`.
    #[serde(default)]
    pub cgroups: Vec<PathBuf>,
    /// Processes or ports never traced.
    #[serde(default)]
    pub exclude: Vec<Exclude>,
}

/// What a process is, for the rules.
#[derive(Clone, Debug, Default)]
pub struct ProcessFacts {
    pub executable: Option<PathBuf>,
    pub cmdline: Vec<String>,
    pub container_id: Option<String>,
    /// The process's cgroup v2 path (`0::/a/b` in /proc/PID/cgroup gives `/a/b`).
    pub cgroup: Option<String>,
}

/// Conditions on a process; every one given must hold.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessMatch {
    /// A regular expression searched in the executable's path.
    #[serde(default, with = "serde_regex")]
    pub executable: Option<Regex>,
    /// A regular expression searched in the command line (arguments joined by spaces).
    #[serde(default, with = "serde_regex")]
    pub command_line: Option<Regex>,
    /// The container id, or its first characters (12 as `docker ps` shows).
    pub container_id: Option<String>,
    /// A cgroup path as the process's /proc/PID/cgroup shows it (`/system.slice/x`),
    /// the cgroup or one below it.
    pub cgroup: Option<String>,
}

impl ProcessMatch {
    fn is_empty(&self) -> bool {
        self.executable.is_none()
            && self.command_line.is_none()
            && self.container_id.is_none()
            && self.cgroup.is_none()
    }

    pub fn matches(&self, p: &ProcessFacts) -> bool {
        let exe = p.executable.as_deref().map(Path::to_string_lossy);
        self.executable
            .as_ref()
            .is_none_or(|re| exe.as_deref().is_some_and(|e| re.is_match(e)))
            && self
                .command_line
                .as_ref()
                .is_none_or(|re| re.is_match(&p.cmdline.join(" ")))
            && self.container_id.as_ref().is_none_or(|want| {
                p.container_id
                    .as_deref()
                    .is_some_and(|id| !want.is_empty() && id.starts_with(want.as_str()))
            })
            && self.cgroup.as_ref().is_none_or(|want| {
                p.cgroup.as_deref().is_some_and(|have| {
                    let want = want.trim_end_matches('/');
                    have == want
                        || want.is_empty()
                        || have.strip_prefix(want).is_some_and(|r| r.starts_with('/'))
                })
            })
    }
}

/// One entry of `selection.exclude`: a process (by what it is) or a port.
#[derive(Clone, Debug, Deserialize)]
#[serde(try_from = "ExcludeSpec")]
pub enum Exclude {
    Process(ProcessMatch),
    /// Spans whose `server.port` this is: the service listening on it and its clients.
    Port(u16),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExcludeSpec {
    #[serde(default, with = "serde_regex")]
    executable: Option<Regex>,
    #[serde(default, with = "serde_regex")]
    command_line: Option<Regex>,
    container_id: Option<String>,
    cgroup: Option<String>,
    port: Option<u16>,
}

impl TryFrom<ExcludeSpec> for Exclude {
    type Error = String;

    fn try_from(s: ExcludeSpec) -> Result<Self, String> {
        let process = ProcessMatch {
            executable: s.executable,
            command_line: s.command_line,
            container_id: s.container_id,
            cgroup: s.cgroup,
        };
        match (s.port, process.is_empty()) {
            (Some(port), true) => Ok(Exclude::Port(port)),
            (None, false) => Ok(Exclude::Process(process)),
            (Some(_), false) => Err("an exclusion names a port or a process, not both".into()),
            (None, true) => Err(
                "an exclusion names one of executable, command_line, container_id, cgroup or port"
                    .into(),
            ),
        }
    }
}

/// One entry of `identity:`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityRule {
    #[serde(rename = "match")]
    pub matches: ProcessMatch,
    pub service_name: Option<String>,
    /// Resource attributes, such as `service.namespace` or `deployment.environment.name`.
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
}

/// The process rules in force, shared by the registry and the discovery thread.
#[derive(Clone, Debug, Default)]
pub struct ProcessRules {
    pub exclude: Vec<ProcessMatch>,
    pub ports: Vec<u16>,
    pub identity: Vec<IdentityRule>,
}

impl ProcessRules {
    pub fn new(selection: &SelectionConfig, identity: Vec<IdentityRule>) -> Self {
        let mut rules = ProcessRules {
            identity,
            ..Default::default()
        };
        for e in &selection.exclude {
            match e {
                Exclude::Process(m) => rules.exclude.push(m.clone()),
                Exclude::Port(p) => rules.ports.push(*p),
            }
        }
        rules
    }

    /// Whether a user-space rule excludes this process.
    pub fn excludes(&self, p: &ProcessFacts) -> bool {
        self.exclude.iter().any(|m| m.matches(p))
    }

    /// What identity rules say of the process: the first matching rule with a service
    /// name names it; every matching rule adds its attributes (the first wins per key).
    pub fn identity(&self, p: &ProcessFacts) -> (Option<String>, Vec<KeyValue>) {
        let mut name = None;
        let mut attributes: Vec<KeyValue> = Vec::new();
        for rule in self.identity.iter().filter(|r| r.matches.matches(p)) {
            if name.is_none() {
                name.clone_from(&rule.service_name);
            }
            for (k, v) in &rule.attributes {
                if !attributes.iter().any(|kv| kv.key == k) {
                    attributes.push(KeyValue::new(resource_key(k), v.as_str()));
                }
            }
        }
        (name, attributes)
    }
}

/// Leaves out the spans whose server port (the local port of a server span, the peer's
/// of a client span) is one of `ports`.
pub fn drop_ports(ports: Vec<u16>, mut sink: Sink) -> Sink {
    if ports.is_empty() {
        return sink;
    }
    Box::new(move |span: Span| {
        let excluded = matches!(
            span.attribute(semconv::SERVER_PORT),
            Some(Value::Int(p)) if ports.iter().any(|x| i64::from(*x) == *p)
        );
        if !excluded {
            sink(span);
        }
    })
}

/// Attribute keys are `&'static str`: a config file's keys are read once and live as
/// long as the agent.
fn resource_key(k: &str) -> &'static str {
    Box::leak(k.to_owned().into_boxed_str())
}

/// Reads a process's facts from `/proc/PID`.
pub fn read_facts(proc_root: &Path, pid: u32) -> Option<ProcessFacts> {
    let dir = proc_root.join(pid.to_string());
    let cmdline = std::fs::read(dir.join("cmdline")).ok()?;
    let cgroup_text = std::fs::read_to_string(dir.join("cgroup")).unwrap_or_default();
    Some(ProcessFacts {
        executable: std::fs::read_link(dir.join("exe")).ok(),
        cmdline: cmdline
            .split(|&b| b == 0)
            .filter(|s| !s.is_empty())
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect(),
        container_id: crate::process::container_id_of(&cgroup_text),
        cgroup: cgroup_text
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .map(str::to_owned),
    })
}

mod serde_regex {
    use regex::Regex;
    use serde::{Deserialize, Deserializer, de::Error};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Regex>, D::Error> {
        let Some(text) = Option::<String>::deserialize(d)? else {
            return Ok(None);
        };
        Regex::new(&text)
            .map(Some)
            .map_err(|e| D::Error::custom(format!("regular expression {text:?}: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(exe: &str, cmd: &[&str], container: Option<&str>, cgroup: &str) -> ProcessFacts {
        ProcessFacts {
            executable: Some(PathBuf::from(exe)),
            cmdline: cmd.iter().map(|s| s.to_string()).collect(),
            container_id: container.map(str::to_owned),
            cgroup: Some(cgroup.to_owned()),
        }
    }

    fn matcher(yaml: &str) -> ProcessMatch {
        serde_saphyr::from_str(yaml).unwrap()
    }

    #[test]
    fn every_condition_given_must_hold() {
        let shop = facts(
            "/usr/bin/python3.11",
            &["python3", "shop.py", "--port", "8000"],
            Some("0123456789abcdef"),
            "/system.slice/shop.service",
        );
        assert!(matcher("executable: python3").matches(&shop));
        assert!(matcher("command_line: 'shop\\.py --port'").matches(&shop));
        assert!(matcher("container_id: 0123456789ab").matches(&shop));
        assert!(matcher("cgroup: /system.slice").matches(&shop));
        assert!(matcher("cgroup: /system.slice/shop.service/").matches(&shop));
        assert!(!matcher("cgroup: /system.sl").matches(&shop));
        assert!(!matcher("executable: node").matches(&shop));
        assert!(!matcher("{executable: python, container_id: ffff}").matches(&shop));
        assert!(!matcher("container_id: 0123").matches(&ProcessFacts::default()));
    }

    #[test]
    fn identity_names_the_service_and_adds_resource_attributes() {
        let rules: Vec<IdentityRule> = serde_saphyr::from_str(
            "- match: {command_line: shop}\n  service_name: shop-api\n  attributes: {service.namespace: orders}\n\
             - match: {executable: python}\n  service_name: other\n  attributes: {service.namespace: x, deployment.environment.name: prod}\n",
        )
        .unwrap();
        let rules = ProcessRules::new(&SelectionConfig::default(), rules);
        let shop = facts("/usr/bin/python3", &["python3", "shop.py"], None, "/");
        let (name, attrs) = rules.identity(&shop);
        assert_eq!(name.as_deref(), Some("shop-api"));
        let pairs: Vec<(&str, String)> = attrs
            .iter()
            .map(|kv| (kv.key, kv.value.to_string()))
            .collect();
        assert_eq!(
            pairs,
            [
                ("service.namespace", "\"orders\"".to_owned()),
                ("deployment.environment.name", "\"prod\"".to_owned())
            ]
        );
    }

    #[test]
    fn an_exclusion_is_a_process_or_a_port() {
        let ok: Vec<Exclude> = serde_saphyr::from_str("- port: 22\n- executable: sshd\n").unwrap();
        assert!(matches!(ok[0], Exclude::Port(22)));
        assert!(matches!(ok[1], Exclude::Process(_)));
        for (bad, why) in [
            ("- {port: 22, executable: x}\n", "not both"),
            ("- {}\n", "names one of"),
            ("- executable: '('\n", "regular expression"),
        ] {
            let err = serde_saphyr::from_str::<Vec<Exclude>>(bad)
                .unwrap_err()
                .to_string();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }
}
