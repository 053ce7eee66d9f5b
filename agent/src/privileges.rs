//! Which Linux capabilities the agent has, and what each missing one turns off. Read
//! from the effective set in /proc/self/status, so that root with a cut bounding set
//! (a container without `privileged`) is judged by what it really holds.
//!
//! What each capability is for, measured on Linux 6.18 (README, "Security"):
//! - CAP_BPF: load programs and create maps; CAP_PERFMON: attach them to tracepoints
//!   and kprobes and read kernel memory from them. Without either the agent cannot run
//!   (CAP_SYS_ADMIN stands in for both, as the kernel allows).
//! - CAP_SYS_ADMIN: uprobes (TLS plaintext from OpenSSL and Go). Since the 2025 fix
//!   "perf/core: Require CAP_SYS_ADMIN to create uprobes" (also in the stable kernels)
//!   `perf_event_open` of a uprobe wants CAP_SYS_ADMIN, not CAP_PERFMON. Also mounting
//!   tracefs when it is missing.
//! - CAP_SYS_PTRACE: /proc/PID/environ (OTEL_SERVICE_NAME), /proc/PID/exe and
//!   /proc/PID/root (the TLS libraries of processes in containers) of other users'
//!   processes.
//! - CAP_DAC_READ_SEARCH: reading programs and libraries that are not world-readable.
//! - CAP_NET_ADMIN: cgroup sock_ops and sk_msg programs (traceparent injection).

use tracing::warn;

/// A capability the agent cares about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cap {
    DacReadSearch = 2,
    NetAdmin = 12,
    SysPtrace = 19,
    SysAdmin = 21,
    Perfmon = 38,
    Bpf = 39,
}

impl Cap {
    pub fn name(self) -> &'static str {
        match self {
            Cap::DacReadSearch => "CAP_DAC_READ_SEARCH",
            Cap::NetAdmin => "CAP_NET_ADMIN",
            Cap::SysPtrace => "CAP_SYS_PTRACE",
            Cap::SysAdmin => "CAP_SYS_ADMIN",
            Cap::Perfmon => "CAP_PERFMON",
            Cap::Bpf => "CAP_BPF",
        }
    }
}

/// The effective capability set of this process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caps(u64);

impl Caps {
    /// This process's effective set (all bits when /proc cannot say: the kernel will).
    pub fn current() -> Self {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| Self::from_status(&s))
            .unwrap_or(Caps(u64::MAX))
    }

    /// The `CapEff:` line of a /proc/PID/status text.
    pub fn from_status(status: &str) -> Option<Self> {
        status
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .map(Caps)
    }

    pub fn has(self, cap: Cap) -> bool {
        self.0 & (1 << cap as u32) != 0
    }

    /// The capability without which no program loads, if one is missing:
    /// CAP_BPF, then CAP_PERFMON (CAP_SYS_ADMIN covers both).
    pub fn missing_for_loading(self) -> Option<Cap> {
        if self.has(Cap::SysAdmin) {
            return None;
        }
        [Cap::Bpf, Cap::Perfmon].into_iter().find(|c| !self.has(*c))
    }

    /// One line per missing capability the agent uses, saying what is off without it.
    pub fn report(self) {
        for (cap, off) in [
            (
                Cap::SysAdmin,
                "TLS capture (uprobes on OpenSSL and Go) is off on kernels that let only \
                 CAP_SYS_ADMIN create uprobes (Linux 6.18 here, and every kernel with the \
                 2025 fix \"perf/core: Require CAP_SYS_ADMIN to create uprobes\"); HTTPS \
                 stays encrypted to sonde. tracefs cannot be mounted either: mount it on the \
                 host",
            ),
            (
                Cap::SysPtrace,
                "the environment (OTEL_SERVICE_NAME) and the TLS libraries of processes of \
                 other users or in containers cannot be read: such services are named from \
                 their executable, and their HTTPS stays encrypted to sonde",
            ),
            (
                Cap::DacReadSearch,
                "programs and libraries that are not world-readable cannot be read: their \
                 TLS functions are not found",
            ),
        ] {
            if !self.has(cap) {
                warn!(capability = cap.name(), "{} is missing: {off}", cap.name());
            }
        }
        for cap in [Cap::Bpf, Cap::Perfmon] {
            if !self.has(cap) && self.has(Cap::SysAdmin) {
                warn!(
                    capability = cap.name(),
                    "{} is missing; CAP_SYS_ADMIN stands in for it, nothing is off",
                    cap.name()
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(list: &[Cap]) -> Caps {
        Caps(list.iter().fold(0, |acc, c| acc | 1 << *c as u32))
    }

    #[test]
    fn reads_the_effective_set_from_proc_status() {
        // The DaemonSet's set, as /proc/PID/status shows it.
        let status = "Name:\tsonde\nCapInh:\t0000000000000000\nCapPrm:\t000000c000280004\n\
                      CapEff:\t000000c000280004\nCapBnd:\t000000c000280004\n";
        let c = Caps::from_status(status).unwrap();
        for cap in [
            Cap::Bpf,
            Cap::Perfmon,
            Cap::SysAdmin,
            Cap::SysPtrace,
            Cap::DacReadSearch,
        ] {
            assert!(c.has(cap), "{cap:?}");
        }
        assert!(!c.has(Cap::NetAdmin));
    }

    #[test]
    fn loading_needs_bpf_and_perfmon_or_sys_admin() {
        assert_eq!(caps(&[Cap::Bpf, Cap::Perfmon]).missing_for_loading(), None);
        assert_eq!(caps(&[Cap::SysAdmin]).missing_for_loading(), None);
        assert_eq!(caps(&[Cap::Perfmon]).missing_for_loading(), Some(Cap::Bpf));
        assert_eq!(caps(&[Cap::Bpf]).missing_for_loading(), Some(Cap::Perfmon));
        assert_eq!(caps(&[]).missing_for_loading(), Some(Cap::Bpf));
    }
}
