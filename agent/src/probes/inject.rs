//! `--inject-traceparent`: loading the injector (agent-ebpf `inject.rs`, an object of
//! its own) and attaching it, its sock_ops program to the traced cgroups (or the
//! cgroup v2 root) and its sk_msg program to its sockhash.
//!
//! It needs CAP_NET_ADMIN besides what tracing needs (the kernel creates a sockhash
//! only for it). When anything about it fails, the agent says so once and traces on
//! without injecting: injection is never a reason to stop tracing.

use std::{
    fs::File,
    path::{Path, PathBuf},
};

use agent_common::{ProbeConfig, inject, maps};
use aya::{
    Ebpf, EbpfLoader, VerifierLogLevel,
    maps::{MapData, PerCpuArray, RingBuf, SockHash},
    programs::{CgroupAttachMode, SkMsg, SkSkb, SockOps},
};
use thiserror::Error;

use crate::events::{Event, decode};

/// The injector's object, built by build.rs beside the main one.
pub(super) static INJECT_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sonde-inject"));

const CAP_NET_ADMIN: u64 = 1 << 12;

#[derive(Debug, Error)]
pub enum InjectError {
    #[error(
        "traceparent injection needs CAP_NET_ADMIN (the kernel makes the sockhash that \
         sk_msg needs only with it); run sonde as root or add CAP_NET_ADMIN"
    )]
    NoNetAdmin,
    #[error("this sonde binary was built without its eBPF programs (AYA_BUILD_SKIP was set)")]
    NoObject,
    #[error("no cgroup v2 file system is mounted (looked in /proc/self/mountinfo)")]
    NoCgroup2,
    #[error("loading the injector failed: {0}")]
    Load(#[source] aya::EbpfError),
    #[error("the injector object lacks {0} (a build mismatch)")]
    Missing(&'static str),
    #[error("the kernel refused the injector's program {program}: {source}")]
    Program {
        program: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("cannot open cgroup {}: {source}", path.display())]
    OpenCgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
}

/// The attached injector. Dropping it detaches it (sockets already in the sockhash
/// leave it when they close; the program goes with the map).
pub struct Injector {
    _ebpf: Ebpf,
    /// Taken out of the object to attach to; the program stays attached while it lives.
    _sockets: SockHash<MapData, agent_common::SockTuple>,
    events: RingBuf<MapData>,
    counts: PerCpuArray<MapData, u64>,
    /// Where its sock_ops program is attached.
    pub cgroups: Vec<PathBuf>,
}

impl Injector {
    /// Run time and count of its programs (see [`super::program_times`]).
    pub fn program_times(&self) -> Vec<crate::telemetry::ProgramTime> {
        super::program_times(&self._ebpf)
    }

    /// Loads the injector and attaches it for the processes in `cgroups` (all of the
    /// node's when empty). The traceparents it writes say sampled when the 56 random
    /// bits of their trace id are below `sample_below` (`sampling::threshold`).
    pub fn start(cgroups: &[PathBuf], sample_below: u64) -> Result<Injector, InjectError> {
        if INJECT_OBJECT.is_empty() {
            return Err(InjectError::NoObject);
        }
        if !has_net_admin() {
            return Err(InjectError::NoNetAdmin);
        }
        let targets = if cgroups.is_empty() {
            vec![cgroup2_root().ok_or(InjectError::NoCgroup2)?]
        } else {
            cgroups.to_vec()
        };
        let config = ProbeConfig {
            agent_tgid: std::process::id(),
            sample_below,
            ..ProbeConfig::default()
        };
        let kernel_btf = super::kernel_btf_for(INJECT_OBJECT);
        let mut ebpf = EbpfLoader::new()
            .btf(kernel_btf.as_ref())
            .override_global(agent_common::globals::CONFIG, &config, true)
            // The verifier's reason and its statistics, not its walk of every path: that
            // log outgrows any buffer (ENOSPC) and hides the reason.
            .verifier_log_level(VerifierLogLevel::STATS)
            .load(INJECT_OBJECT)
            .map_err(InjectError::Load)?;

        let sockets: SockHash<MapData, agent_common::SockTuple> = SockHash::try_from(
            ebpf.take_map(maps::INJECT_SOCKETS)
                .ok_or(InjectError::Missing(maps::INJECT_SOCKETS))?,
        )
        .map_err(|source| InjectError::Map {
            name: maps::INJECT_SOCKETS,
            source,
        })?;
        let msg: &mut SkMsg = program(&mut ebpf, "inject_msg")?;
        msg.load().map_err(|source| InjectError::Program {
            program: "inject_msg",
            source,
        })?;
        msg.attach(sockets.fd())
            .map_err(|source| InjectError::Program {
                program: "inject_msg",
                source,
            })?;

        // Received bytes through the sockhash too, so that FIONREAD stays right (see
        // the program's comment).
        let rx: &mut SkSkb = program(&mut ebpf, "inject_rx")?;
        rx.load().map_err(|source| InjectError::Program {
            program: "inject_rx",
            source,
        })?;
        rx.attach(sockets.fd())
            .map_err(|source| InjectError::Program {
                program: "inject_rx",
                source,
            })?;

        let ops: &mut SockOps = program(&mut ebpf, "inject_sockops")?;
        ops.load().map_err(|source| InjectError::Program {
            program: "inject_sockops",
            source,
        })?;
        for path in &targets {
            let dir = File::open(path).map_err(|source| InjectError::OpenCgroup {
                path: path.clone(),
                source,
            })?;
            // A cgroup link always lets other programs (other agents) attach beside it.
            ops.attach(dir, CgroupAttachMode::Single)
                .map_err(|source| InjectError::Program {
                    program: "inject_sockops",
                    source,
                })?;
        }

        let events = RingBuf::try_from(
            ebpf.take_map(maps::INJECT_EVENTS)
                .ok_or(InjectError::Missing(maps::INJECT_EVENTS))?,
        )
        .map_err(|source| InjectError::Map {
            name: maps::INJECT_EVENTS,
            source,
        })?;
        let counts = PerCpuArray::try_from(
            ebpf.take_map(maps::INJECT_COUNTS)
                .ok_or(InjectError::Missing(maps::INJECT_COUNTS))?,
        )
        .map_err(|source| InjectError::Map {
            name: maps::INJECT_COUNTS,
            source,
        })?;
        Ok(Injector {
            _ebpf: ebpf,
            _sockets: sockets,
            events,
            counts,
            cgroups: targets,
        })
    }

    /// Hands every injection reported so far to `handle`; the count of malformed
    /// records is returned (none are expected).
    pub fn drain(&mut self, mut handle: impl FnMut(Event<'_>)) -> u64 {
        let mut malformed = 0;
        while let Some(record) = self.events.next() {
            match decode(&record) {
                Ok(event @ Event::Inject { .. }) => handle(event),
                _ => malformed += 1,
            }
        }
        malformed
    }

    /// The outcome counters (`agent_common::inject`), summed over CPUs.
    pub fn counts(&self) -> [u64; inject::COUNT as usize] {
        let mut sums = [0; inject::COUNT as usize];
        for (i, sum) in sums.iter_mut().enumerate() {
            if let Ok(per_cpu) = self.counts.get(&(i as u32), 0) {
                *sum = per_cpu.iter().sum();
            }
        }
        sums
    }
}

fn program<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, InjectError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let p = ebpf.program_mut(name).ok_or(InjectError::Missing(name))?;
    p.try_into().map_err(|source| InjectError::Program {
        program: name,
        source,
    })
}

fn has_net_admin() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & CAP_NET_ADMIN != 0)
}

/// Where the cgroup v2 hierarchy is mounted (/sys/fs/cgroup, or
/// /sys/fs/cgroup/unified on hybrid layouts).
pub fn cgroup2_root() -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    cgroup2_in_mountinfo(&text)
}

/// The mount point of the first cgroup2 file system in a mountinfo text.
fn cgroup2_in_mountinfo(text: &str) -> Option<PathBuf> {
    text.lines().find_map(|line| {
        // Fields: id parent dev root mountpoint options [optional...] - fstype source ...
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split(' ').next()?;
        let mount_point = left.split(' ').nth(4)?;
        (fstype == "cgroup2").then(|| Path::new(mount_point).to_path_buf())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_on_hybrid_and_unified_layouts() {
        let hybrid = "25 30 0:23 / /sys/fs/cgroup ro,nosuid shared:9 - tmpfs tmpfs ro,mode=755\n\
                      26 25 0:24 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            cgroup2_in_mountinfo(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let unified = "30 1 0:26 / /sys/fs/cgroup rw,nosuid,nodev shared:4 - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_in_mountinfo(unified),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(
            cgroup2_in_mountinfo("1 0 0:1 / / rw - ext4 /dev/vda rw\n"),
            None
        );
    }
}
